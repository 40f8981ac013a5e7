"""Restricted isometry on supports: known answers (orthonormal rows, repeated rows), float64
SVD on the same submatrices, Marchenko–Pastur for Gaussian dictionaries, and the samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isae.analysis.isometry import (
    NEAR_SINGULAR,
    delta_of_supports,
    dictionary_summary,
    gaussian_dictionary,
    gram_extremes,
    isometry_sides,
    mp_delta,
    mp_lower,
    mp_upper,
    nearest_atom_cos,
    random_supports,
    ric_report,
    row_supports,
    sample_pairs,
    union_supports,
)
from isae.data.sources.synthetic import make_dictionary, sample_supports, zipf_weights
from isae.errors import UserError


def _orthonormal(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


def _svd_delta(W: np.ndarray, S: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Reference: float64 numpy SVD of each unit-row submatrix, one at a time."""
    out = []
    for row, s in zip(S, sizes):
        if s == 0:
            out.append(0.0)
            continue
        D = W[row[:s]].astype(np.float64)
        D = D / np.linalg.norm(D, axis=1, keepdims=True)
        sv = np.linalg.svd(D, compute_uv=False)
        smin = sv[-1] if s <= D.shape[1] else 0.0  # s > d: the Gram is singular
        out.append(max(sv[0] ** 2 - 1, 1 - smin**2))
    return np.array(out)


def test_orthonormal_rows_have_delta_zero_for_every_support():
    d = 16
    W = _orthonormal(d, 0)
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, d + 1, size=200)
    S = random_supports(sizes, d, rng)
    delta = delta_of_supports(W, S, sizes).numpy()
    np.testing.assert_allclose(delta, 0.0, atol=1e-12)


def test_two_identical_rows_give_delta_one():
    d = 12
    W = _orthonormal(d, 2)
    W = np.concatenate([W, W[3:4]])  # atom 12 repeats atom 3
    rng = np.random.default_rng(3)
    sizes = rng.integers(2, d + 1, size=100)
    S = random_supports(sizes - 2, d, rng)  # atoms other than 3 and 12 below ...
    S = np.where(S == 3, 0, S)
    U = []
    for row, s in zip(S, sizes):
        rest = [a for a in dict.fromkeys(row[: s - 2].tolist()) if a not in (0, 3)][: max(s - 3, 0)]
        U.append([3, 12] + rest)
    sizes = np.array([len(u) for u in U])
    Up = np.full((len(U), sizes.max()), 13)
    for i, u in enumerate(U):
        Up[i, : len(u)] = u
    # The Gram has eigenvalues 2 (the repeated pair) and 0, the rest 1: δ = 1 exactly.
    delta = delta_of_supports(W, Up, sizes).numpy()
    np.testing.assert_allclose(delta, 1.0, atol=1e-12)
    # Without the repeat, still an isometry.
    np.testing.assert_allclose(delta_of_supports(W, Up[:, 1:], sizes - 1).numpy(), 0.0, atol=1e-12)


@pytest.mark.parametrize("d", [32, 37])
def test_equals_float64_numpy_svd(d):
    rng = np.random.default_rng(d)
    N = 90
    W = rng.normal(size=(N, d)).astype(np.float32) * rng.uniform(0.5, 2.0, size=(N, 1)).astype(np.float32)
    sizes = np.concatenate([[0, 1, 2, d, d + 5], rng.integers(1, 2 * d, size=150)])
    S = random_supports(sizes, N, rng)
    # max_elems tiny: many chunks per size group, the chunk boundaries must not matter.
    got = delta_of_supports(torch.as_tensor(W), S, sizes, max_elems=3 * 64 * d).numpy()
    np.testing.assert_allclose(got, _svd_delta(W, S, sizes), rtol=0, atol=1e-10)
    assert got[0] == 0.0 and got[1] == pytest.approx(0.0, abs=1e-12)
    assert got[4] >= 1.0  # |U| > d: a zero singular value


