"""SAELens and sparsify folders read by layout, ``isae import`` and ``isae export``, checked
against float64 NumPy re-implementations of what each library computes (the same folders
through the real libraries: tests/test_ecosystem.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from libdata import signed_sparse_set
from safetensors.numpy import save_file

from isae.cli.main import main
from isae.data import checkpoints, foreign
from isae.data.activations import ActivationSet
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder

D, N, K = 16, 40, 3


# ----------------------------------------------------------------------------- references


def saelens_forward(cfg: dict, t: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens 6 inference in float64, as its SAE classes compute it: (x_hat, feature acts)."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    arch = cfg["architecture"]
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = np.linalg.norm(t["W_dec"], axis=1)
    rescale = arch in ("topk", "abstopk") and cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * norms
    z = np.zeros_like(pre)
    rows = np.arange(len(x))[:, None]
    if arch == "standard":
        z = np.maximum(pre, 0)
    elif arch == "jumprelu":
        z = np.where(pre > t["threshold"], np.maximum(pre, 0), 0)
    else:
        k = cfg["k"]
        score = np.abs(pre) if arch == "abstopk" else pre
        idx = np.argsort(-score, axis=1)[:, :k]
        v = pre[rows, idx]
        z[rows, idx] = v if arch == "abstopk" else np.maximum(v, 0)
    acts = z / norms if rescale else z
    return acts @ t["W_dec"] + t["b_dec"], z


def sparsify_forward(cfg: dict, t: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sparsify's SparseCoder in float64: ReLU(encoder(x - b_dec)), top k, decode."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    pre = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    rows = np.arange(len(x))[:, None]
    z = np.zeros_like(pre)
    z[rows, idx] = pre[rows, idx]
    return z @ t["W_dec"] + t["b_dec"], z


def support_sets(z: np.ndarray) -> list[frozenset]:
    return [frozenset(np.flatnonzero(r)) for r in z]


# ----------------------------------------------------------------------------- folders


def _rng_tensors(seed: int, unit_rows: bool) -> dict:
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((N, D)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    if not unit_rows:
        W_dec *= rng.uniform(0.3, 3.0, (N, 1)).astype(np.float32)
    return {
        "W_enc": (rng.standard_normal((D, N)) / np.sqrt(D)).astype(np.float32),
        "W_dec": W_dec,
        "b_enc": (0.1 * rng.standard_normal(N)).astype(np.float32),
        "b_dec": (0.3 * rng.standard_normal(D)).astype(np.float32),
    }


def write_saelens(path, arch: str, seed: int = 0, unit_rows: bool = False, **cfg_extra) -> tuple[dict, dict]:
    """A SAELens 6 folder as SAE.save_model writes it (cfg with a version-6 stamp)."""
    t = _rng_tensors(seed, unit_rows)
    if arch == "jumprelu":
        t["threshold"] = np.random.default_rng(seed + 7).uniform(0, 0.3, N).astype(np.float32)
    cfg = {"architecture": arch, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.hook_resid_post",
                        "model_name": "m"}}
    if arch in ("topk", "abstopk"):
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    cfg.update(cfg_extra)
    path.mkdir(parents=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, t


def write_sparsify(path, seed: int = 0, **cfg_extra) -> tuple[dict, dict]:
    """A sparsify folder as SparseCoder.save_to_disk writes it."""
    t0 = _rng_tensors(seed, unit_rows=True)
    t = {"encoder.weight": np.ascontiguousarray(t0["W_enc"].T), "encoder.bias": t0["b_enc"],
         "W_dec": t0["W_dec"], "b_dec": t0["b_dec"]}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": N, "k": K, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D, **cfg_extra}
    path.mkdir(parents=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, t


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    """Raw activations with a non-trivial mean and scale (so normalisation matters)."""
    out = tmp_path_factory.mktemp("fs") / "acts"
    rng = np.random.default_rng(3)
    signed_sparse_set(out, d=D, atoms=N, k=K, rows=3000, noise=0.05)
    return ActivationSet(out), rng


def _x(acts: ActivationSet) -> np.ndarray:
    return acts.load("heldout")["x"].astype(np.float64)


# ----------------------------------------------------------------------------- reading


SAELENS_CASES = [
    ("standard", {}),
    ("topk", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("abstopk", {}),
    ("jumprelu", {}),
    ("topk", {"apply_b_dec_to_input": False}),
]


@pytest.mark.parametrize("arch,extra", SAELENS_CASES)
def test_saelens_folder_reproduces_the_library(tmp_path, raw_set, arch, extra):
    acts, _ = raw_set
    cfg, t = write_saelens(tmp_path / "s", arch, **extra)
    assert foreign.detect(tmp_path / "s") == "saelens"
    ck = checkpoints.load(tmp_path / "s")
    x = _x(acts)
    ref, z = saelens_forward(cfg, t, x)
    ours = ck.reconstruct_raw(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    codes = ck.encode_raw(x.astype(np.float32))
    dense = codes.dense(N).numpy()
    assert support_sets(dense) == support_sets(z)
    # Codes are on unit atoms: the library's activation times its decoder row norm.
    norms = np.linalg.norm(t["W_dec"].astype(np.float64), axis=1)
    expect = z if extra.get("rescale_acts_by_decoder_norm") else z * norms
    np.testing.assert_allclose(dense, expect, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ck.W_dec.numpy(), axis=1), 1, atol=1e-6)


def test_old_saelens_config_with_topk_activation_is_read_as_topk(tmp_path, raw_set):
    """Without a version-6 stamp SAELens turns activation_fn_str 'topk' into a topk SAE,
    whatever ``architecture`` says: the reader agrees (an abstopk export must not say 'topk')."""
    acts, _ = raw_set
    cfg, t = write_saelens(tmp_path / "s", "abstopk", metadata={}, activation_fn_str="topk",
                           activation_fn_kwargs={"k": K})
    ck = checkpoints.load(tmp_path / "s")
    assert ck.cfg["arch"] == "saelens:topk"
    x = _x(acts)
    ref, _ = saelens_forward({**cfg, "architecture": "topk"}, t, x)
    np.testing.assert_allclose(ck.reconstruct_raw(x.astype(np.float32)).numpy(), ref, atol=2e-5)


def test_sparsify_folder_and_its_hookpoints(tmp_path, raw_set):
    acts, _ = raw_set
    cfg, t = write_sparsify(tmp_path / "one" / "layers.3")
    x = _x(acts)
    ref, z = sparsify_forward(cfg, t, x)
    for path in (tmp_path / "one" / "layers.3", tmp_path / "one"):  # a sole hookpoint is found
        ck = checkpoints.load(path)
        assert ck.cfg["activations"]["hook"] == "layers.3"
        np.testing.assert_allclose(ck.reconstruct_raw(x.astype(np.float32)).numpy(), ref, atol=2e-5)
        assert support_sets(ck.encode_raw(x.astype(np.float32)).dense(N).numpy()) == support_sets(z)
    write_sparsify(tmp_path / "two" / "layers.3")
    write_sparsify(tmp_path / "two" / "layers.5", seed=1)
    with pytest.raises(Exception, match=r"2 hookpoints \(layers.3, layers.5\); name one"):
        checkpoints.load(tmp_path / "two")


@pytest.mark.parametrize("writer,kw,message", [
    ("saelens", {"architecture": "gated"}, "architecture 'gated' is not supported"),
    ("saelens", {"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'"),
    ("sparsify", {"transcode": True}, "transcode is set"),
    ("sparsify", {"skip_connection": True}, "skip_connection is set"),
    ("sparsify", {"activation": "groupmax"}, "activation 'groupmax' is not supported"),
])
def test_unsupported_foreign_folders_exit_2(tmp_path, raw_set, capsys, writer, kw, message):
    acts, _ = raw_set
    if writer == "saelens":
        write_saelens(tmp_path / "f", "topk", **kw)
    else:
        write_sparsify(tmp_path / "f", **kw)
    rc = main(["eval", str(tmp_path / "f"), "--activations", str(acts.path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_a_folder_of_nothing_names_the_layouts(tmp_path, raw_set, capsys):
    acts, _ = raw_set
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--activations", str(acts.path)]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint" in err and "SAELens" in err and "sparsify" in err


# ----------------------------------------------------------------------------- eval, match, ric


def test_eval_of_a_saelens_folder(tmp_path, raw_set, capsys):
    acts, _ = raw_set
    cfg, t = write_saelens(tmp_path / "s", "topk")
    assert main(["eval", str(tmp_path / "s"), "--activations", str(acts.path)]) == 0
    row = json.loads(capsys.readouterr().out)
    x = _x(acts)
    ref, z = saelens_forward(cfg, t, x)
    sse = ((x - ref) ** 2).sum()
    assert row["fvu"] == pytest.approx(sse / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    # identity normalisation: MSE in raw units
    assert row["mse_per_dim"] == pytest.approx(sse / x.size, rel=1e-4)
    assert row["l0"] == pytest.approx((z != 0).sum(1).mean())
    assert row["arch"] == "saelens:topk" and row["k"] == K


def test_match_two_saelens_seeds_in_one_command(tmp_path, raw_set, capsys):
    """A stability report for two SAELens SAEs; B is A's dictionary signed-permuted (with
    the encoder to match), so every number has a known answer."""
    acts, _ = raw_set
    cfg, t = write_saelens(tmp_path / "a", "abstopk", unit_rows=True)
    rng = np.random.default_rng(5)
    perm, sign = rng.permutation(N), rng.choice([-1.0, 1.0], N).astype(np.float32)
    tb = {"W_enc": t["W_enc"][:, perm] * sign, "b_enc": t["b_enc"][perm] * sign,
          "W_dec": t["W_dec"][perm] * sign[:, None], "b_dec": t["b_dec"]}
    # safetensors writes the buffer as is: a column-permuted array must be made C-ordered
    tb = {k: np.ascontiguousarray(v) for k, v in tb.items()}
    (tmp_path / "b").mkdir()
    save_file(tb, str(tmp_path / "b" / "sae_weights.safetensors"))
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    rc = main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--activations", str(acts.path),
               "--out", str(tmp_path / "m.parquet")])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert s["mean_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert s["code_pearson_active"] == pytest.approx(1.0, abs=1e-5)
    assert s["code_jaccard"] == pytest.approx(1.0, abs=1e-9)
    assert s["code_rel_dist"] == pytest.approx(0.0, abs=1e-5)


def test_ric_of_a_sparsify_folder(tmp_path, raw_set, capsys):
    acts, _ = raw_set
    write_sparsify(tmp_path / "sp")
    rc = main(["ric", str(tmp_path / "sp"), "--activations", str(acts.path), "--pairs", "50"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["pairs"] == 50 and s["support_source"] == "encoder"


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("arch,extra,isae_arch", [
    ("topk", {}, "topk"),
    ("topk", {"rescale_acts_by_decoder_norm": True}, "topk"),
    ("abstopk", {"apply_b_dec_to_input": False}, "topk+signed"),
    ("standard", {}, "relu"),
])
def test_import_is_exact(tmp_path, raw_set, capsys, arch, extra, isae_arch):
    acts, _ = raw_set
    unit = arch != "standard" and not extra.get("rescale_acts_by_decoder_norm")
    cfg, t = write_saelens(tmp_path / "s", arch, unit_rows=unit, **extra)
    assert main(["import", str(tmp_path / "s"), "--out", str(tmp_path / "ck")]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == isae_arch
    saved = json.loads((tmp_path / "ck" / "cfg.json").read_text())
    assert saved["source"]["format"] == "saelens" and saved["source"]["cfg"] == cfg
    assert saved["normalization"]["scale"] == 1.0 and not any(saved["normalization"]["mean"])
    ck = checkpoints.load(tmp_path / "ck")
    assert isinstance(ck.model, SparseCoder)
    x = _x(acts)
    ref, z = saelens_forward(cfg, t, x)
    np.testing.assert_allclose(ck.reconstruct_raw(x.astype(np.float32)).numpy(), ref, atol=3e-5)
    assert support_sets(ck.encode_raw(x.astype(np.float32)).dense(N).numpy()) == support_sets(z)


@pytest.mark.parametrize("arch,message", [
    ("topk", "decoder rows are not unit norm"),
    ("jumprelu", "isae has no JumpReLU architecture"),
])
def test_import_refuses_what_it_cannot_hold(tmp_path, capsys, arch, message):
    write_saelens(tmp_path / "s", arch, unit_rows=False)
    assert main(["import", str(tmp_path / "s"), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "read the folder as it is" in err[0]
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def isae_ckpts(tmp_path_factory, raw_set):
    """One checkpoint per architecture, with non-trivial biases and a real normalisation."""
    acts, _ = raw_set
    tmp = tmp_path_factory.mktemp("ex")
    out = {}
    for arch in ("topk", "isae", "isae-iter", "relu", "dl"):
        m = SparseCoder(SAEConfig.from_arch(arch, d_in=D, d_sae=N, k=K, seed=1))
        if arch in ("topk", "relu"):
            with torch.no_grad():
                m.b_dec.normal_(0, 0.3)
                m.b_enc.normal_(0, 0.1)
        out[arch] = checkpoints.save(m, tmp / arch, acts.normalizer(),
                                     extra={"activations": {"hook": "blocks.0.hook_resid_post"}})
    return out


@pytest.mark.parametrize("arch,fmt,saelens_arch", [
    ("topk", "saelens", "topk"), ("isae", "saelens", "abstopk"), ("relu", "saelens", "standard"),
    ("topk", "sparsify", None),
])
def test_exact_exports_read_back_identical(tmp_path, raw_set, isae_ckpts, capsys, arch, fmt, saelens_arch):
    acts, _ = raw_set
    out = tmp_path / "o"
    assert main(["export", str(isae_ckpts[arch]), "--format", fmt, "--out", str(out),
                 "--activations", str(acts.path)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["exact"] is True and s["same_support"] == 1.0
    assert s["fvu_exported"] == pytest.approx(s["fvu_isae"], rel=1e-5)
    folder = out if fmt == "saelens" else out / "blocks.0.hook_resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["isae"] == json.loads((isae_ckpts[arch] / "cfg.json").read_text())
    assert cfg["isae_export"] == {"format": fmt, "exact": True, "lost": []}
    if fmt == "saelens":
        assert cfg["architecture"] == saelens_arch
        assert cfg["activation_fn_str"] == ("relu" if saelens_arch == "standard" else saelens_arch)
        # the library's forward pass, in NumPy, on the exported files
        from safetensors.numpy import load_file
        t = load_file(str(folder / "sae_weights.safetensors"))
        ref, _ = saelens_forward(cfg, t, _x(acts))
        ours = checkpoints.load(isae_ckpts[arch]).reconstruct_raw(_x(acts).astype(np.float32))
        np.testing.assert_allclose(ref, ours.numpy(), atol=3e-5)
    back = checkpoints.load(out)
    x = _x(acts).astype(np.float32)
    np.testing.assert_allclose(back.reconstruct_raw(x).numpy(),
                               checkpoints.load(isae_ckpts[arch]).reconstruct_raw(x).numpy(), atol=3e-5)


@pytest.mark.parametrize("arch,fmt,message", [
    ("isae", "sparsify", "the codes are signed"),
    ("isae-iter", "saelens", "3 iterative-thresholding steps"),
    ("isae-iter", "sparsify", "3 iterative-thresholding steps"),
    ("dl", "saelens", "orthogonal matching pursuit"),
    ("dl", "sparsify", "orthogonal matching pursuit"),
])
def test_unrepresentable_export_is_refused_then_lossy(tmp_path, raw_set, isae_ckpts, capsys, caplog,
                                                      arch, fmt, message):
    acts, _ = raw_set
    out = tmp_path / "o"
    assert main(["export", str(isae_ckpts[arch]), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--lossy" in err[0]
    assert not out.exists()

    rc = main(["export", str(isae_ckpts[arch]), "--format", fmt, "--out", str(out), "--lossy",
               "--activations", str(acts.path)])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["exact"] is False
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and message in warning[0]
    assert f"{s['fvu_isae']:.4f} -> {s['fvu_exported']:.4f}" in warning[0]
    # the measured FVU of the export is the library's, recomputed here in NumPy
    folder = out if fmt == "saelens" else out / "blocks.0.hook_resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["isae_export"]["exact"] is False and message in " ".join(cfg["isae_export"]["lost"])
    from safetensors.numpy import load_file
    x = _x(acts)
    if fmt == "saelens":
        t = load_file(str(folder / "sae_weights.safetensors"))
        ref, _ = saelens_forward(cfg, t, x)
    else:
        t = load_file(str(folder / "sae.safetensors"))
        ref, _ = sparsify_forward(cfg, t, x)
    fvu = ((x - ref) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert s["fvu_exported"] == pytest.approx(fvu, rel=1e-4)
    assert s["fvu_exported"] != pytest.approx(s["fvu_isae"], rel=1e-3)


def test_lossy_without_activations_says_how_to_measure(tmp_path, isae_ckpts, caplog):
    rc = main(["export", str(isae_ckpts["isae"]), "--format", "sparsify", "--out",
               str(tmp_path / "o"), "--lossy"])
    assert rc == 0 and "pass --activations SET to measure the FVU change" in caplog.text


def test_relu_to_sparsify_is_refused_even_lossy(tmp_path, isae_ckpts, capsys):
    rc = main(["export", str(isae_ckpts["relu"]), "--format", "sparsify", "--out",
               str(tmp_path / "o"), "--lossy"])
    assert rc == 2 and "no relu architecture" in capsys.readouterr().err


def test_export_of_a_foreign_folder_is_refused(tmp_path, capsys):
    write_saelens(tmp_path / "s", "topk")
    rc = main(["export", str(tmp_path / "s"), "--format", "sparsify", "--out", str(tmp_path / "o")])
    assert rc == 2 and "already a saelens folder" in capsys.readouterr().err


def test_codes_compare_across_normalisations(tmp_path, raw_set, isae_ckpts, capsys):
    """An isae checkpoint (codes in its normalised space) against its own SAELens export
    (identity normalisation, codes in raw units): the same codes once both are in raw units."""
    acts, _ = raw_set
    assert abs(acts.normalizer().scale - 1) > 0.3  # a wrong unit would show
    main(["export", str(isae_ckpts["isae"]), "--format", "saelens", "--out", str(tmp_path / "e")])
    capsys.readouterr()
    assert main(["match", str(isae_ckpts["isae"]), str(tmp_path / "e"), "--activations",
                 str(acts.path)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mean_abs_cos"] == pytest.approx(1.0, abs=1e-6) and s["code_jaccard"] == 1.0
    assert s["code_rel_dist"] == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- cfg vs tensors


def _one_line_refusal(capsys, argv, fragment) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    return err[0]


def _isae_folder(path, cfg: dict, tensors: dict) -> None:
    path.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"version": 1, "d_in": D, "d_sae": N, "k": K, **cfg}))


ISAE_FIELDS = {"arch": "isae", "kind": "topk", "signed": True, "tied": True, "bias": "none",
               "encoder_steps": 0}


def _consistent(tied: bool) -> tuple[dict, dict]:
    """A valid isae (tied, no bias) or topk checkpoint's cfg fields and tensors."""
    t0 = _rng_tensors(0, unit_rows=True)
    if tied:
        return ISAE_FIELDS, {"W_dec": t0["W_dec"], "W_enc": t0["W_dec"].T, "b_enc": np.zeros(N),
                             "b_dec": np.zeros(D)}
    return {"arch": "topk"}, {k: t0[k] for k in ("W_dec", "W_enc", "b_enc", "b_dec")}


