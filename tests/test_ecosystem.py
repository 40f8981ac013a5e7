"""Round trips through the real SAELens and sparsify.

Exports: an ``isae``, ``isae-iter``, ``topk`` and ``dl`` checkpoint (and ``relu`` for SAELens),
trained here, are exported to both libraries and loaded by the libraries' own loaders: each
reproduces isae's reconstructions to 1e-5 (relative to the largest activation) with the
same active latents on every row, or is refused; a refused one exported with ``--lossy``
warns of the FVU that the library's own forward pass then gives.

Imports: folders written by the libraries' own save functions (``SAE.save_model``,
``SparseCoder.save_to_disk``) are read by ``isae eval``/``match``/``ric`` and ``isae import``
and reproduce the library's forward pass the same way.

These need ``sae-lens`` and ``eai-sparsify``, which pin transformer-lens < 4: CI builds them
a virtualenv of their own (``.ci/run``); elsewhere this module is skipped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from libdata import matched_abs_cos

from isae.cli.main import main
from isae.data import checkpoints
from isae.data.activations import ActivationSet, ActivationWriter, heldout_mask

pytestmark = pytest.mark.ecosystem
sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")

D, N, K = 32, 96, 4
TOL = 1e-5  # of the largest |activation|


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> ActivationSet:
    """Signed sparse rows shifted and scaled, so that a checkpoint's normalisation (folded
    into every export) is far from the identity."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((N, D))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    rows = 6000
    idx = np.stack([rng.choice(N, K, replace=False) for _ in range(rows)])
    val = (rng.random((rows, K)) + 0.5) * rng.choice([-1.0, 1.0], (rows, K))
    x = np.einsum("rk,rkd->rd", val, W[idx]) + 0.02 * rng.standard_normal((rows, D))
    x = 3.0 * x + rng.standard_normal(D)
    out = tmp_path_factory.mktemp("eco") / "acts"
    meta = {"model": "a-model", "hook": "blocks.1.hook_resid_post"}
    with ActivationWriter(out, D, source="test", rows_per_shard=4096, meta=meta) as w:
        w.add(x.astype(np.float32), heldout_mask(np.arange(rows) // 32, 0.2))
    return ActivationSet(out)


@pytest.fixture(scope="module")
def trained(acts, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("eco-ck")
    out = {}
    for arch in ("topk", "isae", "isae-iter", "dl", "relu"):
        out[arch] = tmp / arch
        rc = main(["-q", "train", "--activations", str(acts.path), "--arch", arch, "--k", str(K),
                   "--width", str(N), "--tokens", "30000", "--batch-size", "512", "--out",
                   str(out[arch])])
        assert rc == 0
    return out


def _x(acts: ActivationSet) -> np.ndarray:
    return acts.load("heldout")["x"].astype(np.float32)


def _supports(dense: np.ndarray) -> list[frozenset]:
    return [frozenset(np.flatnonzero(r)) for r in dense]


def _library_forward(fmt: str, folder) -> tuple:
    """The library's own loader and forward pass: (x -> x_hat, x -> dense codes [B, N])."""
    if fmt == "saelens":
        sae = sae_lens.SAE.load_from_disk(str(folder))
        return (lambda x: sae(torch.from_numpy(x)).detach().numpy(),
                lambda x: sae.encode(torch.from_numpy(x)).detach().numpy())
    sae = sparsify.SparseCoder.load_from_disk(folder)

    def codes(x):
        top_acts, top_idx, _ = sae.encode(torch.from_numpy(x))
        return torch.zeros(len(x), sae.num_latents).scatter(1, top_idx, top_acts).detach().numpy()

    return (lambda x: sae(torch.from_numpy(x)).sae_out.detach().numpy(), codes)


def _assert_same(x, x_hat_lib, dense_lib, ck) -> None:
    ours = ck.reconstruct_raw(x).numpy()
    assert np.abs(ours - x_hat_lib).max() <= TOL * np.abs(x).max()
    assert _supports(dense_lib) == _supports(ck.encode_raw(x).dense(dense_lib.shape[1]).numpy())


def _fvu(x, x_hat) -> float:
    x = x.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


REFUSED = {("isae", "sparsify"), ("isae-iter", "saelens"), ("isae-iter", "sparsify"),
           ("dl", "saelens"), ("dl", "sparsify"), ("relu", "sparsify")}


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("arch", ["topk", "isae", "isae-iter", "dl", "relu"])
def test_export_is_exact_through_the_library_or_refused(acts, trained, tmp_path, capsys, caplog, arch, fmt):
    out = tmp_path / "o"
    rc = main(["export", str(trained[arch]), "--format", fmt, "--out", str(out)])
    x = _x(acts)

    def folder():  # sparsify: one sub-folder, named after the hook
        return out if fmt == "saelens" else next(p for p in out.iterdir() if p.is_dir())
    if (arch, fmt) not in REFUSED:
        assert rc == 0
        forward, codes = _library_forward(fmt, folder())
        _assert_same(x, forward(x), codes(x), checkpoints.load(trained[arch]))
        if fmt == "saelens":
            sae = sae_lens.SAE.load_from_disk(str(folder()))
            assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
            kind = sae.cfg.architecture()
            assert kind == {"topk": "topk", "isae": "abstopk", "relu": "standard"}[arch]
        return
    assert rc == 2 and not out.exists()
    capsys.readouterr()
    if arch == "relu":
        return  # no k for sparsify's TopK: refused even with --lossy
    # --lossy: the FVU the warning gives is what the library itself computes
    assert main(["export", str(trained[arch]), "--format", fmt, "--out", str(out), "--lossy",
                 "--activations", str(acts.path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    forward, _ = _library_forward(fmt, folder())
    assert summary["fvu_exported"] == pytest.approx(_fvu(x, forward(x)), rel=1e-4)
    assert f"{summary['fvu_exported']:.4f}" in caplog.text


# ----------------------------------------------------------------------------- their folders


def _randomised(module: torch.nn.Module, seed: int) -> None:
    """Random weights and biases (the libraries initialise biases at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1 / np.sqrt(D) if p.ndim == 2 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name == "threshold":
                p.abs_()


def saelens_folder(path, arch: str, seed: int = 0, **cfg) -> None:
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
               "abstopk": (sae_lens.AbsTopKSAE, sae_lens.AbsTopKSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig)}
    cls, cfg_cls = classes[arch]
    if arch in ("topk", "abstopk"):
        cfg.setdefault("k", K)
    sae = cls(cfg_cls(d_in=D, d_sae=N, **cfg))
    _randomised(sae, seed)
    sae.save_model(str(path))


def sparsify_folder(path, seed: int = 0, **cfg) -> None:
    sae = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K, **cfg))
    _randomised(sae, seed)
    if sae.cfg.normalize_decoder:
        sae.set_decoder_norm_to_unit_norm()
    sae.save_to_disk(path)


SAELENS = [("standard", {}, "relu"), ("topk", {}, None), ("topk", {"rescale_acts_by_decoder_norm": True}, "topk"),
           ("abstopk", {}, None), ("abstopk", {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True},
                                   "topk+signed"),
           ("jumprelu", {}, None)]


@pytest.mark.parametrize("arch,cfg,imported", SAELENS)
def test_saelens_folders_read_and_import(acts, tmp_path, capsys, arch, cfg, imported):
    saelens_folder(tmp_path / "s", arch, **cfg)
    forward, codes = _library_forward("saelens", tmp_path / "s")
    x = _x(acts)
    _assert_same(x, forward(x), codes(x), checkpoints.load(tmp_path / "s"))
    assert main(["eval", str(tmp_path / "s"), "--activations", str(acts.path)]) == 0
    assert json.loads(capsys.readouterr().out)["fvu"] == pytest.approx(_fvu(x, forward(x)), rel=1e-4)
    rc = main(["import", str(tmp_path / "s"), "--out", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    if imported is None:  # random decoder rows are not unit norm: a TopK cannot be held exactly
        assert rc == 2 and ("not unit norm" in err or "no JumpReLU" in err)
        return
    assert rc == 0
    ck = checkpoints.load(tmp_path / "ck")
    assert ck.cfg["arch"] == imported
    _assert_same(x, forward(x), codes(x), ck)


def test_gated_saelens_folder_is_refused(acts, tmp_path, capsys):
    saelens_folder(tmp_path / "g", "gated")
    assert main(["eval", str(tmp_path / "g"), "--activations", str(acts.path)]) == 2
    assert "architecture 'gated' is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_sparsify_folders_read_and_import(acts, tmp_path, capsys, normalize_decoder):
    sparsify_folder(tmp_path / "sp" / "layers.2", normalize_decoder=normalize_decoder)
    forward, codes = _library_forward("sparsify", tmp_path / "sp" / "layers.2")
    x = _x(acts)
    _assert_same(x, forward(x), codes(x), checkpoints.load(tmp_path / "sp"))
    rc = main(["import", str(tmp_path / "sp"), "--out", str(tmp_path / "ck")])
    if not normalize_decoder:
        assert rc == 2 and "not unit norm" in capsys.readouterr().err
        return
    assert rc == 0
    _assert_same(x, forward(x), codes(x), checkpoints.load(tmp_path / "ck"))
    assert checkpoints.load(tmp_path / "ck").cfg["source"]["format"] == "sparsify"


def test_multi_hookpoint_sparsify_folder_needs_a_name(acts, tmp_path, capsys):
    for i, hook in enumerate(("layers.2", "layers.4")):
        sparsify_folder(tmp_path / "sp" / hook, seed=i)
    assert main(["eval", str(tmp_path / "sp"), "--activations", str(acts.path)]) == 2
    assert "2 hookpoints (layers.2, layers.4); name one" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "sp" / "layers.4"), "--activations", str(acts.path)]) == 0


def test_stability_of_two_saelens_seeds_in_one_command(acts, tmp_path, capsys):
    for seed in (0, 1):
        saelens_folder(tmp_path / f"seed{seed}", "topk", seed=seed)
    rc = main(["match", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--activations",
               str(acts.path)])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0
    W = [sae_lens.SAE.load_from_disk(str(tmp_path / f"seed{i}")).W_dec.detach().numpy() for i in (0, 1)]
    assert s["mean_abs_cos"] == pytest.approx(matched_abs_cos(*W), abs=1e-6)
    assert s["code_rows"] == len(_x(acts)) and 0 <= s["code_jaccard"] <= 1