@pytest.mark.parametrize("s,d", [(96, 384), (128, 1024)])
def test_gaussian_dictionary_median_matches_marchenko_pastur(s, d):
    W = gaussian_dictionary(1024, d, seed=0)
    rng = np.random.default_rng(0)
    sizes = np.full(80, s)
    med = float(np.median(delta_of_supports(W, random_supports(sizes, 1024, rng), sizes)))
    mp = float(mp_delta(s, d))
    # Finite-size (Tracy–Widom) effects put the median a few % *below* the MP edge.
    assert abs(med - mp) <= 0.10 * mp, (med, mp)
    assert med < mp


def test_sample_pairs_enumerates_and_refuses():
    rng = np.random.default_rng(0)
    for n in (2, 3, 11, 40):
        i, j = sample_pairs(n, n * (n - 1) // 2, rng)
        ti, tj = np.triu_indices(n, 1)
        np.testing.assert_array_equal(i, ti)
        np.testing.assert_array_equal(j, tj)
    i, j = sample_pairs(100_000, 5000, rng)
    assert (i < j).all() and (j < 100_000).all() and len(set(zip(i.tolist(), j.tolist()))) == 5000
    with pytest.raises(UserError, match="distinct pairs"):
        sample_pairs(10, 46, rng)


def test_union_supports_against_python_sets():
    rng = np.random.default_rng(5)
    N = 30
    Si = np.where(rng.random((200, 4)) < 0.8, rng.integers(0, N, (200, 4)), N)
    Sj = np.where(rng.random((200, 5)) < 0.8, rng.integers(0, N, (200, 5)), N)
    U, sizes = union_supports(Si, Sj, N)
    for r in range(200):
        want = sorted((set(Si[r]) | set(Sj[r])) - {N})
        assert sizes[r] == len(want)
        assert U[r, : sizes[r]].tolist() == want
        assert (U[r, sizes[r] :] == N).all()


@pytest.mark.parametrize("s,N", [(5, 1000), (40, 60)])  # rejection path, then random keys
def test_random_supports_are_distinct_and_uniform(s, N):
    rng = np.random.default_rng(6)
    P = 3000
    S = random_supports(np.full(P, s), N, rng)
    srt = np.sort(S[:, :s], axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all() and S.min() >= 0 and S.max() < N
    counts = np.bincount(S[:, :s].ravel(), minlength=N)
    p = s / N
    sd = np.sqrt(P * p * (1 - p))
    assert np.abs(counts - P * p).max() < 5 * sd


def test_row_supports_shrink_dense_codes():
    val = np.array([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    idx = np.tile(np.arange(4), (3, 1))
    S = row_supports(val, idx, 4)
    assert S.tolist() == [[1, 3], [4, 4], [0, 4]]


def test_report_tables_and_the_2k_lower_bound():
    rng = np.random.default_rng(7)
    N, d, k, R = 64, 24, 3, 120
    W = gaussian_dictionary(N, d, seed=9)
    idx = np.argsort(rng.random((R, N)), axis=1)[:, :k]
    val = rng.normal(size=(R, k))
    S = row_supports(val, idx, N)
    W_t = _orthonormal(d, 3)
    true_S = np.argsort(rng.random((R, d)), axis=1)[:, :2]
    table, summary = ric_report(W, S, n_pairs=500, seed=1, k=k, truth=(W_t, true_S))
    assert sorted(table.kind.unique()) == ["gaussian", "observed", "random_support", "truth"]
    assert (table.groupby("kind").size() == 500).all()
    obs = table[table.kind == "observed"]
    assert obs["size"].between(k, 2 * k).all()
    # Same sizes for the calibrations; the truth is orthonormal: δ = 0.
    np.testing.assert_array_equal(table[table.kind == "random_support"]["size"], obs["size"])
    np.testing.assert_allclose(table[table.kind == "truth"].delta, 0.0, atol=1e-12)
    at = obs[obs["size"] == 2 * k]
    assert summary["n_pairs_size_2k"] == len(at) > 0
    assert summary["delta_2k_lower_bound"] == pytest.approx(at.delta.max())
    assert summary["observed_q50"] == pytest.approx(np.quantile(obs.delta, 0.5))
    assert summary["observed_frac_lt_1/3"] == pytest.approx((obs.delta < 1 / 3).mean())
    assert summary["observed_mean_size"] == pytest.approx(obs["size"].mean())
    np.testing.assert_allclose(obs.mp, mp_delta(obs["size"].to_numpy(), d))
    # Same seed, same answer.
    again, _ = ric_report(W, S, n_pairs=500, seed=1, k=k, truth=(W_t, true_S))
    np.testing.assert_array_equal(again.delta.to_numpy(), table.delta.to_numpy())


# ----------------------------------------------------------------------------- two sides


def _svd_sides(W: np.ndarray, S: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: (1 − σ_min², σ_max² − 1) by float64 numpy SVD, one submatrix at a time."""
    lower, upper = [], []
    for row, s in zip(S, sizes):
        if s <= 1:
            lower.append(0.0)
            upper.append(0.0)
            continue
        D = W[row[:s]].astype(np.float64)
        D = D / np.linalg.norm(D, axis=1, keepdims=True)
        sv = np.linalg.svd(D, compute_uv=False)
        smin = sv[-1] if s <= D.shape[1] else 0.0
        lower.append(1 - smin**2)
        upper.append(sv[0] ** 2 - 1)
    return np.array(lower), np.array(upper)


@pytest.mark.parametrize("d", [16, 21])
def test_sides_equal_float64_numpy_svd(d):
    rng = np.random.default_rng(d)
    N = 60
    W = rng.normal(size=(N, d)) * rng.uniform(0.5, 2.0, size=(N, 1))
    sizes = np.concatenate([[0, 1, 2, d, d + 3], rng.integers(2, 2 * d, size=100)])
    S = random_supports(sizes, N, rng)
    lower, upper, delta = isometry_sides(*gram_extremes(torch.as_tensor(W), S, sizes,
                                                        max_elems=5 * 40 * d))
    ref_lo, ref_up = _svd_sides(W, S, sizes)
    np.testing.assert_allclose(lower, ref_lo, atol=1e-10)
    np.testing.assert_allclose(upper, ref_up, atol=1e-10)
    np.testing.assert_allclose(delta, np.maximum(ref_lo, ref_up), atol=1e-10)
    np.testing.assert_allclose(delta, delta_of_supports(W, S, sizes).numpy(), atol=1e-12)
    assert lower[4] == pytest.approx(1.0, abs=1e-9)  # |U| > d: singular, the side is 1


@pytest.mark.parametrize("s,d", [(96, 384), (64, 1024)])
def test_gaussian_sides_match_the_marchenko_pastur_edges(s, d):
    """Each side of a Gaussian dictionary's Gram sits at its own MP edge: lower 2√r − r,
    upper 2√r + r (r = s/d), a few % inside it at finite size (Tracy–Widom)."""
    W = gaussian_dictionary(2048, d, seed=1)
    rng = np.random.default_rng(2)
    sizes = np.full(60, s)
    lower, upper, _ = isometry_sides(*gram_extremes(W, random_supports(sizes, 2048, rng), sizes))
    r = s / d
    assert float(mp_lower(s, d)) == pytest.approx(2 * np.sqrt(r) - r)
    assert float(mp_upper(s, d)) == pytest.approx(2 * np.sqrt(r) + r)
    for got, edge in ((np.median(lower), mp_lower(s, d)), (np.median(upper), mp_upper(s, d))):
        assert 0.88 * edge < got < edge, (got, edge)
    # The sides differ by 2r at the edges: the upper side is the larger one.
    assert np.median(upper - lower) == pytest.approx(2 * r, rel=0.35)
    assert float(mp_lower(2 * d, d)) == 1.0


def test_planted_near_duplicate_atom():
    rng = np.random.default_rng(3)
    d, N = 32, 80
    W = rng.normal(size=(N, d))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    # Atom 7 becomes atom 50 plus a little noise: |cos| ≈ 0.995.
    W[7] = W[50] + 0.1 * rng.normal(size=d) / np.sqrt(d)
    cos = abs(W[7] @ W[50]) / np.linalg.norm(W[7])
    assert cos > 0.99
    best = nearest_atom_cos(torch.as_tensor(W), block=13)
    G = np.abs((W / np.linalg.norm(W, axis=1, keepdims=True)) @
               (W / np.linalg.norm(W, axis=1, keepdims=True)).T)
    np.fill_diagonal(G, 0)
    np.testing.assert_allclose(best, G.max(1), atol=1e-12)
    out = dictionary_summary(W)
    assert out["dup_frac"] == 2 / N  # both atoms of the pair, no other
    assert out["coherence"] == pytest.approx(cos)
    # A union holding both is near-singular; without the pair, a random union is not.
    lo, hi = gram_extremes(W, np.array([[7, 50, 1, 2], [1, 2, 3, 4]]), np.array([4, 4]))
    lower, upper, _ = isometry_sides(lo, hi)
    assert lower[0] > NEAR_SINGULAR and lower[1] < 0.9
    assert upper[0] > 0.99  # and the pair's λ_max ≈ 1 + |cos|


def test_report_has_both_sides_and_near_singular_fraction():
    rng = np.random.default_rng(4)
    d, N, k, R = 24, 64, 3, 200
    W = gaussian_dictionary(N, d, seed=2).numpy().astype(np.float64)
    W[5] = W[6]  # an exact duplicate pair
    idx = np.where(rng.random((R, 1)) < 0.3, np.array([[5, 6, 9]]),
                   np.argsort(rng.random((R, N)), axis=1)[:, :k])
    S = row_supports(np.ones((R, k)), idx, N)
    table, summary = ric_report(W, S, n_pairs=400, seed=0, k=k)
    obs = table[table.kind == "observed"]
    np.testing.assert_allclose(obs.delta, np.maximum(obs.lower, obs.upper))
    assert summary["observed_frac_singular"] == pytest.approx((obs.lower > NEAR_SINGULAR).mean())
    assert 0 < summary["observed_frac_singular"] < 1
    assert summary["observed_lower_q50"] == pytest.approx(np.quantile(obs.lower, 0.5))
    assert summary["observed_upper_q90"] == pytest.approx(np.quantile(obs.upper, 0.9))
    assert summary["dict_dup_frac"] == 2 / N and summary["dict_coherence"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- regimes


def _true_union_deltas(d: int, atoms: int, k: int, n: int = 2000) -> np.ndarray:
    """δ of the true dictionary on unions of two rows' true supports, drawn as the
    synthetic generator draws them (seed 0's dictionary, Zipf 1 frequencies)."""
    D, _ = make_dictionary(d, atoms, np.random.default_rng([0, 0]))
    S = sample_supports(np.random.default_rng(1), 2 * n, zipf_weights(atoms, 1.0), k)
    U, sizes = union_supports(S[:n], S[n:], atoms)
    return delta_of_supports(D, U, sizes).numpy()


def test_the_well_posed_regime_satisfies_the_isometry_on_true_supports():
    """d 128, 512 atoms, k 4: most unions of two rows' true supports have δ < √2 − 1 (the
    recovery threshold), so claim 3 can be tested there."""
    delta = _true_union_deltas(128, 512, 4)
    assert (delta < np.sqrt(2) - 1).mean() > 0.6
    assert np.median(delta) < np.sqrt(2) - 1


def test_the_coherent_regime_does_not():
    """d 64, 256 atoms, k 8: the true dictionary's own δ on unions of true supports has a
    median near 0.88, far above √2 − 1."""
    delta = _true_union_deltas(64, 256, 8)
    assert 0.75 < np.median(delta) < 1.0
    assert (delta < np.sqrt(2) - 1).mean() < 0.05