@pytest.mark.parametrize("cfg,drop,change,message", [
    # the case: tied arch on untied weights would drop W_enc
    (ISAE_FIELDS, (), {"W_enc": "untied"}, "W_enc is not W_dec transposed"),
    # dl would compute OMP codes on a folder every table calls topk
    ({"arch": "topk", "kind": "dl"}, (), {}, "arch 'topk' means kind='topk', not kind='dl'"),
    ({**ISAE_FIELDS, "signed": False}, (), {}, "arch 'isae' means signed=True, not signed=False"),
    ({**ISAE_FIELDS, "arch": "isae-iter"}, (), {},
     "arch 'isae-iter' means encoder_steps=3, not encoder_steps=0"),
    (ISAE_FIELDS, (), {"b_dec": "nonzero"}, "b_dec is not zero"),
    ({"arch": "topk"}, ("W_enc",), {}, "has no W_enc, which the untied arch 'topk' needs"),
    ({"arch": "topk"}, ("b_enc",), {}, "has no b_enc, which arch 'topk' (bias learned) needs"),
    ({"arch": "topk"}, (), {"threshold": "extra"}, "holds tensor(s) threshold that an isae"),
    ({"arch": "topk", "k": 2.7}, (), {}, "k must be an integer, not 2.7"),
    ({"arch": "no-such-arch"}, (), {}, "unknown arch 'no-such-arch'"),
])
def test_cfg_that_contradicts_the_tensors_is_refused(tmp_path, raw_set, capsys, cfg, drop, change, message):
    """Each folder is a valid checkpoint but for one contradiction between cfg.json and
    sae.safetensors (or within cfg.json), which is refused in one line instead of being
    loaded as something else; the valid folder itself loads."""
    acts, _ = raw_set
    tied = cfg.get("tied", False)
    good_cfg, t = _consistent(tied)
    _isae_folder(tmp_path / "ok", good_cfg, t)
    assert main(["eval", str(tmp_path / "ok"), "--activations", str(acts.path)]) == 0
    capsys.readouterr()
    t = {k: v for k, v in t.items() if k not in drop}
    other = _rng_tensors(5, unit_rows=True)
    for name, how in change.items():
        t[name] = {"untied": other["W_enc"], "nonzero": other["b_dec"], "extra": np.ones(N)}[how]
    _isae_folder(tmp_path / "ck", cfg, t)
    _one_line_refusal(capsys, ["eval", str(tmp_path / "ck"), "--activations", str(acts.path)], message)


