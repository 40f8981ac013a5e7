"""Convergence controls against known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from isae.analysis.convergence import fvu_trend, init_abs_cos, is_converged, smooth


def _log(fvu):
    return pd.DataFrame({"step": np.arange(len(fvu)) * 10, "fvu": fvu})


def test_flat_log_has_no_trend_and_converges():
    t = fvu_trend(_log(np.full(200, 0.3)))
    assert t == pytest.approx(0.0, abs=1e-12)
    assert is_converged(t, 0.01)


def test_linear_decline_gives_its_relative_change():
    # fvu = 1 - 0.001 * i over 201 rows: the last 20 % goes from 0.84 to 0.80. A linear
    # sequence is unchanged by a centred average away from the edges; at the last row the
    # shrunk window averages rows 195..200, i.e. 0.8025.
    f = 1 - 0.001 * np.arange(201)
    t = fvu_trend(_log(f), tail=0.2, smooth_frac=0.05)
    assert t == pytest.approx((0.84 - 0.8025) / 0.8025, rel=1e-9)
    assert not is_converged(t, 0.01)


def test_noise_is_smoothed_out():
    rng = np.random.default_rng(0)
    t = fvu_trend(_log(0.3 + 0.01 * rng.standard_normal(2000)))
    assert abs(t) < 0.01


def test_too_short_a_log_is_undefined_and_not_converged():
    assert math.isnan(fvu_trend(_log([0.5, 0.4])))
    assert not is_converged(math.nan, 0.5)


def test_smooth_matches_a_plain_loop():
    v = np.random.default_rng(1).random(37)
    got = smooth(v, 7)
    ref = [v[max(i - 3, 0): i + 4].mean() for i in range(len(v))]
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_init_abs_cos_is_one_for_unmoved_atoms_and_sign_blind():
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((5, 8))
    W = W0.copy()
    W[1] *= -3.0  # flipped and scaled: same direction
    W[2] = rng.standard_normal(8)
    c = init_abs_cos(W, W0)
    assert c[[0, 1, 3, 4]] == pytest.approx(1.0)
    ref = abs(W[2] @ W0[2]) / np.linalg.norm(W[2]) / np.linalg.norm(W0[2])
    assert c[2] == pytest.approx(ref)
