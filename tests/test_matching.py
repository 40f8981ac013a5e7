"""Dictionary matching: exact signed-permutation recovery, rectangular cases, MMCS and the
assignment against independent float64 / brute-force references."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
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


# ----------------------------------------------------------------------------- data-shaped chance


def _low_rank_rows(R: int, d: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R centred rows spanning a random r-dimensional subspace of R^d, and its basis [r, d]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    basis = Q[:, :r].T
    rows = torch.randn(R, r, generator=g, dtype=torch.float64) @ basis
    return rows - rows.mean(0), basis


def test_data_covariance_dictionaries_live_where_the_data_does():
    from isae.analysis.matching import random_dictionary

    rows, basis = _low_rank_rows(2000, 32, 5, seed=1)
    W = random_dictionary("data_cov", 100, 32, torch.Generator().manual_seed(0), rows)
    assert torch.allclose(W.norm(dim=1), torch.ones(100, dtype=torch.float64))
    residual = W - (W @ basis.T) @ basis  # the part outside the data's subspace
    assert residual.abs().max() < 1e-9


def test_data_covariance_chance_equals_isotropic_chance_in_the_data_subspace():
    """Rows spanning r of d dimensions, isotropic inside: Gaussian dictionaries with that
    covariance are isotropic Gaussian dictionaries of R^r rotated into R^d, so their matched
    |cos| is the isotropic chance level at d = r, far above the level at d."""
    from isae.analysis.matching import chance_levels

    rows, _ = _low_rank_rows(20000, 48, 8, seed=2)
    got = chance_levels(64, 48, rows=rows, draws=4, seed=1, kinds=("gaussian", "data_cov"))
    mean = got.groupby("kind")["mean_abs_cos"].mean()
    ref = chance_levels(64, 8, draws=4, seed=5, kinds=("gaussian",))["mean_abs_cos"].mean()
    assert mean["data_cov"] == pytest.approx(ref, abs=0.03)
    assert mean["data_cov"] > mean["gaussian"] + 0.2


def test_random_training_rows_when_the_data_is_the_dictionary():
    """Data made of exactly n distinct directions: a draw of n rows takes them all, so two
    draws (and one draw against those directions as the truth) match perfectly."""
    from isae.analysis.matching import chance_levels

    g = torch.Generator().manual_seed(3)
    atoms = torch.randn(40, 16, generator=g, dtype=torch.float64)
    rows = atoms * torch.linspace(0.5, 2.0, 40, dtype=torch.float64)[:, None]  # scale is ignored
    got = chance_levels(40, 16, rows=rows, truth=-atoms, draws=2, kinds=("data_rows",))
    assert len(got) == 4 and set(got["target"]) == {"seed", "truth"}
    np.testing.assert_allclose(got["mean_abs_cos"], 1.0, atol=1e-12)
    with pytest.raises(UserError, match="41 random training rows"):
        chance_levels(41, 16, rows=rows, kinds=("data_rows",))


def test_chance_levels_reproducible_and_without_rows_only_isotropic():
    from isae.analysis.matching import chance_levels

    a = chance_levels(32, 16, draws=2, seed=7)
    assert set(a["kind"]) == {"gaussian"} and set(a["target"]) == {"seed"}
    pd.testing.assert_frame_equal(a, chance_levels(32, 16, draws=2, seed=7))


# ----------------------------------------------------------------------------- the certified solver


def _unit(X) -> torch.Tensor:
    X = torch.as_tensor(X, dtype=torch.float32)
    return X / X.norm(dim=1, keepdim=True)


def _scipy_total(A: torch.Tensor, B: torch.Tensor, block: int = 64) -> float:
    """The dense Hungarian optimum on the same float32 |cos| values (the same blocks), in
    float64."""
    from scipy.optimize import linear_sum_assignment

    from isae.analysis.matching import abs_cos_cost

    cost, _, _ = abs_cos_cost(A, B, block=block)
    r, c = linear_sum_assignment(cost)
    return float(-cost[r, c].sum())


def _total(A: torch.Tensor, B: torch.Tensor, rows, cols, block: int = 64) -> float:
    from isae.analysis.matching import abs_cos_cost

    cost, _, _ = abs_cos_cost(A, B, block=block)
    return float(-cost[rows, cols].sum())


def _cases():
    g = torch.Generator().manual_seed(11)
    out = {}
    for n_a, n_b, d in [(120, 120, 8), (97, 60, 6), (60, 97, 6), (150, 149, 24)]:
        out[f"random {n_a}x{n_b}"] = (torch.randn(n_a, d, generator=g),
                                      torch.randn(n_b, d, generator=g))
    eye = torch.eye(6)  # every |cos| is 0 or 1: the optimum is massively tied
    out["tied 12x18"] = (torch.cat([eye, eye]), torch.cat([eye, -eye, eye]))
    X = torch.randn(40, 5, generator=g)  # exact duplicates on both sides
    out["duplicated 90x80"] = (torch.cat([X, X, X[:10]]), torch.cat([-X[torch.randperm(40, generator=g)], X]))
    # Near-duplicates within each side and partners from close to unrelated.
    base = torch.randn(150, 10, generator=g)
    kids = base[torch.randint(0, 150, (50,), generator=g)] + 0.1 * torch.randn(50, 10, generator=g)
    A = torch.cat([base, kids])
    rho = torch.rand(200, 1, generator=g)
    B = rho * _unit(A) + (1 - rho) * _unit(torch.randn(200, 10, generator=g))
    out["trained-like 200x200"] = (A, B[torch.randperm(200, generator=g)])
    return out


CASES = _cases()


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_sparse_assignment_is_the_dense_optimum(name, m):
    from isae.analysis.assignment import EXACT_TOL, assign_abs_cos

    A, B = (_unit(x) for x in CASES[name])
    for cache in (0, 1 << 30) if m == 1 else (1 << 30,):  # rows recomputed, or kept whole
        got = assign_abs_cos(A, B, block=64, m=m, cache_bytes=cache)
        cert = got.certificate
        assert cert.method == "sparse" and cert.exact and 0.0 <= cert.gap <= EXACT_TOL
        assert len(got.rows) == min(len(A), len(B))
        assert len(np.unique(got.rows)) == len(got.rows) == len(np.unique(got.cols))
        assert np.all(np.diff(got.rows) > 0)
        assert _total(A, B, got.rows, got.cols) == pytest.approx(_scipy_total(A, B), abs=1e-9)


def test_sparse_path_needs_rounds_on_weak_candidates():
    """With one candidate per row and column the first graph misses optimal edges: the
    certificate must find them (more than one round) and still end exact."""
    from isae.analysis.assignment import assign_abs_cos

    A, B = (_unit(x) for x in CASES["trained-like 200x200"])
    got = assign_abs_cos(A, B, block=64, m=1)
    assert got.certificate.rounds > 1 and got.certificate.exact


def test_matching_maxima_equal_the_dense_cost_bitwise():
    from isae.analysis.matching import abs_cos_cost

    g = torch.Generator().manual_seed(5)
    for n_a, n_b, block in [(100, 77, 32), (64, 300, 7), (300, 64, 7)]:
        A, B = torch.randn(n_a, 9, generator=g), torch.randn(n_b, 9, generator=g)
        m = match_dictionaries(A, B, block=block)
        cost, best_ab, best_ba = abs_cos_cost(A, B, block=block)
        np.testing.assert_array_equal(m.best_ab, best_ab)
        np.testing.assert_array_equal(m.best_ba, best_ba)
        assert m.certificate.method == "sparse" and m.certificate.gap == 0.0
        assert float(-cost[m.a, m.b].sum()) == pytest.approx(_scipy_total(A, B, block), abs=1e-9)


def _optimum_with_prices(A, B):
    """The |cos| matrix the solver sees (float64 [n_a, n_b]), the optimal assignment and
    its certifying prices, from the full graph."""
    from isae.analysis.assignment import AbsCos, candidate_graph, column_prices, solve_graph

    W = AbsCos(A, B, 64, 1 << 30)
    g, _, _ = candidate_graph(W, max(len(A), len(B)))  # every entry is an edge
    sigma = solve_graph(g)
    C = torch.cat([W.block(k) for k in range(W.nblocks)]).double().numpy()
    return W, C, sigma, torch.as_tensor(column_prices(g, sigma)[0])


def _value(C: np.ndarray, sigma: np.ndarray) -> float:
    return float(C[np.flatnonzero(sigma >= 0), sigma[sigma >= 0]].sum())


def test_certificate_of_the_optimum_is_zero():
    from scipy.optimize import linear_sum_assignment

    from isae.analysis.assignment import certify

    A, B = (_unit(x) for x in CASES["random 120x120"])
    W, C, sigma, v = _optimum_with_prices(A, B)
    r, c = linear_sum_assignment(-C)
    assert _value(C, sigma) == pytest.approx(C[r, c].sum(), abs=1e-12)
    assert certify(W, sigma, v).gap == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["random 120x120", "random 97x60", "random 60x97",
                                  "trained-like 200x200"])
def test_certificate_rejects_a_planted_non_optimal_assignment(name):
    """Swap the partners of a few rows of the optimum: any prices must then prove a gap at
    least as large as the loss (weak duality), and the optimum's own prices prove it."""
    from isae.analysis.assignment import certify

    A, B = (_unit(x) for x in CASES[name])
    W, C, sigma, v = _optimum_with_prices(A, B)
    rng = np.random.default_rng(0)
    bad = sigma.copy()
    rows = rng.choice(np.flatnonzero(sigma >= 0), 6, replace=False)
    bad[rows] = sigma[np.roll(rows, 1)]
    loss = _value(C, sigma) - _value(C, bad)
    assert loss > 1e-6
    check = certify(W, bad, v)
    assert check.gap >= loss - 1e-12 and check.gap > 1e-6
    assert check.gap == pytest.approx(loss, abs=1e-9)  # the optimum's prices: exactly the loss
    for seed in range(3):  # any prices: never a gap below the true loss
        w = torch.as_tensor(np.random.default_rng(seed).random(len(B)) * 0.5)
        assert certify(W, bad, w).gap >= loss - 1e-12
        assert certify(W, sigma, w).gap >= -1e-12