def test_fields_a_cfg_leaves_out_follow_its_arch_name(tmp_path, raw_set):
    """A cfg.json with ``arch: isae`` and no switch fields is read as isae (signed, tied, no
    bias), not with the class defaults (TopK with ReLU): its codes are the float64 signed
    TopK of x W_dec^T."""
    acts, _ = raw_set
    t0 = _rng_tensors(1, unit_rows=True)
    _isae_folder(tmp_path / "ck", {"arch": "isae"},
                 {"W_dec": t0["W_dec"], "W_enc": t0["W_dec"].T, "b_enc": np.zeros(N), "b_dec": np.zeros(D)})
    ck = checkpoints.load(tmp_path / "ck")
    assert (ck.model.cfg.signed, ck.model.cfg.tied, ck.model.cfg.bias) == (True, True, "none")
    x = _x(acts)
    ref, z = saelens_forward({"architecture": "abstopk", "k": K},
                             {"W_enc": t0["W_dec"].T, "W_dec": t0["W_dec"], "b_enc": np.zeros(N),
                              "b_dec": np.zeros(D)}, x)
    dense = ck.encode_raw(x.astype(np.float32)).dense(N).numpy()
    assert (z < 0).any() and support_sets(dense) == support_sets(z)
    np.testing.assert_allclose(dense, z, atol=2e-5)


