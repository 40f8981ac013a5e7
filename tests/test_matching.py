"""Dictionary matching: exact signed-permutation recovery, rectangular cases, MMCS and the
assignment against independent float64 / brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from isae.analysis.matching import match_dictionaries
from isae.errors import UserError


def _signed_perm(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.permutation(n), rng.choice([-1, 1], size=n)


@pytest.mark.parametrize("n,d,block", [(64, 16, 64), (97, 13, 10)])
def test_recovers_a_known_signed_permutation_exactly(n, d, block):
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    perm, sign = _signed_perm(n, seed=1)
    # B's atom j is sign[j] * A's atom perm[j]: A's atom perm[j] must match B's j with sign[j].
    W_b = W[perm] * torch.as_tensor(sign, dtype=torch.float32)[:, None]
    m = match_dictionaries(W, W_b, block=block)
    expect_b = np.empty(n, np.int64)
    expect_b[perm] = np.arange(n)
    np.testing.assert_array_equal(m.a, np.arange(n))
    np.testing.assert_array_equal(m.b, expect_b)
    np.testing.assert_array_equal(m.sign, sign[expect_b])
    np.testing.assert_allclose(m.abs_cos, 1.0, atol=1e-12)
    s = m.summary()
    assert s["mean_abs_cos"] == pytest.approx(1.0, abs=1e-12)
    assert s["frac_gt_0.9"] == 1.0 and s["frac_gt_0.7"] == 1.0
    assert s["mmcs_ab"] == pytest.approx(1.0, abs=1e-6) and s["mmcs_ba"] == pytest.approx(1.0, abs=1e-6)


def test_rows_need_not_be_unit_norm():
    W = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    scales = torch.rand(20, 1, generator=torch.Generator().manual_seed(1)) * 5 + 0.1
    m = match_dictionaries(W, -W * scales)
    np.testing.assert_array_equal(m.b, np.arange(20))
    np.testing.assert_array_equal(m.sign, -1)
    np.testing.assert_allclose(m.abs_cos, 1.0, atol=1e-12)


@pytest.mark.parametrize("wider", ["a", "b"])
def test_rectangular_matching_reports_unmatched_atoms(wider):
    n_big, n_small, d = 40, 25, 12
    W = torch.randn(n_big, d, generator=torch.Generator().manual_seed(3))
    perm, sign = _signed_perm(n_big, seed=4)
    sub = perm[:n_small]
    W_small = W[sub] * torch.as_tensor(sign[:n_small], dtype=torch.float32)[:, None]
    if wider == "a":
        m = match_dictionaries(W, W_small)
        pairs = dict(zip(m.a.tolist(), zip(m.b.tolist(), m.sign.tolist())))
        assert pairs == {int(sub[j]): (j, int(sign[j])) for j in range(n_small)}
    else:
        m = match_dictionaries(W_small, W)
        pairs = dict(zip(m.a.tolist(), zip(m.b.tolist(), m.sign.tolist())))
        assert pairs == {j: (int(sub[j]), int(sign[j])) for j in range(n_small)}
    assert m.summary()["n_matched"] == n_small
    np.testing.assert_allclose(m.abs_cos, 1.0, atol=1e-12)

    t = m.table()
    assert len(t) == n_big  # every atom once: matched pairs plus the unmatched of the wider side
    matched = t[t.matched]
    assert len(matched) == n_small and (matched.a >= 0).all() and (matched.b >= 0).all()
    un = t[~t.matched]
    wide_col = "a" if wider == "a" else "b"
    other = "b" if wider == "a" else "a"
    assert (un[other] == -1).all() and (un.sign == 0).all() and un.abs_cos.isna().all()
    assert sorted(un[wide_col]) == sorted(set(range(n_big)) - set(sub.tolist()))


def test_against_float64_reference_and_brute_force():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(6, 5))
    B = rng.normal(size=(6, 5))
    m = match_dictionaries(A, B, block=4)
    An = A / np.linalg.norm(A, axis=1, keepdims=True)
    Bn = B / np.linalg.norm(B, axis=1, keepdims=True)
    C = An @ Bn.T  # float64 reference cosines
    # Hungarian = best of all 720 bijections.
    best = max(itertools.permutations(range(6)), key=lambda p: np.abs(C[np.arange(6), p]).sum())
    np.testing.assert_array_equal(m.b, np.array(best))
    np.testing.assert_allclose(m.abs_cos, np.abs(C[np.arange(6), best]), atol=1e-12)
    np.testing.assert_array_equal(m.sign, np.sign(C[np.arange(6), best]))
    np.testing.assert_allclose(m.best_ab, np.abs(C).max(1), atol=1e-6)
    np.testing.assert_allclose(m.best_ba, np.abs(C).max(0), atol=1e-6)
    s = m.summary()
    assert s["mmcs_ab"] == pytest.approx(np.abs(C).max(1).mean(), abs=1e-6)
    assert s["mmcs_ba"] == pytest.approx(np.abs(C).max(0).mean(), abs=1e-6)
    c = np.abs(C[np.arange(6), best])
    assert s["frac_gt_0.7"] == pytest.approx((c > 0.7).mean())


def test_random_dictionaries_match_at_chance_level():
    # Two independent Gaussian dictionaries in d = 64: each |cos| is ~ |N(0, 1/64)|, so even
    # the best bijection stays far from 1 (the sanity floor every stability number sits on).
    g = torch.Generator().manual_seed(0)
    m = match_dictionaries(torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g))
    s = m.summary()
    assert 0.15 < s["mean_abs_cos"] < 0.4
    assert s["frac_gt_0.7"] == 0.0
    assert s["mmcs_ab"] >= s["mean_abs_cos"] - 1e-9  # the bijection can only lose to the max


def test_different_dimensions_is_a_user_error():
    with pytest.raises(UserError, match="d_in"):
        match_dictionaries(torch.randn(5, 4), torch.randn(5, 3))


def test_chance_level_of_random_dictionaries_matches_design_reference():
    from isae.analysis.matching import chance_mean_abs_cos

    # Two random dictionaries of 1536 atoms in d = 384 match at 0.174 (measured).
    assert abs(chance_mean_abs_cos(1536, 1536, 384, seed=3) - 0.174) < 0.01
    # More room (larger d) means a lower floor.
    assert chance_mean_abs_cos(256, 256, 64) > chance_mean_abs_cos(256, 256, 256)
