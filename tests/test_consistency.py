"""Code consistency: a dense float64 reference, invariance under signed permutations of the
latents, and the chance level of unrelated coders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from isae.analysis.consistency import code_consistency, sparse_triples
from isae.analysis.matching import match_dictionaries
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder


def _dense(val, idx, width):
    z = np.zeros((val.shape[0], width))
    np.put_along_axis(z, np.asarray(idx), np.asarray(val, np.float64), axis=1)
    return z


def _reference(za, zb, m):
    """Dense, column by column: B mapped into A's index space (plus one column per unmatched
    B latent), Pearson by np.corrcoef, Jaccard and distance by definition."""
    R, n_a = za.shape
    n_b = zb.shape[1]
    to_a, sgn = m.b_to_a(), m.b_sign()
    zbm = np.zeros((R, n_a + n_b))
    for j in range(n_b):
        col = to_a[j] if to_a[j] >= 0 else n_a + j
        zbm[:, col] = zb[:, j] * (sgn[j] if to_a[j] >= 0 else 1.0)
    zaf = np.concatenate([za, np.zeros((R, n_b))], axis=1)
    p_all, p_act = [], []
    for a in m.a:
        p_all.append(np.corrcoef(za[:, a], zbm[:, a])[0, 1])
        on = (za[:, a] != 0) | (zbm[:, a] != 0)
        p_act.append(np.corrcoef(za[on, a], zbm[on, a])[0, 1])
    sa, sb = zaf != 0, zbm != 0
    jac = ((sa & sb).sum(1) / (sa | sb).sum(1)).mean()
    dist = np.linalg.norm(zaf - zbm) / np.linalg.norm(za)
    return np.array(p_all), np.array(p_act), jac, dist


def _random_codes(rng, R, N, K):
    idx = np.argsort(rng.random((R, N)), axis=1)[:, :K]
    return rng.normal(size=(R, K)), idx


@pytest.mark.parametrize("n_a,n_b", [(24, 24), (30, 18), (17, 26)])
def test_matches_dense_reference(n_a, n_b):
    rng = np.random.default_rng(n_a * 100 + n_b)
    R, K = 300, 5
    m = match_dictionaries(rng.normal(size=(n_a, 6)), rng.normal(size=(n_b, 6)))
    va, ia = _random_codes(rng, R, n_a, K)
    za = _dense(va, ia, n_a)
    # B shares much of A's structure (so intersections, signs and correlations are real):
    # matched latents copy A's signed codes with noise, 30% dropped, plus random extra entries.
    zb = np.zeros((R, n_b))
    zb[:, m.b] = za[:, m.a] * m.sign + 0.3 * rng.normal(size=(R, len(m.a))) * (za[:, m.a] != 0)
    zb *= rng.random(zb.shape) > 0.3
    zb += rng.normal(size=zb.shape) * (rng.random(zb.shape) < 0.05)
    K_b = int((zb != 0).sum(1).max())
    ib = np.argsort(-np.abs(zb), axis=1)[:, :K_b]  # all nonzeros (and some zero slots)
    vb = np.take_along_axis(zb, ib, axis=1)

    c = code_consistency((va, ia), (vb, ib), m)
    p_all, p_act, jac, dist = _reference(za, zb, m)
    np.testing.assert_allclose(c.pearson_all, p_all, atol=1e-10)
    np.testing.assert_allclose(c.pearson_active, p_act, atol=1e-10)
    assert c.jaccard == pytest.approx(jac, abs=1e-12)
    assert c.rel_dist == pytest.approx(dist, rel=1e-10)
    assert c.summary()["pearson_all"] > 0.3  # the shared structure is seen


def test_zero_variance_rules():
    m = match_dictionaries(np.eye(3), np.eye(3))
    # latent 0: A fires, B never -> 0; latent 1: identical constant on its rows -> 1 over the
    # active rows; latent 2: never active on either side -> left out (NaN).
    va = np.array([[1.0, 2.0], [1.5, 2.0], [0.5, 0.0]])
    ia = np.array([[0, 1], [0, 1], [0, 1]])
    vb = np.array([[2.0], [2.0], [0.0]])
    ib = np.array([[1], [1], [1]])
    c = code_consistency((va, ia), (vb, ib), m)
    assert c.pearson_all[0] == 0.0 and c.pearson_active[0] == 0.0
    assert c.pearson_active[1] == 1.0
    assert np.isnan(c.pearson_all[2]) and np.isnan(c.pearson_active[2])
    assert c.summary()["n_pairs_active"] == 2
    # Jaccard: rows {0,1} vs {1} -> 1/2 twice; row {0} vs {} -> 0.
    assert c.jaccard == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_sparse_triples_drop_zeros_and_sum_repeats():
    r, lat, v = sparse_triples(np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]]), np.array([[5, 6, 5], [1, 2, 3]]))
    assert list(zip(r.tolist(), lat.tolist(), v.tolist())) == [(0, 5, 3.0), (1, 1, 3.0), (1, 2, 4.0)]


def _coder(arch, seed, d=48, n=64, k=4):
    return SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=seed))


@torch.no_grad()
def _permuted_copy(model: SparseCoder, perm: np.ndarray, sign: np.ndarray) -> SparseCoder:
    """Latent j of the copy is sign[j] * latent perm[j] of ``model``: permute decoder rows,
    encoder columns and encoder biases; negate decoder row and encoder column together."""
    t = model.export_tensors()
    p = torch.as_tensor(perm)
    s = torch.as_tensor(sign, dtype=torch.float32)
    copy = SparseCoder(model.cfg)
    copy.load_exported(
        {
            "W_dec": t["W_dec"][p] * s[:, None],
            "W_enc": t["W_enc"][:, p] * s[None, :],
            "b_enc": t["b_enc"][p],
            "b_dec": t["b_dec"],
        }
    )
    return copy


@pytest.mark.parametrize("arch,signed", [("isae", True), ("topk", False)])
def test_self_and_signed_permuted_copy_are_fully_consistent(arch, signed):
    model = _coder(arch, seed=1)
    if not signed:
        # An unsigned coder with a learned bias: give it nonzero biases so they must follow.
        with torch.no_grad():
            model.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
            model.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    rng = np.random.default_rng(2)
    perm = rng.permutation(64)
    # A ReLU (unsigned) code cannot flip sign: flipping it would change which latents fire.
    sign = rng.choice([-1, 1], size=64) if signed else np.ones(64, np.int64)
    copy = _permuted_copy(model, perm, sign)
    x = torch.randn(2000, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ca, cb = model.encode(x), copy.encode(x)

    same = code_consistency(ca, ca, match_dictionaries(model.W_dec, model.W_dec)).summary()
    m = match_dictionaries(model.W_dec, copy.W_dec)
    inv = np.argsort(perm)
    np.testing.assert_array_equal(m.b, inv)
    np.testing.assert_array_equal(m.sign, sign[inv])
    moved = code_consistency(ca, cb, m).summary()
    for s in (same, moved):
        assert s["pearson_all"] == pytest.approx(1.0, abs=1e-6)
        assert s["pearson_active"] == pytest.approx(1.0, abs=1e-6)
        assert s["jaccard"] == pytest.approx(1.0, abs=1e-12)
        assert s["rel_dist"] == pytest.approx(0.0, abs=1e-6)
        assert s["n_pairs_active"] == 64


def test_unrelated_coders_sit_near_the_chance_level():
    """Chance level, stated: two coders whose codes are independent have Pearson 0, support
    Jaccard E[i / (2k - i)] with i ~ Hypergeometric(N, k, k) (= 0.0366 at N 64, k 4), and
    relative distance sqrt(1 + ||z_B||² / ||z_A||²) (~ √2). Two independently initialised
    coders on the same isotropic rows are not fully independent — matched atoms still have
    |cos| ~ 0.2 in d 128 — so the observed values sit slightly above chance; a row-shuffled
    copy of B removes that link and must hit chance."""
    d, N, k, R = 128, 64, 4, 4000
    a, b = _coder("isae", 1, d, N, k), _coder("isae", 2, d, N, k)
    x = torch.randn(R, d, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ca, cb = a.encode(x), b.encode(x)
    m = match_dictionaries(a.W_dec, b.W_dec)
    i = np.arange(k + 1)
    jac_chance = float((hypergeom(N, k, k).pmf(i) * i / (2 * k - i)).sum())
    dist_chance = float(np.sqrt(1 + float(cb.val.pow(2).sum()) / float(ca.val.pow(2).sum())))

    obs = code_consistency(ca, cb, m).summary()
    assert abs(obs["pearson_all"]) < 0.15
    assert jac_chance * 0.8 < obs["jaccard"] < 2 * jac_chance
    assert obs["rel_dist"] == pytest.approx(dist_chance, rel=0.1)

    shuffle = torch.as_tensor(np.random.default_rng(4).permutation(R))
    null = code_consistency(ca, (cb.val[shuffle], cb.idx[shuffle]), m).summary()
    assert abs(null["pearson_all"]) < 0.03
    assert null["jaccard"] == pytest.approx(jac_chance, rel=0.15)
    assert null["rel_dist"] == pytest.approx(dist_chance, rel=0.02)