@pytest.mark.parametrize("writer,kw,message", [
    ("sparsify", {"k": 2.7}, "k must be an integer, not 2.7"),
    ("sparsify", {"num_latents": N + 1}, f"num_latents {N + 1} but the tensors have {N}"),
    ("sparsify", {"num_latents": 0, "expansion_factor": 3}, f"is {3 * D} latents, but the tensors have {N}"),
    ("sparsify", {"d_in": D + 1}, f"d_in {D + 1} but the tensors have {D}"),
    ("saelens", {"k": 2.7}, "k must be an integer, not 2.7"),
    ("saelens", {"d_sae": N - 1}, f"d_sae {N - 1} but the tensors have {N}"),
    ("saelens", {"architecture": "batchtopk"}, "save_inference_model"),
    ("saelens", {"architecture": "matryoshka_batchtopk"}, "save_inference_model"),
    ("saelens", {"normalize_activations": "covariance_whitening"}, "identity there"),
])
def test_foreign_cfg_that_contradicts_its_tensors_is_refused(tmp_path, raw_set, capsys, writer, kw, message):
    acts, _ = raw_set
    if writer == "saelens":
        write_saelens(tmp_path / "f", "topk", **kw)
    else:
        write_sparsify(tmp_path / "f", **kw)
    _one_line_refusal(capsys, ["eval", str(tmp_path / "f"), "--activations", str(acts.path)], message)