def test_falls_back_to_the_dense_solver_and_says_so(caplog):
    import logging

    from isae.analysis.assignment import assign_abs_cos

    A, B = (_unit(x) for x in CASES["trained-like 200x200"])
    with caplog.at_level(logging.WARNING, logger="isae.analysis.assignment"):
        got = assign_abs_cos(A, B, block=64, m=1, max_rounds=1)
    cert = got.certificate
    assert cert.method == "dense" and "no proof after 1 rounds" in cert.reason
    assert "could not prove optimality" in caplog.text and "dense" in caplog.text
    assert _total(A, B, got.rows, got.cols) == pytest.approx(_scipy_total(A, B), abs=1e-9)
    edges = assign_abs_cos(A, B, block=64, m=4, max_edges=10)
    assert edges.certificate.method == "dense" and "edges" in edges.certificate.reason


def _collapsed(n: int, d: int, frac: float, ndir: int, seed: int) -> torch.Tensor:
    """benchmarks/match_collapsed.py's dictionaries: a fraction ``frac`` of the atoms on
    ``ndir`` directions shared by every seed (dead atoms that collapsed, as isae-iter's did at
    32 x d), the rest noisy copies of one shared set (features learnt by every seed)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "match_collapsed.py"
    spec = importlib.util.spec_from_file_location("match_collapsed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.collapsed(n, d, frac, ndir, seed)


def test_collapsed_atoms_are_certified_without_the_dense_fallback():
    """Blocks of near-ties among collapsed atoms need more rounds than well-spread
    dictionaries (8 rounds did not close this case); the defaults certify it, at the
    dense optimum's total."""
    from isae.analysis.assignment import assign_abs_cos

    A, B = _collapsed(1024, 384, 0.25, 8, 10), _collapsed(1024, 384, 0.25, 8, 11)
    got = assign_abs_cos(A, B, block=256)
    assert got.certificate.method == "sparse" and got.certificate.exact, got.certificate
    assert _total(A, B, got.rows, got.cols) == pytest.approx(_scipy_total(A, B), abs=1e-9)


