"""The synthetic source: rows follow the stated generative model, the truth loads, the split
is by document, reruns are byte-identical, bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from isae.cli import main as cli
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet, heldout_mask
from isae.data.sources import synthetic


def _all(path):
    return ActivationSet(path).load("all", columns=["row", "doc", "z_idx", "z_val"])


def _truth(path) -> np.ndarray:
    return checkpoint.load_decoder(path / "truth").double().numpy()


# ----------------------------------------------------------------------------- the model


def test_rows_are_true_codes_times_true_dictionary_plus_noise(synthetic_set):
    gen = json.loads((synthetic_set / "meta.json").read_text())["generator"]
    data = _all(synthetic_set)
    W = _truth(synthetic_set)
    assert W.shape == (gen["atoms"], gen["d"])
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, atol=1e-6)
    idx, val = data["z_idx"], data["z_val"].astype(np.float64)
    assert idx.shape == val.shape == (gen["rows"], gen["k"])
    assert (np.diff(idx, axis=1) > 0).all()  # k distinct atoms, sorted
    # Signed coefficients, |z| >= 0.5 by construction, both signs about equally often.
    assert (np.abs(val) >= 0.5 - 1e-6).all()
    assert abs((val > 0).mean() - 0.5) < 0.02
    clean = np.einsum("nk,nkd->nd", val, W[idx])
    resid = data["x"].astype(np.float64) - clean
    # Gaussian noise of the configured std: 640k samples pin the std to ~0.1 %.
    assert resid.std() == pytest.approx(gen["noise"], rel=0.01)
    assert abs(resid.mean()) < 5 * gen["noise"] / np.sqrt(resid.size)
    # Noise independent across dimensions: the residual covariance is ~ noise^2 I.
    cov = np.cov(resid.T) / gen["noise"] ** 2
    np.testing.assert_allclose(cov, np.eye(gen["d"]), atol=0.03)


def _race_inclusion(p: np.ndarray, k: int) -> np.ndarray:
    """Exact P(atom i among the k winners) of the exponential race, by quadrature (float64).

    pi_i = int_0^inf p_i e^{-p_i t} P(fewer than k others finished by t) dt, the count of
    others being Poisson-binomial with probabilities 1 - e^{-p_j t} (computed by a DP).
    """
    log_t = np.linspace(np.log(1e-8), np.log(1e3 / p.min()), 1500)
    t = np.exp(log_t)
    q = -np.expm1(-np.outer(t, p))  # [T, atoms]: P(atom j finished by t)
    n = len(p)
    pmf = np.zeros((len(t), n, k))  # pmf of the count of others finished, per atom i
    pmf[:, :, 0] = 1.0
    for j in range(n):
        qj = q[:, j : j + 1].repeat(n, 1)
        qj[:, j] = 0.0  # atom i = j is not one of "the others"
        new = pmf * (1 - qj)[..., None]
        new[:, :, 1:] += pmf[:, :, :-1] * qj[..., None]
        pmf = new
    dens = p * np.exp(-np.outer(t, p)) * pmf.sum(-1)  # [T, atoms]
    return np.trapezoid(dens * t[:, None], log_t, axis=0)


def test_atom_frequencies_follow_zipf(synthetic_set):
    gen = json.loads((synthetic_set / "meta.json").read_text())["generator"]
    idx = _all(synthetic_set)["z_idx"]
    counts = np.bincount(idx.ravel(), minlength=gen["atoms"]).astype(np.float64)
    p = synthetic.zipf_weights(gen["atoms"], gen["zipf"])
    np.testing.assert_allclose(p[0] / p[9], 10.0 ** gen["zipf"])
    pi = _race_inclusion(p, gen["k"])
    assert pi.sum() == pytest.approx(gen["k"], rel=1e-4)  # the quadrature is right
    expected = gen["rows"] * pi
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi^2 with ~127 degrees of freedom: mean 127, sd 16.
    assert chi2 < 127 + 6 * 16, chi2
    # Frequency falls with rank; in the tail it falls as rank^-zipf.
    ranks = np.arange(1, gen["atoms"] + 1)
    assert np.corrcoef(np.argsort(np.argsort(-counts)), ranks)[0, 1] > 0.95
    tail = slice(15, None)
    slope = np.polyfit(np.log(ranks[tail]), np.log(counts[tail]), 1)[0]
    assert slope == pytest.approx(-gen["zipf"], abs=0.15)


def test_uniform_frequencies_with_zipf_zero(tmp_path):
    synthetic.extract(out=str(tmp_path / "u"), d=8, atoms=16, k=2, rows=8000, zipf=0.0)
    idx = _all(tmp_path / "u")["z_idx"]
    counts = np.bincount(idx.ravel(), minlength=16)
    expected = 8000 * 2 / 16
    assert ((counts - expected) ** 2 / expected).sum() < 15 + 6 * 5.5


def test_correlated_supports_stay_in_blocks(tmp_path):
    synthetic.extract(out=str(tmp_path / "c"), d=8, atoms=32, k=2, rows=4000, correlation=1.0)
    synthetic.extract(out=str(tmp_path / "i"), d=8, atoms=32, k=2, rows=4000, correlation=0.0)
    pairs_c = {tuple(r) for r in _all(tmp_path / "c")["z_idx"]}
    pairs_i = {tuple(r) for r in _all(tmp_path / "i")["z_idx"]}
    # Blocks of 2k = 4 atoms: 8 blocks x 6 pairs at most; independent rows see most pairs.
    assert len(pairs_c) <= 8 * 6
    assert len(pairs_i) > 300


def test_truth_loads_as_a_checkpoint_and_encodes_raw_rows(synthetic_set):
    s = ActivationSet(synthetic_set)
    assert s.has_truth
    ck = checkpoint.load(synthetic_set / "truth")
    cfg = ck.cfg
    assert (cfg["version"], cfg["arch"], cfg["kind"]) == (1, "truth", "dl")
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["seed"]) == (32, 128, 3, 0)
    np.testing.assert_array_equal(ck.norm.mean, np.asarray(s.meta["mean"], np.float32))
    assert ck.norm.scale == s.meta["scale"]
    from safetensors.numpy import load_file

    t = load_file(str(synthetic_set / "truth" / "sae.safetensors"))
    assert {k: v.dtype for k, v in t.items()} == dict.fromkeys(
        ["W_enc", "W_dec", "b_enc", "b_dec"], np.float32)
    np.testing.assert_array_equal(t["W_enc"], t["W_dec"].T)
    assert not t["b_enc"].any() and not t["b_dec"].any()
    # OMP over the true dictionary finds the true support of most low-noise rows, and its
    # raw reconstruction error is of the order of the noise.
    held = s.load("heldout", columns=["z_idx"], max_rows=1000)
    codes = ck.encode_raw(held["x"])
    found = np.sort(codes.idx.numpy(), axis=1)
    assert (found == held["z_idx"]).all(1).mean() > 0.9
    err = ck.reconstruct_raw(held["x"]).numpy() - held["x"]
    assert np.sqrt(np.median((err**2).mean(1))) < 3 * 0.01


def test_meta_constants_match_float64_recomputation(synthetic_set):
    meta = json.loads((synthetic_set / "meta.json").read_text())
    frames = [pd.read_parquet(p) for p in sorted(synthetic_set.glob("part-*.parquet"))]
    df = pd.concat(frames, ignore_index=True)
    assert len(df) == meta["rows"] == 20000
    x = np.stack(df["x"].to_numpy()).astype(np.float64)
    train = x[~df["heldout"].to_numpy()]
    mean = train.mean(0)
    scale = np.sqrt(((train - mean) ** 2).sum(1).mean() / meta["d"])
    np.testing.assert_allclose(meta["mean"], mean, rtol=0, atol=1e-9)
    assert meta["scale"] == pytest.approx(scale, rel=1e-9)
    assert meta["train_rows"] == len(train)
    assert meta["source"] == "synthetic" and meta["seed"] == 0
    assert meta["generator"]["noise"] == 0.01 and meta["generator"]["zipf"] == 1.0
    assert "numpy" in meta["versions"]
    # The plain pyarrow schema is the documented one.
    schema = pq.read_schema(min(synthetic_set.glob("part-*.parquet")))
    xt, it, vt = (schema.field(c).type for c in ("x", "z_idx", "z_val"))
    assert pa.types.is_fixed_size_list(xt) and xt.list_size == 32
    assert xt.value_type == pa.float32()
    assert pa.types.is_list(it) and it.value_type == pa.int32()
    assert pa.types.is_list(vt) and vt.value_type == pa.float32()
    assert df["row"].tolist() == list(range(20000))


def test_split_is_by_document(synthetic_set):
    data = _all(synthetic_set)
    doc, held = data["doc"], ActivationSet(synthetic_set).load("all", ["heldout"])["heldout"]
    np.testing.assert_array_equal(doc, data["row"] // synthetic.GROUP_ROWS)
    both = set(doc[held]) & set(doc[~held])
    assert not both
    np.testing.assert_array_equal(held, heldout_mask(doc, 0.1, 0))
    assert 0.03 < held.mean() < 0.2


def test_reruns_are_byte_identical_and_independent_of_shard_size(tmp_path):
    kw = {"d": 16, "atoms": 48, "k": 4, "rows": 3000, "noise": 0.05, "zipf": 1.2,
          "coherence": 0.85, "correlation": 0.2, "seed": 7}
    a = tmp_path / "a"
    b = tmp_path / "b"
    synthetic.extract(out=str(a), rows_per_shard=1000, **kw)
    synthetic.extract(out=str(b), rows_per_shard=1000, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "meta.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
        "truth/cfg.json", "truth/sae.safetensors"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # Another shard size, and more rows: the same rows first. Another seed: other rows.
    synthetic.extract(out=str(tmp_path / "c"), rows_per_shard=777, **{**kw, "rows": 3500})
    synthetic.extract(out=str(tmp_path / "d"), rows_per_shard=1000, **{**kw, "seed": 8})
    xa, xc = _all(a)["x"], _all(tmp_path / "c")["x"]
    np.testing.assert_array_equal(xa, xc[:3000])
    assert not np.allclose(xa, _all(tmp_path / "d")["x"])


# ----------------------------------------------------------------------------- the dictionary


def test_coherence_is_raised_and_lowered_to_target():
    rng = np.random.default_rng(0)
    D0, info0 = synthetic.make_dictionary(16, 40, rng)
    mu0 = info0["coherence"]
    # Independent check of the blocked coherence on a full Gram matrix.
    G = np.abs(D0 @ D0.T) - np.eye(40)
    assert mu0 == pytest.approx(G.max(), abs=1e-6)
    hi, info = synthetic.make_dictionary(16, 40, np.random.default_rng(0), coherence=0.9)
    assert info["coherence"] == pytest.approx(0.9, abs=1e-3)
    lo, info = synthetic.make_dictionary(16, 40, np.random.default_rng(0), coherence=0.45)
    assert mu0 > 0.5 and info["coherence"] <= 0.45 + 1e-6
    for D in (hi, lo):
        np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-12)
    floor = synthetic.welch_bound(16, 40)
    assert floor == pytest.approx(np.sqrt(24 / (16 * 39)))
    with pytest.raises(synthetic.UserError, match="Welch bound"):
        synthetic.make_dictionary(16, 40, np.random.default_rng(0), coherence=floor * 0.9)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "16"], "--k must satisfy"),
        (["--rows", "0"], "--rows must be >= 1"),
        (["--noise", "-1"], "--noise"),
        (["--correlation", "1.5"], "--correlation"),
        (["--coherence", "0.01"], "Welch bound"),
    ],
)
def test_bad_parameters_exit_2(tmp_path, capsys, args, message):
    base = ["--d", "8", "--atoms", "16", "--k", "2", "--rows", "100"]
    rc = cli.main(["extract", "synthetic", *base, *args, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "s").exists()


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli.main(["extract", "synthetic", "--d", "8", "--atoms", "16", "--k", "2",
                   "--rows", "100", "--out", str(blocker / "set")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot create" in err[0]


def test_cli_writes_a_set_and_prints_one_json_line(tmp_path, capsys):
    rc = cli.main(["extract", "synthetic", "--d", "8", "--atoms", "16", "--k", "2",
                   "--rows", "500", "--noise", "0.1", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    summary = json.loads(out[0])
    assert (summary["d"], summary["rows"], summary["atoms"]) == (8, 500, 16)
    assert ActivationSet(tmp_path / "s").has_truth
    assert torch.is_tensor(checkpoint.load_decoder(tmp_path / "s" / "truth"))


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real = synthetic.sample_rows
    calls, staged = [], []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            staged.extend(tmp_path.glob(".s.tmp-*/part-*.parquet"))
            raise RuntimeError("disk on fire")
        return real(*a, **kw)

    monkeypatch.setattr(synthetic, "sample_rows", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        # 64-row blocks (d * k is large), 50-row shards: shards exist when the error comes.
        synthetic.extract(out=str(tmp_path / "s"), d=65536, atoms=4, k=1, rows=1000,
                          rows_per_shard=50)
    assert len(staged) == 2
    assert list(tmp_path.iterdir()) == []