@pytest.mark.parametrize("writer,extra", [("saelens", "threshold"), ("sparsify", "W_skip")])
def test_foreign_folder_with_a_tensor_isae_does_not_know_is_refused(tmp_path, raw_set, capsys, writer, extra):
    acts, _ = raw_set
    folder = tmp_path / "f"
    if writer == "saelens":
        _, t = write_saelens(folder, "topk")
        name = "sae_weights.safetensors"
    else:
        _, t = write_sparsify(folder)
        name = "sae.safetensors"
    save_file({**t, extra: np.ones((N,) if extra == "threshold" else (D, D), np.float32)},
              str(folder / name))
    _one_line_refusal(capsys, ["eval", str(folder), "--activations", str(acts.path)],
                      f"holds tensor(s) {extra} that isae does not know")


def test_sparsify_multi_topk_says_what_isae_evaluates(tmp_path, raw_set, caplog):
    """sparsify's forward() returns the top-4k reconstruction when multi_topk is set; isae
    evaluates the k-sparse code (the library's encode then decode) and says so."""
    acts, _ = raw_set
    cfg, t = write_sparsify(tmp_path / "sp", multi_topk=True)
    ck = checkpoints.load(tmp_path / "sp")
    assert f"top 4k = {4 * K} latents" in caplog.text and f"keeps k = {K}" in caplog.text
    x = _x(acts)
    ref, _ = sparsify_forward(cfg, t, x)
    np.testing.assert_allclose(ck.reconstruct_raw(x.astype(np.float32)).numpy(), ref, atol=2e-5)