def test_empty_dictionaries():
    from isae.analysis.assignment import assign_abs_cos

    got = assign_abs_cos(torch.zeros(0, 4), _unit(torch.randn(3, 4)))
    assert len(got.rows) == 0 and got.certificate.exact


# ----------------------------------------------------------------------------- trained dictionaries


@pytest.fixture(scope="module")
def trained(synthetic_set, tmp_path_factory):
    """Two TopK seeds and one isae, trained on the shared synthetic set (d 32, width 128)."""
    from isae.cli.main import main

    root = tmp_path_factory.mktemp("trained")
    assert main(["-q", "train", "--activations", str(synthetic_set), "--arch", "topk,isae",
                 "--seeds", "0,1", "--k", "3", "--width", "128", "--tokens", "20000",
                 "--batch-size", "512", "--out", str(root / "{arch}" / "seed{seed}")]) == 0
    return root


@pytest.mark.slow
def test_trained_dictionaries_match_exactly(trained, synthetic_set, tmp_path, capsys):
    from isae.analysis.assignment import assign_abs_cos
    from isae.cli.main import main
    from isae.data.checkpoints import load_decoder

    W = {p: load_decoder(trained / p) for p in ("topk/seed0", "topk/seed1", "isae/seed0")}
    W["truth"] = load_decoder(synthetic_set / "truth")
    pairs = [("topk/seed0", "topk/seed1"), ("topk/seed0", "isae/seed0"), ("isae/seed0", "truth"),
             ("topk/seed1", "truth")]
    for a, b in pairs:
        A, B = _unit(W[a]), _unit(W[b][: 100 if b == "truth" else None])  # one rectangular
        for m in (2, 16):
            got = assign_abs_cos(A, B, block=64, m=m)
            assert got.certificate.exact and got.certificate.method == "sparse"
            assert _total(A, B, got.rows, got.cols) == pytest.approx(_scipy_total(A, B), abs=1e-9)

    # isae match reports the certificate in its JSON line and its summary table.
    out = tmp_path / "s.parquet"
    assert main(["-q", "match", str(trained / "topk/seed0"), str(trained / "topk/seed1"),
                 "--summary", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["assignment_method"] == "sparse" and line["assignment_gap"] == 0.0
    assert line["assignment_exact"] is True and line["assignment_rounds"] >= 1
    s = pd.read_parquet(out)
    assert s["assignment_method"][0] == "sparse" and s["assignment_gap"][0] == 0.0


@pytest.mark.parametrize("name", ["trained-like 200x200", "random 97x60", "random 60x97"])
def test_prices_refuse_a_non_optimal_assignment_and_agree_across_backends(name):
    """The duals exist only for an assignment optimal on the graph: a planted cycle of
    swaps must be refused. The torch rounds (the GPU's) give the numpy prices bit for bit."""
    from isae.analysis.assignment import (
        AbsCos,
        _column_prices_torch,
        _NotConverged,
        candidate_graph,
        column_prices,
        solve_graph,
    )

    A, B = (_unit(x) for x in CASES[name])
    g, _, _ = candidate_graph(AbsCos(A, B, 64, 1 << 30), 6)
    sigma = solve_graph(g)
    v, it = column_prices(g, sigma)
    v_t, it_t = _column_prices_torch(g, sigma, None, 100000, torch.device("cpu"))
    np.testing.assert_array_equal(v, v_t)
    assert it == it_t and (v >= 0).all()

    full, _, _ = candidate_graph(AbsCos(A, B, 64, 1 << 30), max(len(A), len(B)))
    sigma = solve_graph(full)
    bad = sigma.copy()
    rows = np.flatnonzero(sigma >= 0)[:8]
    bad[rows] = sigma[np.roll(rows, 1)]
    for prices in (column_prices, lambda *a: _column_prices_torch(*a, None, 100000, "cpu")):
        with pytest.raises(_NotConverged, match="not optimal"):
            prices(full, bad)
