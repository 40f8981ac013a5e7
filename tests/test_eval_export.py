"""`isae eval` against an independent float64 computation, and `isae export` layouts
reproduced by re-implementing each library's forward pass in NumPy."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from libdata import signed_sparse_set
from safetensors.numpy import load_file

from isae.cli.main import main
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder


@pytest.fixture(scope="module")
def acts_and_ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ee")
    signed_sparse_set(tmp / "acts", d=16, atoms=48, k=3, rows=3000)
    acts = ActivationSet(tmp / "acts")
    out = {}
    for arch in ("topk", "isae"):
        m = SparseCoder(SAEConfig.from_arch(arch, d_in=16, d_sae=48, k=3, seed=1))
        if arch == "topk":  # non-trivial biases, so that folding them is tested
            with torch.no_grad():
                m.b_dec.normal_(0, 0.3)
                m.b_enc.normal_(0, 0.1)
        out[arch] = checkpoint.save(m, tmp / arch, acts.normalizer(),
                                    extra={"activations": {"hook": "blocks.0.hook_resid_post"}})
    return tmp, acts, out


def _ref_forward(x, W_enc, b_enc, W_dec, b_dec, k, signed):
    """Plain float64 TopK SAE forward on raw rows: ((x - b_dec) W_enc + b_enc) -> TopK -> decode."""
    pre = (x - b_dec) @ W_enc + b_enc
    score = np.abs(pre) if signed else np.maximum(pre, 0)
    idx = np.argsort(-score, axis=1)[:, :k]
    z = np.zeros_like(pre)
    rows = np.arange(len(x))[:, None]
    z[rows, idx] = pre[rows, idx] if signed else np.maximum(pre[rows, idx], 0)
    return z @ W_dec + b_dec, z


def test_eval_matches_float64_reference(acts_and_ckpts, capsys):
    tmp, acts, ck = acts_and_ckpts
    assert main(["eval", str(ck["topk"]), "--activations", str(tmp / "acts"), "--out", str(tmp / "e.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out)
    row = pd.read_parquet(tmp / "e.parquet").iloc[0]
    c = checkpoint.load(ck["topk"])
    t = {k: v.astype(np.float64) for k, v in load_file(str(ck["topk"] / "sae.safetensors")).items()}
    x = acts.load("heldout")["x"].astype(np.float64)
    xn = (x - c.norm.mean) / c.norm.scale
    x_hat, z = _ref_forward(xn, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], 3, signed=False)
    sse = ((xn - x_hat) ** 2).sum()
    assert row["mse_per_dim"] == pytest.approx(sse / xn.size, rel=1e-4)
    assert row["fvu"] == pytest.approx(sse / ((xn - xn.mean(0)) ** 2).sum(), rel=1e-4)
    assert row["l0"] == pytest.approx((z != 0).sum(1).mean(), rel=1e-6)
    assert row["dead_frac"] == pytest.approx(1 - (z != 0).any(0).mean(), abs=1e-9)
    assert summary["rows"] == len(x) and summary["fvu"] == pytest.approx(row["fvu"])


@pytest.mark.parametrize("arch", ["topk", "isae"])
def test_saelens_export_reproduces_raw_reconstruction(acts_and_ckpts, arch):
    tmp, acts, ck = acts_and_ckpts
    out = tmp / f"saelens-{arch}"
    assert main(["export", str(ck[arch]), "--format", "saelens", "--out", str(out)]) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 48 and cfg["apply_b_dec_to_input"] is True
    assert cfg["isae"]["signed"] == (arch == "isae")
    assert cfg["architecture"] == cfg["activation_fn_str"] == ("abstopk" if arch == "isae" else "topk")
    t = {k: v.astype(np.float64) for k, v in load_file(str(out / "sae_weights.safetensors")).items()}
    x = acts.load("heldout")["x"].astype(np.float64)
    x_hat, _ = _ref_forward(x, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], 3, signed=arch == "isae")
    ours = checkpoint.load(ck[arch]).reconstruct_raw(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(x_hat, ours, rtol=1e-4, atol=1e-4)


def test_sparsify_export_layout_and_forward(acts_and_ckpts):
    tmp, acts, ck = acts_and_ckpts
    out = tmp / "sparsify"
    assert main(["export", str(ck["topk"]), "--format", "sparsify", "--out", str(out)]) == 0
    folder = out / "blocks.0.hook_resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["num_latents"] == 48 and cfg["k"] == 3 and cfg["d_in"] == 16
    t = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae.safetensors")).items()}
    assert set(t) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert t["encoder.weight"].shape == (48, 16)
    x = acts.load("heldout")["x"].astype(np.float64)
    x_hat, _ = _ref_forward(x, t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"], 3, False)
    ours = checkpoint.load(ck["topk"]).reconstruct_raw(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(x_hat, ours, rtol=1e-4, atol=1e-4)


def test_export_of_relu_to_sparsify_is_refused(tmp_path, acts_and_ckpts, capsys):
    _, acts, _ = acts_and_ckpts
    m = SparseCoder(SAEConfig.from_arch("relu", d_in=16, d_sae=48, k=3))
    ck = checkpoint.save(m, tmp_path / "relu", acts.normalizer())
    assert main(["export", str(ck), "--format", "sparsify", "--out", str(tmp_path / "o")]) == 2
    assert "no relu architecture" in capsys.readouterr().err


def test_saelens_export_records_the_sets_framing(tmp_path, caplog):
    """context_size and prepend_bos (what SAELens's ActivationsStore.from_sae needs) come
    from the language-model set the checkpoint was trained on: the one its cfg.json records,
    or the one --activations names; a set of another hook is not taken for it."""
    from isae.data.activations import ActivationWriter, heldout_mask

    hook = "blocks.3.hook_resid_post"

    def lm_set(path, context, prefix, hook=hook):
        rng = np.random.default_rng(0)
        meta = {"model": "m", "hook": hook, "context": context, "special_prefix": prefix}
        with ActivationWriter(path, 16, source="lm", meta=meta) as w:
            w.add(rng.standard_normal((400, 16)).astype(np.float32), heldout_mask(np.arange(400) // 20, 0.2))
        return ActivationSet(path)

    acts = lm_set(tmp_path / "set", 48, [101])
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=16, d_sae=48, k=3, seed=0))
    ck = checkpoint.save(m, tmp_path / "ck", acts.normalizer(), extra={"activations": {
        "path": str(acts.path), "model": "m", "hook": hook}})

    def metadata(*flags):
        out = tmp_path / "e"
        assert main(["export", str(ck), "--format", "saelens", "--out", str(out), *flags]) == 0
        return json.loads((out / "cfg.json").read_text())["metadata"]

    framing = {"context_size": 48, "prepend_bos": True, "disable_concat_sequences": True}
    assert metadata() == {"model_name": "m", "hook_name": hook, **framing}
    (tmp_path / "set").rename(tmp_path / "moved")  # the recorded path is gone
    caplog.clear()
    assert "context_size" not in metadata()
    assert "pass --activations" in caplog.text
    assert metadata("--activations", str(tmp_path / "moved")) == {"model_name": "m", "hook_name": hook, **framing}
    lm_set(tmp_path / "other", 64, [], hook="blocks.1.hook_resid_post")
    caplog.clear()
    assert "context_size" not in metadata("--activations", str(tmp_path / "other"))
    assert "hook 'blocks.1.hook_resid_post' is not the checkpoint's" in caplog.text
    # no special prefix: no BOS
    lm_set(tmp_path / "nobos", 64, [])
    assert metadata("--activations", str(tmp_path / "nobos"))["prepend_bos"] is False