# ----------------------------------------------------------------------------- legacy scaling_factor


def _legacy_saelens(path, sf, flag: bool | None) -> tuple[dict, dict]:
    """A SAELens < 6 folder (no version stamp) with a ``scaling_factor`` tensor."""
    cfg, t = write_saelens(path, "standard", metadata={}, activation_fn_str="relu",
                           **({} if flag is None else {"finetuning_scaling_factor": flag}))
    save_file({**t, "scaling_factor": sf.astype(np.float32)}, str(path / "sae_weights.safetensors"))
    return cfg, t


def test_legacy_scaling_factor_is_applied_as_saelens_applied_it(tmp_path, raw_set):
    """SAELens < 6 multiplied the codes by scaling_factor before the decoder (when
    finetuning_scaling_factor is set): the same reconstruction here, in float64."""
    acts, _ = raw_set
    sf = np.random.default_rng(4).uniform(0.5, 2.0, N)
    cfg, t = _legacy_saelens(tmp_path / "s", sf, flag=True)
    x = _x(acts)
    _, z = saelens_forward(cfg, t, x)
    ref = (z * sf) @ t["W_dec"].astype(np.float64) + t["b_dec"]
    ck = checkpoints.load(tmp_path / "s")
    np.testing.assert_allclose(ck.reconstruct_raw(x.astype(np.float32)).numpy(), ref, atol=3e-5)
    # all ones is no factor at all (SAELens 6 drops it too)
    cfg1, t1 = _legacy_saelens(tmp_path / "ones", np.ones(N), flag=None)
    np.testing.assert_allclose(checkpoints.load(tmp_path / "ones").reconstruct_raw(x.astype(np.float32)).numpy(),
                               saelens_forward(cfg1, t1, x)[0], atol=3e-5)


