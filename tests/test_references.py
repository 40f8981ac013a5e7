"""The references a stability number is read against: chance levels drawn from the whole
training split (``isae chance``), the Gaussian set with the activations' moments (``isae
extract gaussian``) and the two halves of a set by document (``isae split``)."""

from __future__ import annotations

import json

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
