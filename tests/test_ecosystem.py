"""Round trips through the real SAELens and sparsify.

Exports: an ``isae``, ``isae-iter``, ``topk`` and ``dl`` checkpoint (and ``relu`` for SAELens),
trained here, are exported to both libraries and loaded by the libraries' own loaders: each
reproduces isae's reconstructions to 1e-5 (relative to the largest activation) with the
same active latents on every row, or is refused; a refused one exported with ``--lossy``
warns of the FVU that the library's own forward pass then gives.

Imports: folders written by the libraries' own save functions (``SAE.save_model``,
``SparseCoder.save_to_disk``) are read by ``isae eval``/``match``/``ric`` and ``isae import``
and reproduce the library's forward pass the same way; so are isae's own exports after the
library rewrote them, SAELens < 6's ``scaling_factor``, and the library objects themselves
through the Python API. What is refused is refused for the reason the library's own code
shows (training folders, covariance whitening, sparsify's multi-TopK forward).

On a real MiniLM set: SAELens's ActivationsStore runs from an export and extracts the set's
own rows, the feature browser shows an SAE and its export in one unit, and ``isae.splice``
takes a SAELens SAE.

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


# ----------------------------------------------------------------------------- isae's own exports back in


@pytest.mark.parametrize("arch,fmt,imported", [("topk", "saelens", "topk"),
                                                ("isae", "saelens", "topk+signed"),
                                                ("topk", "sparsify", "topk")])
def test_isae_imports_its_own_exports_as_the_library_rewrites_them(acts, trained, tmp_path, capsys,
                                                                   arch, fmt, imported):
    """An export (decoder rows of the set's scale s != 1), loaded and saved again by the
    library itself, is imported exactly: the import computes the library's forward pass
    and the original checkpoint's reconstructions."""
    assert abs(acts.normalizer().scale - 1) > 0.05  # far beyond the 1e-5 of unit rows
    assert main(["export", str(trained[arch]), "--format", fmt, "--out", str(tmp_path / "e")]) == 0
    if fmt == "saelens":
        sae_lens.SAE.load_from_disk(str(tmp_path / "e")).save_model(str(tmp_path / "lib"))
        folder = tmp_path / "lib"
    else:
        hook = next(p for p in (tmp_path / "e").iterdir() if p.is_dir())
        sparsify.SparseCoder.load_from_disk(hook).save_to_disk(tmp_path / "lib" / hook.name)
        folder = tmp_path / "lib" / hook.name
    capsys.readouterr()
    assert main(["import", str(tmp_path / "lib"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == imported
    back = checkpoints.load(tmp_path / "back")
    x = _x(acts)
    forward, codes = _library_forward(fmt, folder)
    _assert_same(x, forward(x), codes(x), back)
    orig = checkpoints.load(trained[arch]).reconstruct_raw(x).numpy()
    assert np.abs(back.reconstruct_raw(x).numpy() - orig).max() <= TOL * np.abs(x).max()


# ----------------------------------------------------------------------------- legacy scaling_factor


def _with_scaling_factor(src, out, sf, flag) -> None:
    """A copy of a SAELens folder with SAELens < 6's ``scaling_factor`` tensor added."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    t = load_file(str(src / "sae_weights.safetensors"))
    save_file({**t, "scaling_factor": torch.as_tensor(sf, dtype=torch.float32)},
              str(out / "sae_weights.safetensors"))
    cfg = json.loads((src / "cfg.json").read_text())
    if flag is not None:
        cfg["finetuning_scaling_factor"] = flag
    (out / "cfg.json").write_text(json.dumps(cfg))


def test_legacy_scaling_factor_against_saelens(acts, tmp_path, capsys):
    """All ones: SAELens 6 drops it, and so does isae. Other values with
    finetuning_scaling_factor: SAELens 6 cannot load the folder, isae applies the factor as
    SAELens < 6 did (codes times the factor, then the decoder), which is what SAELens
    computes on the folder with the factor folded into W_dec. Without the flag both refuse."""
    from safetensors.torch import load_file, save_file

    saelens_folder(tmp_path / "s", "standard")
    x = _x(acts)
    _with_scaling_factor(tmp_path / "s", tmp_path / "ones", np.ones(N), None)
    forward, codes = _library_forward("saelens", tmp_path / "ones")
    _assert_same(x, forward(x), codes(x), checkpoints.load(tmp_path / "ones"))

    sf = np.random.default_rng(1).uniform(0.5, 2.0, N)
    _with_scaling_factor(tmp_path / "s", tmp_path / "sf", sf, True)
    with pytest.raises(Exception):  # noqa: B017 (SAELens's own error type is not ours to pin)
        sae_lens.SAE.load_from_disk(str(tmp_path / "sf"))
    (tmp_path / "folded").mkdir()
    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    t["W_dec"] = t["W_dec"] * torch.as_tensor(sf, dtype=torch.float32)[:, None]
    save_file(t, str(tmp_path / "folded" / "sae_weights.safetensors"))
    (tmp_path / "folded" / "cfg.json").write_text((tmp_path / "s" / "cfg.json").read_text())
    forward, codes = _library_forward("saelens", tmp_path / "folded")
    _assert_same(x, forward(x), codes(x), checkpoints.load(tmp_path / "sf"))

    _with_scaling_factor(tmp_path / "s", tmp_path / "noflag", sf, False)
    with pytest.raises(ValueError, match="finetuning_scaling_factor is False"):
        sae_lens.SAE.load_from_disk(str(tmp_path / "noflag"))
    assert main(["eval", str(tmp_path / "noflag"), "--activations", str(acts.path)]) == 2
    assert "does not set finetuning_scaling_factor" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refusal texts


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_training_folders_point_to_save_inference_model(acts, tmp_path, capsys, kind):
    """A BatchTopK or Matryoshka training SAE saved with save_model is refused with the hint;
    saved with save_inference_model (a JumpReLU SAE) it is read, and so is the training SAE
    object itself through the API, both as SAELens runs the inference SAE."""
    import isae

    if kind == "batchtopk":
        sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K))
    else:
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D, d_sae=N, k=K, matryoshka_widths=[N // 3, N]))
    _randomised(sae, 3)
    sae.topk_threshold.fill_(0.2)
    sae.save_model(str(tmp_path / "train"))
    assert main(["eval", str(tmp_path / "train"), "--activations", str(acts.path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"architecture {kind!r} is a training folder" in err[0]
    assert "save_inference_model" in err[0]
    sae.save_inference_model(str(tmp_path / "inf"))
    forward, codes = _library_forward("saelens", tmp_path / "inf")
    x = _x(acts)
    _assert_same(x, forward(x), codes(x), checkpoints.load(tmp_path / "inf"))
    _assert_same(x, forward(x), codes(x), isae.load(sae).ckpt)


def test_covariance_whitening_is_the_identity_in_saelens_and_refused(acts, tmp_path, capsys):
    """The refusal's claim, checked: SAELens's forward pass on a covariance_whitening SAE is
    that of the same weights with no normalisation."""
    saelens_folder(tmp_path / "w", "topk", normalize_activations="covariance_whitening")
    saelens_folder(tmp_path / "n", "topk")  # the same seed: the same weights
    x = _x(acts)
    fw, _ = _library_forward("saelens", tmp_path / "w")
    fn, _ = _library_forward("saelens", tmp_path / "n")
    np.testing.assert_array_equal(fw(x), fn(x))
    assert main(["eval", str(tmp_path / "w"), "--activations", str(acts.path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "applies no whitening at inference (it is the identity there)" in err[0]


def test_sparsify_multi_topk_forward_uses_4k_and_isae_says_it_evaluates_k(acts, tmp_path, caplog):
    sparsify_folder(tmp_path / "sp", multi_topk=True)
    sae = sparsify.SparseCoder.load_from_disk(tmp_path / "sp")
    x = _x(acts)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        own = sae(xt).sae_out.numpy()
        top_acts, top_idx, _ = sae.encode(xt)
        k_sparse = sae.decode(top_acts, top_idx).numpy()
    assert np.abs(own - k_sparse).max() > 100 * TOL * np.abs(x).max()  # forward() is not k-sparse
    ck = checkpoints.load(tmp_path / "sp")
    assert np.abs(ck.reconstruct_raw(x).numpy() - k_sparse).max() <= TOL * np.abs(x).max()
    assert f"top 4k = {4 * K} latents" in caplog.text and "isae evaluates the k-sparse code" in caplog.text


# ----------------------------------------------------------------------------- library objects in the API


def test_api_takes_library_objects(acts, trained, tmp_path):
    """isae.match / evaluate / ric / load take a sae_lens SAE and a sparsify SparseCoder as
    they take their folders, with the same numbers."""
    import isae

    assert main(["export", str(trained["isae"]), "--format", "saelens", "--out", str(tmp_path / "e")]) == 0
    obj = sae_lens.SAE.load_from_disk(str(tmp_path / "e"))
    by_obj = isae.match(obj, trained["isae"], activations=acts.path)
    by_folder = isae.match(tmp_path / "e", trained["isae"], activations=acts.path)
    # SAELens's save_model keeps its own fields only: the seed isae wrote is gone
    names = {"a", "seed_a"}
    assert {k: v for k, v in by_obj.items() if k not in names} == {
        k: v for k, v in by_folder.items() if k not in names}
    assert by_obj["mean_abs_cos"] == pytest.approx(1, abs=1e-6) and by_obj["code_jaccard"] == 1.0
    sparsify_folder(tmp_path / "sp" / "layers.1", seed=4)
    coder = sparsify.SparseCoder.load_from_disk(tmp_path / "sp" / "layers.1")
    ev = isae.evaluate(coder, acts.path)
    ref = isae.evaluate(tmp_path / "sp" / "layers.1", acts.path)
    assert ev.pop("ckpt") == "<SparseCoder from sparsify>"
    ref.pop("ckpt")
    assert ev == ref and ev["fvu"] > 0
    ric_obj, ric_folder = isae.ric(obj, acts.path, pairs=50), isae.ric(tmp_path / "e", acts.path, pairs=50)
    assert {k: v for k, v in ric_obj.items() if k not in ("ckpt", "ckpt_seed")} == {
        k: v for k, v in ric_folder.items() if k not in ("ckpt", "ckpt_seed")}
    sae = isae.load(coder)
    assert "SparseCoder from sparsify" in repr(sae) and sae.hook is None
    x = torch.from_numpy(_x(acts))
    np.testing.assert_allclose(sae(x).numpy(), coder(x).sae_out.detach().numpy(), atol=TOL * float(x.abs().max()))


# ----------------------------------------------------------------------------- a real language-model set


HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """MiniLM block 3 over 3000 pydoc tokens (contexts of 64), a topk and an isae trained
    on it, and each one's SAELens export; the model booted as the API boots it."""
    import isae

    tmp = tmp_path_factory.mktemp("eco-lm")
    assert main(["-q", "extract", "lm", "--model", "all-MiniLM-L6-v2", "--hook", HOOK, "--text",
                 "pydoc", "--max-tokens", "3000", "--context", "64", "--out", str(tmp / "set")]) == 0
    out = {"set": ActivationSet(tmp / "set"), "model": isae.load_model("all-MiniLM-L6-v2")}
    for arch in ("topk", "isae"):
        assert main(["-q", "train", "--activations", str(tmp / "set"), "--arch", arch, "--k", "8",
                     "--width", "768", "--tokens", "20000", "--batch-size", "512",
                     "--out", str(tmp / arch)]) == 0
        assert main(["-q", "export", str(tmp / arch), "--format", "saelens", "--out",
                     str(tmp / f"{arch}.saelens")]) == 0
        out[arch] = tmp / arch
    return out


@pytest.mark.slow
def test_saelens_activations_store_reads_the_export(lm):
    """ActivationsStore.from_sae(model, sae, dataset) works on an export (context_size and
    prepend_bos come from the set), and the activations it extracts at the hook for one of
    the set's own contexts are the set's rows; the SAE reconstructs them as isae does."""
    from sae_lens import ActivationsStore

    acts = lm["set"]
    sae = sae_lens.SAE.load_from_disk(str(lm["topk"]) + ".saelens")
    assert sae.cfg.metadata.context_size == acts.meta["context"] == 64
    assert sae.cfg.metadata.prepend_bos is True and sae.cfg.metadata.hook_name == HOOK
    rows = acts.load("train", columns=["doc", "pos", "token_id"])
    first = (rows["doc"] == rows["doc"][0]) & (rows["pos"] < 62)
    assert first.sum() == 62 and (rows["pos"][first] == np.arange(62)).all()
    tokens = [*acts.meta["special_prefix"], *rows["token_id"][first].tolist(), *acts.meta["special_suffix"]]
    store = ActivationsStore.from_sae(lm["model"], sae, dataset=[{"tokens": tokens}] * 2,
                                      store_batch_size_prompts=1, train_batch_size_tokens=64,
                                      n_batches_in_buffer=2, total_tokens=256)
    assert (store.context_size, store.prepend_bos, store.hook_name) == (64, True, HOOK)
    batch = store.get_batch_tokens(1)
    assert batch[0].tolist() == tokens
    got = store.get_activations(batch)[0, 1:63].reshape(62, -1)
    x = rows["x"][first].astype(np.float32)
    assert np.abs(got.numpy() - x).max() <= 1e-5 * np.abs(x).max()
    with torch.no_grad():
        lib = sae(got).numpy()
    ours = checkpoints.load(lm["topk"]).reconstruct_raw(x).numpy()
    assert np.abs(lib - ours).max() <= TOL * np.abs(x).max()


@pytest.mark.slow
def test_browser_shows_a_checkpoint_and_its_saelens_export_in_one_unit(lm):
    """The page's values are in raw activation units: for the export, SAELens's own code
    times its decoder row norm; for the checkpoint the same numbers."""
    from isae.analysis import browser as br
    from isae.study.browser_html import render

    acts = lm["set"]
    assert abs(acts.normalizer().scale - 1) > 0.2
    export = str(lm["isae"]) + ".saelens"
    data = br.browse(checkpoints.load(lm["isae"]), checkpoints.load(export), acts,
                     br.tokenizer_for(acts), pairs=40, contexts=3, window=2)
    sae = sae_lens.SAE.load_from_disk(export)
    held = acts.load("heldout", columns=["doc", "pos"])
    where = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(held["doc"], held["pos"]))}
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(held["x"].astype(np.float32))).numpy()
    norms = sae.W_dec.norm(dim=1).detach().numpy()
    checked = 0
    for p in data.pairs:
        assert p.ref.a == p.ref.b and p.ref.abs_cos == pytest.approx(1, abs=1e-6)
        for ca, cb in zip(p.a.contexts, p.b.contexts):
            lib = z[where[(cb.doc, cb.pos)], p.b.index] * norms[p.b.index]
            assert cb.value == pytest.approx(lib, rel=1e-4, abs=1e-5)
            assert ca.value == pytest.approx(cb.value, rel=1e-4, abs=1e-5)
            checked += 1
    assert checked > 40
    assert "raw activation units" in render(data)


@pytest.mark.slow
def test_splice_takes_a_saelens_sae_without_a_hook_and_names_the_need_for_one(lm):
    """isae.splice(model, sae_lens SAE) finds the hook in its metadata and splices exactly
    what the export's folder splices; a sparsify SparseCoder knows no hook and says so."""
    import isae
    from isae.data import language_models as lmod
    from isae.errors import UserError

    model = lm["model"]
    export = str(lm["topk"]) + ".saelens"
    obj = sae_lens.SAE.load_from_disk(export)
    hooks = isae.splice(model, obj)
    assert hooks[0][0] == lmod.resolve_hook(model, HOOK)
    fr = lmod.framing(model.tokenizer)
    docs = [("a", "Splice the reconstruction at the hook."), ("b", "A second text.")]
    chunks = list(lmod.chunk_documents(lmod.tokenize_documents(model.tokenizer, docs), 30))
    batch = next(lmod.batches(chunks, fr, 32, 4))

    def after(h):
        with torch.inference_mode(), model.hooks(fwd_hooks=h):
            _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                            names_filter="blocks.5.hook_resid_post")
        return cache["blocks.5.hook_resid_post"]

    assert torch.equal(after(hooks), after(isae.splice(model, isae.load(export))))
    sparsify_folder_ = sparsify.SparseCoder(384, sparsify.SparseCoderConfig(num_latents=512, k=8))
    with pytest.raises(UserError, match="does not say which hook it was trained at; pass hook="):
        isae.splice(model, sparsify_folder_)
    assert isae.splice(model, sparsify_folder_, hook=HOOK)[0][0] == hooks[0][0]