@pytest.mark.parametrize("flag", [None, False])
def test_legacy_scaling_factor_without_its_flag_is_refused(tmp_path, raw_set, capsys, flag):
    acts, _ = raw_set
    _legacy_saelens(tmp_path / "s", np.full(N, 2.0), flag=flag)
    _one_line_refusal(capsys, ["eval", str(tmp_path / "s"), "--activations", str(acts.path)],
                      "scaling_factor is not all ones but cfg.json does not set finetuning_scaling_factor")


# ----------------------------------------------------------------------------- own exports back in


@pytest.mark.parametrize("arch,fmt,imported", [
    ("topk", "saelens", "topk"), ("isae", "saelens", "topk+signed"), ("topk", "sparsify", "topk"),
])
def test_isae_imports_its_own_exports(tmp_path, raw_set, isae_ckpts, capsys, arch, fmt, imported):
    """Every export's decoder rows have the set's scale s != 1 as their common norm; the
    import folds s into the encoder and computes what the checkpoint computes: the same
    raw reconstructions, and codes in raw units (the checkpoint's codes times s)."""
    acts, _ = raw_set
    s = acts.normalizer().scale
    assert abs(s - 1) > 0.3
    assert main(["export", str(isae_ckpts[arch]), "--format", fmt, "--out", str(tmp_path / "e")]) == 0
    assert main(["import", str(tmp_path / "e"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["arch"] == imported
    orig, back = checkpoints.load(isae_ckpts[arch]), checkpoints.load(tmp_path / "back")
    x = _x(acts).astype(np.float32)
    np.testing.assert_allclose(back.reconstruct_raw(x).numpy(), orig.reconstruct_raw(x).numpy(), atol=3e-5)
    zo, zb = orig.encode_raw(x).dense(N).numpy(), back.encode_raw(x).dense(N).numpy()
    assert support_sets(zb) == support_sets(zo)
    np.testing.assert_allclose(zb, zo * s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(back.W_dec.numpy(), axis=1), 1, atol=1e-6)
