"""``isae match`` and ``isae ric`` end to end through ``isae.cli.main``: tables, summaries,
ground truth with its scale, and bad input (exit 2, one line)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from isae.cli.main import main
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet, ActivationWriter, Normalizer
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err


def _error_line(err: str, cmd: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"isae {cmd}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _save(path, arch, d, n, k, seed, norm, tensors=None):
    model = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=seed))
    if tensors is not None:
        model.load_exported(tensors)
    return checkpoint.save(model, path, norm)


def _signed_permuted(tensors: dict, perm: np.ndarray, sign: np.ndarray) -> dict:
    p, s = torch.as_tensor(perm), torch.as_tensor(sign, dtype=torch.float32)
    return {"W_dec": tensors["W_dec"][p] * s[:, None], "W_enc": tensors["W_enc"][:, p] * s[None, :],
            "b_enc": tensors["b_enc"][p], "b_dec": tensors["b_dec"]}


def test_truth_against_itself(synthetic_set, tmp_path, capsys):
    truth = synthetic_set / "truth"
    rc, s, _ = _run(capsys, "match", truth, truth, "--activations", synthetic_set,
                    "--out", tmp_path / "m.parquet", "--summary", tmp_path / "s.parquet")
    assert rc == 0
    assert s["mean_abs_cos"] == pytest.approx(1.0) and s["truth_a"] and s["truth_b"]
    assert s["code_pearson_all"] == pytest.approx(1.0) and s["code_jaccard"] == 1.0
    assert s["code_rel_dist"] == 0.0
    assert s["code_rows"] == ActivationSet(synthetic_set).meta["heldout_rows"]
    table = pd.read_parquet(tmp_path / "m.parquet")
    assert len(table) == 128 and (table.a == table.b).all() and (table.sign == 1).all()
    assert {"pearson_all", "pearson_active", "active_a", "active_b", "active_both"} <= set(table)
    summary = pd.read_parquet(tmp_path / "s.parquet")
    assert len(summary) == 1 and summary.mean_abs_cos[0] == pytest.approx(s["mean_abs_cos"])


def test_model_against_its_signed_permuted_copy(synthetic_set, tmp_path, capsys):
    norm = ActivationSet(synthetic_set).normalizer()
    a = _save(tmp_path / "a", "isae", 32, 128, 3, 1, norm)
    rng = np.random.default_rng(0)
    perm, sign = rng.permutation(128), rng.choice([-1, 1], 128)
    t = checkpoint.load(a).model.export_tensors()
    b = _save(tmp_path / "b", "isae", 32, 128, 3, 1, norm, _signed_permuted(t, perm, sign))
    rc, s, _ = _run(capsys, "match", a, b, "--activations", synthetic_set, "--out", tmp_path / "m.pq")
    assert rc == 0
    for key in ("mean_abs_cos", "frac_gt_0.9", "code_pearson_all", "code_pearson_active", "code_jaccard"):
        assert s[key] == pytest.approx(1.0, abs=1e-6), key
    assert s["code_rel_dist"] == pytest.approx(0.0, abs=1e-6)
    table = pd.read_parquet(tmp_path / "m.pq").set_index("a")
    inv = np.argsort(perm)
    np.testing.assert_array_equal(table.loc[np.arange(128), "b"], inv)
    np.testing.assert_array_equal(table.loc[np.arange(128), "sign"], sign[inv])


def test_true_codes_are_put_in_the_models_units(tmp_path, capsys):
    """An orthonormal truth, noiseless data with mean exactly 0 and scale far from 1, and a
    tied signed model whose dictionary is the truth signed-permuted: its codes are exactly
    the true codes / scale (in the model's normalised space), so the relative code distance
    is 0 only if the true codes are rescaled correctly."""
    d, k, R = 16, 2, 2000
    rng = np.random.default_rng(1)
    D = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    idx = np.argsort(rng.random((R, d)), axis=1)[:, :k]
    val = (20.0 * (rng.random((R, k)) + 0.5) * rng.choice([-1, 1], (R, k))).astype(np.float32)
    idx, val = np.concatenate([idx, idx]), np.concatenate([val, -val])  # x and -x: mean 0
    x = np.einsum("rk,rkd->rd", val.astype(np.float64), D[idx].astype(np.float64))
    held = np.tile(np.arange(R) % 10 == 0, 2)
    out = tmp_path / "set"
    with ActivationWriter(out, d, source="test") as w:
        w.add(x, held, z_idx=idx.astype(np.int32), z_val=val)
    acts = ActivationSet(out)
    norm = acts.normalizer()
    assert norm.scale > 3 and np.abs(norm.mean).max() < 1e-5
    truth = SparseCoder(SAEConfig(d_in=d, d_sae=d, k=k, arch="truth", kind="dl", signed=True,
                                  tied=True, bias="none"))
    with torch.no_grad():
        truth.W_dec.copy_(torch.from_numpy(D))
    checkpoint.save(truth, out / "truth", norm)
    perm, sign = rng.permutation(d), rng.choice([-1, 1], d)
    t = {"W_dec": torch.from_numpy(D), "W_enc": torch.from_numpy(D).T.contiguous(),
         "b_enc": torch.zeros(d), "b_dec": torch.zeros(d)}
    model = _save(tmp_path / "m", "isae", d, d, k, 0, norm, _signed_permuted(t, perm, sign))
    rc, s, _ = _run(capsys, "match", model, out / "truth", "--activations", out)
    assert rc == 0
    assert s["mean_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert s["code_jaccard"] == 1.0 and s["code_pearson_all"] == pytest.approx(1.0, abs=1e-6)
    assert s["code_rel_dist"] == pytest.approx(0.0, abs=1e-5)
    assert s["code_rows"] == int(held.sum())


def test_ric_model_and_truth(synthetic_set, tmp_path, capsys):
    norm = ActivationSet(synthetic_set).normalizer()
    a = _save(tmp_path / "a", "isae", 32, 128, 3, 1, norm)
    rc, s, _ = _run(capsys, "ric", a, "--activations", synthetic_set, "--pairs", 300,
                    "--out", tmp_path / "r.pq", "--summary", tmp_path / "rs.pq")
    assert rc == 0 and s["support_source"] == "encoder" and s["pairs"] == 300 and s["k"] == 3
    table = pd.read_parquet(tmp_path / "r.pq")
    assert table.groupby("kind").size().to_dict() == {
        "gaussian": 300, "observed": 300, "random_support": 300, "truth": 300}
    obs = table[table.kind == "observed"]
    assert obs["size"].between(3, 6).all()
    assert s["observed_q50"] == pytest.approx(obs.delta.median())
    assert s["delta_2k_lower_bound"] == pytest.approx(obs.delta[obs["size"] == 6].max())
    assert len(pd.read_parquet(tmp_path / "rs.pq")) == 1

    rc, s, _ = _run(capsys, "ric", synthetic_set / "truth", "--activations", synthetic_set,
                    "--pairs", 200, "--out", tmp_path / "t.pq")
    assert rc == 0 and s["support_source"] == "true codes"
    table = pd.read_parquet(tmp_path / "t.pq")
    assert set(table.kind) == {"observed", "random_support", "gaussian"}
    assert table["size"].between(3, 6).all()


@pytest.fixture
def plain_set(tmp_path):
    """A d-32 set with no true codes (and no truth)."""
    out = tmp_path / "plain"
    rng = np.random.default_rng(0)
    with ActivationWriter(out, 32, source="test") as w:
        w.add(rng.normal(size=(40, 32)), np.arange(40) % 4 == 0)
    return out


def test_bad_input_exits_2_with_one_line(synthetic_set, plain_set, tmp_path, capsys):
    norm32 = ActivationSet(synthetic_set).normalizer()
    a = _save(tmp_path / "a", "isae", 32, 64, 3, 1, norm32)
    c = _save(tmp_path / "c", "isae", 24, 64, 3, 1, Normalizer(np.zeros(24, np.float32), 1.0))
    truth = synthetic_set / "truth"

    rc, _, err = _run(capsys, "match", a, c)
    assert rc == 2 and "d_in" in _error_line(err, "match")
    rc, _, err = _run(capsys, "match", c, c, "--activations", synthetic_set)
    assert rc == 2 and "d=32" in _error_line(err, "match")
    rc, _, err = _run(capsys, "ric", c, "--activations", synthetic_set)
    assert rc == 2 and "d=32" in _error_line(err, "ric")
    # plain_set has 10 held-out rows: C(10, 2) = 45 pairs.
    rc, _, err = _run(capsys, "ric", a, "--activations", plain_set, "--pairs", 46)
    assert rc == 2 and "45 distinct pairs" in _error_line(err, "ric")
    rc, _, err = _run(capsys, "ric", a, "--activations", synthetic_set, "--max-rows", 5, "--pairs", 11)
    assert rc == 2 and "10 distinct pairs" in _error_line(err, "ric")
    rc, _, err = _run(capsys, "match", a, truth, "--activations", plain_set)
    assert rc == 2 and "no true codes" in _error_line(err, "match")
    rc, _, err = _run(capsys, "ric", truth, "--activations", plain_set)
    assert rc == 2 and "no true codes" in _error_line(err, "ric")
    # The pair count of a set that can serve it is fine.
    rc, s, _ = _run(capsys, "ric", a, "--activations", plain_set, "--pairs", 45)
    assert rc == 0 and s["pairs"] == 45
