"""The references a stability number is read against: chance levels drawn from the whole
training split (``isae chance``), the Gaussian set with the activations' moments (``isae
extract gaussian``) and the two halves of a set by document (``isae split``)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from isae.cli.main import main
from isae.data.activations import (
    ActivationSet,
    ActivationWriter,
    heldout_mask,
    sample_rows,
    split_counts,
    split_moments,
)


def _skewed_set(out, rows=12000, head=3000, d=16, seed=0, rows_per_shard=1000):
    """A set whose first ``head`` rows lie along one direction (a first document unlike
    the rest) and whose other rows are isotropic in the other d − 1 directions; doc =
    row // 100, held out by doc. -> (x [rows, d] float32, heldout [rows] bool)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((rows, d))
    x[:head, 0] = rng.standard_normal(head) * 3
    x[:head] += 0.05 * rng.standard_normal((head, d))
    x[head:, 1:] = rng.standard_normal((rows - head, d - 1))
    doc = np.arange(rows) // 100
    held = heldout_mask(doc, 0.1, 0)
    with ActivationWriter(out, d, source="test", rows_per_shard=rows_per_shard) as w:
        w.add(x, held, doc=doc, pos=np.arange(rows) % 100)
    return x.astype(np.float32), held


# ----------------------------------------------------------------------------- sampling


def test_sample_rows_is_uniform_over_the_whole_split_and_reads_the_right_rows(tmp_path):
    x, held = _skewed_set(tmp_path / "s")
    acts = ActivationSet(tmp_path / "s")
    train = x[~held]
    assert split_counts(acts).sum() == len(train)
    assert split_counts(acts, "heldout").sum() == held.sum()
    s = sample_rows(acts, 2000, seed=3, columns=["doc"])
    # The same rows as the draw's indices into the split, read whole (the reference).
    pick = np.sort(np.random.default_rng(3).choice(len(train), 2000, replace=False))
    np.testing.assert_array_equal(s["x"], train[pick])
    np.testing.assert_array_equal(s["doc"], (np.arange(len(x)) // 100)[~held][pick])
    # Spread over the split: the share of rows from the first (unlike) 3000 is about
    # their share of the split, not 1 as for the first 2000 rows.
    share = (~held[:3000]).sum() / len(train)
    assert abs(np.mean(s["doc"] < 30) - share) < 0.04
    # All rows when the split has no more than asked, in split order.
    np.testing.assert_array_equal(sample_rows(acts, 10**6, seed=0)["x"], train)


def test_split_moments_match_a_float64_reference(tmp_path):
    x, held = _skewed_set(tmp_path / "s")
    mean, cov, n = split_moments(ActivationSet(tmp_path / "s"))
    t = x[~held].astype(np.float64)
    assert n == len(t)
    np.testing.assert_allclose(mean, t.mean(0), atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(t, rowvar=False), atol=1e-9)


def test_chance_gives_the_level_of_the_whole_split_when_the_first_rows_are_unlike_it(
        tmp_path, capsys):
    """Acceptance: the set's first rows lie along one direction; the rest do not. The
    data-shaped chance levels must be those of the whole training split, not of its head."""
    from isae.analysis.matching import chance_levels

    x, held = _skewed_set(tmp_path / "s")
    out = tmp_path / "chance.parquet"
    assert main(["-q", "chance", "--activations", str(tmp_path / "s"), "--width", "32",
                 "--draws", "6", "--sample-rows", "2000", "--out", str(out)]) == 0
    json.loads(capsys.readouterr().out)
    got = pd.read_parquet(out).groupby("kind")["mean_abs_cos"].mean()

    acts = ActivationSet(tmp_path / "s")
    norm = acts.normalizer()

    def level(rows, seed):
        r = torch.as_tensor((rows - norm.mean) / norm.scale, dtype=torch.float64)
        t = chance_levels(32, 16, rows=r, draws=6, seed=seed, kinds=("data_rows", "data_cov"))
        return t.groupby("kind")["mean_abs_cos"].mean()

    train = x[~held]
    whole = level(train, seed=11)   # every training row: the reference
    head = level(train[:2000], seed=11)  # what reading the first 2000 rows gave
    for kind in ("data_rows", "data_cov"):
        # The test could fail: the head's level is far from the whole split's.
        assert abs(head[kind] - whole[kind]) > 0.1
        assert got[kind] == pytest.approx(whole[kind], abs=0.03)


# ----------------------------------------------------------------------------- the trained null


def test_gaussian_set_has_the_sources_moments_within_sampling_error(tmp_path, capsys):
    x, held = _skewed_set(tmp_path / "s")
    out = tmp_path / "g"
    assert main(["-q", "extract", "gaussian", "--like", str(tmp_path / "s"), "--seed", "4",
                 "--rows-per-shard", "3000", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    g = ActivationSet(out)
    src = ActivationSet(tmp_path / "s")
    assert (g.d, g.rows, g.meta["heldout_rows"]) == (src.d, src.rows, src.meta["heldout_rows"])
    assert summary["covariance_rank"] == 16
    assert g.meta["source"] == "gaussian" and g.meta["like"]["train_rows"] == (~held).sum()
    gx = g.load("all", columns=["row"])
    # The same held-out rows as the source, row for row.
    np.testing.assert_array_equal(gx["heldout"], held)
    # Mean and covariance of its training rows against the source's (float64 reference):
    # each entry within 5 standard errors of the sample covariance of n Gaussian rows,
    # Var(S_ij) = (Σ_ii Σ_jj + Σ_ij²) / n, and of the sample mean, Var = Σ_ii / n.
    t = x[~held].astype(np.float64)
    mu, sigma = t.mean(0), np.cov(t, rowvar=False)
    gt = gx["x"][~gx["heldout"]].astype(np.float64)
    n = len(gt)
    se_cov = np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / n)
    se_mean = np.sqrt(np.diag(sigma) / n)
    assert np.abs(np.cov(gt, rowvar=False) - sigma).max() / se_cov.max() < 5
    assert (np.abs(gt.mean(0) - mu) / se_mean).max() < 5
    # ... and not merely any covariance: the source's is far from the identity's scale.
    assert np.abs(np.cov(gt, rowvar=False) - np.eye(16)).max() > 1
    # Reproducible from the seed, independent of the shard size; another seed differs.
    again = tmp_path / "g2"
    assert main(["-q", "extract", "gaussian", "--like", str(tmp_path / "s"), "--seed", "4",
                 "--out", str(again)]) == 0
    np.testing.assert_array_equal(ActivationSet(again).load("all")["x"], gx["x"])
    assert main(["-q", "extract", "gaussian", "--like", str(tmp_path / "s"), "--seed", "5",
                 "--rows", "500", "--out", str(again)]) == 0
    other = ActivationSet(again).load("all")
    assert len(other["x"]) == 500 and not np.allclose(other["x"], gx["x"][:500])
    np.testing.assert_array_equal(other["heldout"], held[:500])


def test_gaussian_refuses_bad_input_in_one_line(tmp_path, capsys):
    _skewed_set(tmp_path / "s", rows=2000, head=200)
    cases = [(["--like", str(tmp_path / "nothing")], "does not exist"),
             (["--like", str(tmp_path / "s"), "--rows", "0"], "--rows"),
             (["--like", str(tmp_path / "s"), "--seed", "-1"], "--seed")]
    for args, word in cases:
        capsys.readouterr()
        assert main(["-q", "extract", "gaussian", *args, "--out", str(tmp_path / "g")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    # --out never the source (nor a folder holding it).
    assert main(["-q", "extract", "gaussian", "--like", str(tmp_path / "s"), "--out",
                 str(tmp_path / "s"), "--force"]) == 2
    assert ActivationSet(tmp_path / "s").rows == 2000
    assert not (tmp_path / "g").exists()
    # A Gaussian set has no documents: split --by doc is refused, auto splits by row.
    assert main(["-q", "extract", "gaussian", "--like", str(tmp_path / "s"), "--out",
                 str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert main(["-q", "split", str(tmp_path / "g"), "--half", "0", "--by", "doc", "--out",
                 str(tmp_path / "h")]) == 2
    assert "no doc column" in capsys.readouterr().err
    assert main(["-q", "split", str(tmp_path / "g"), "--half", "0", "--out",
                 str(tmp_path / "h")]) == 0
    assert json.loads(capsys.readouterr().out)["by"] == "row"


# ----------------------------------------------------------------------------- split halves


def test_assign_halves_balances_rows_and_ignores_the_order_of_groups():
    from isae.data.halves import assign_halves

    rng = np.random.default_rng(0)
    groups = rng.choice(10**6, 300, replace=False)
    counts = rng.integers(1, 200, 300)
    h = assign_halves(groups, counts, seed=2)
    # Balanced to within one group's rows.
    assert abs(counts[h == 0].sum() - counts[h == 1].sum()) <= counts.max()
    perm = rng.permutation(300)
    np.testing.assert_array_equal(assign_halves(groups[perm], counts[perm], seed=2), h[perm])
    assert not np.array_equal(assign_halves(groups, counts, seed=3), h)


@pytest.mark.parametrize("by", ["doc", "row"])
def test_halves_are_disjoint_by_document_and_cover_the_training_split(tmp_path, capsys, by):
    x, held = _skewed_set(tmp_path / "s", rows=6000, head=600, rows_per_shard=700)
    doc = np.arange(len(x)) // 100
    parts = []
    for h in (0, 1):
        out = tmp_path / f"h{h}"
        assert main(["-q", "split", str(tmp_path / "s"), "--half", str(h), "--by", by,
                     "--seed", "1", "--rows-per-shard", "500", "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out)
        a = ActivationSet(out)  # a valid set: meta and shards agree
        assert a.meta["split"]["half"] == h and a.meta["split"]["by"] == by
        assert summary["rows"] == a.rows
        parts.append(a.load("all", columns=["doc", "pos"]))
    p0, p1 = parts
    # Held-out rows: all of them, the same in both halves.
    for p in parts:
        np.testing.assert_array_equal(p["x"][p["heldout"]], x[held])
    t0, t1 = (p["heldout"] == 0 for p in parts)
    # The training rows: disjoint by document (or by row), together the whole split.
    if by == "doc":
        assert not set(p0["doc"][t0]) & set(p1["doc"][t1])
        assert len(set(p0["doc"][t0])) > 5 and len(set(p1["doc"][t1])) > 5
    key = lambda p, t: set(zip(p["doc"][t].tolist(), p["pos"][t].tolist()))  # noqa: E731
    k0, k1 = key(p0, t0), key(p1, t1)
    assert not k0 & k1
    assert k0 | k1 == set(zip(doc[~held].tolist(), (np.arange(len(x)) % 100)[~held].tolist()))
    # Rows are carried unchanged, and the halves are balanced to within one document.
    full = {(d, q): r for d, q, r in zip(doc, np.arange(len(x)) % 100, x)}
    for (d, q), r in zip(zip(p0["doc"][t0], p0["pos"][t0]), p0["x"][t0]):
        np.testing.assert_array_equal(r, full[(int(d), int(q))])
    assert abs(t0.sum() - t1.sum()) <= 100


def test_split_of_a_synthetic_set_keeps_its_truth_and_columns(synthetic_set, tmp_path, capsys):
    assert main(["-q", "split", str(synthetic_set), "--half", "1", "--out",
                 str(tmp_path / "h")]) == 0
    a = ActivationSet(tmp_path / "h")
    assert a.has_truth and a.meta["split"]["by"] == "doc"
    assert set(ActivationSet(synthetic_set).columns()) == set(a.columns())
    assert main(["-q", "split", str(synthetic_set), "--half", "1", "--out",
                 str(synthetic_set / "inside")]) == 2
    assert "input" in capsys.readouterr().err


@pytest.mark.slow
def test_match_halves_pairs_each_run_with_its_twin_on_the_other_half(synthetic_set, tmp_path,
                                                                      capsys):
    """Split-data reproducibility (isae.analysis.split_data): SAEs trained on the two halves
    of a set, each matched with the same arch and seed on the other half, against the
    test-side Hungarian reference and `isae match`'s own summary of the same pair."""
    from libdata import matched_abs_cos

    from isae.analysis.split_data import match_halves
    from isae.data.checkpoints import load_decoder
    from isae.errors import UserError

    halves = []
    for h in (0, 1):
        acts = tmp_path / f"half{h}"
        assert main(["-q", "split", str(synthetic_set), "--half", str(h), "--out", str(acts)]) == 0
        ckpts = tmp_path / f"ckpt{h}"
        assert main(["-q", "train", "--activations", str(acts), "--arch", "topk,isae",
                     "--seeds", "0,1", "--k", "3", "--width", "64", "--tokens", "4000",
                     "--batch-size", "256", "--out", str(ckpts / "{arch}" / "seed{seed}")]) == 0
        halves.append(ckpts)
    # The second half without isae seed 1: only the runs on both halves are compared.
    shutil.rmtree(halves[1] / "isae" / "seed1")
    capsys.readouterr()
    t = match_halves(halves[0], halves[1], synthetic_set, max_rows=300)
    assert list(zip(t["arch"], t["seed"])) == [("isae", 0), ("topk", 0), ("topk", 1)]
    for _, r in t.iterrows():
        a, b = (h / r["arch"] / f"seed{r['seed']}" for h in halves)
        want = matched_abs_cos(load_decoder(a).numpy(), load_decoder(b).numpy())
        assert r["mean_abs_cos"] == pytest.approx(want, abs=1e-6)
        assert main(["-q", "match", str(a), str(b), "--activations", str(synthetic_set),
                     "--max-rows", "300"]) == 0
        one = json.loads(capsys.readouterr().out)
        for col in ("mean_abs_cos", "code_pearson_all", "code_jaccard", "live_mean_abs_cos"):
            assert r[col] == pytest.approx(one[col], abs=1e-9)
    # The workflow's rule script writes the same table.
    class Fields(dict):
        __getattr__ = dict.__getitem__

    out = tmp_path / "split.parquet"
    smk = Fields(input=Fields(half0=str(halves[0]), half1=str(halves[1]), acts=str(synthetic_set)),
                 params=Fields(torch_threads=1, max_rows=300, device="cpu"),
                 output=Fields(table=str(out)), log=[str(tmp_path / "split.log")])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "split_pairs.py"),
                       init_globals={"snakemake": smk})
    finally:
        torch.set_num_threads(threads)  # the script sets its job's
    pd.testing.assert_frame_equal(pd.read_parquet(out), t)
    # Two halves trained from the same seeds agree more than two random dictionaries.
    assert t["mean_abs_cos"].min() > 0.3
    assert not {"a", "b", "arch_a", "seed_b"} & set(t.columns)
    with pytest.raises(UserError, match="no checkpoint of the same arch and seed"):
        match_halves(halves[0] / "isae", halves[1] / "topk")
