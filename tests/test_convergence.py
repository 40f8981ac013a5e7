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


def test_window_ending_before_the_end():
    # fvu = 1 - 0.001 i over 201 rows; the window [0.6, 0.8] of the steps runs from row 120
    # (0.88) to row 160 (0.84), both far from the edges where smoothing would shrink.
    f = 1 - 0.001 * np.arange(201)
    t = fvu_trend(_log(f), tail=0.2, end=0.8, smooth_frac=0.05)
    assert t == pytest.approx((0.88 - 0.84) / 0.84, rel=1e-9)
    with pytest.raises(ValueError):
        fvu_trend(_log(f), tail=0.3, end=0.2)


def _scheduled(total: int = 1000, every: int = 5) -> pd.DataFrame:
    """A run that has stopped learning by mid-way: FVU flat at 0.3 (plus noise) while the
    rate is constant; the linear decay over the last 20 % then lowers it to 0.27."""
    from isae.models.config import TrainConfig
    from isae.training.trainer import lr_multiplier

    steps = np.arange(0, total, every)
    lr = np.array([lr_multiplier(int(s), total, TrainConfig(warmup_frac=0.02)) for s in steps])
    rng = np.random.default_rng(3)
    fvu = 0.3 - 0.03 * (1 - lr) * (steps >= 0.8 * total) + 0.002 * rng.standard_normal(len(steps))
    return pd.DataFrame({"step": steps, "fvu": fvu, "lr": 1e-3 * lr})


def test_decay_start_is_read_from_the_logged_rate():
    from isae.analysis.convergence import decay_start

    log = _scheduled()
    # The last logged step at full rate is 800 of 0..995.
    assert decay_start(log) == pytest.approx(800 / 995)
    assert decay_start(log.assign(lr=1.0)) == 1.0  # constant: the whole run
    assert decay_start(log.drop(columns="lr")) == 1.0


def test_the_decay_alone_is_not_read_as_learning():
    """Over the last 20 % the decay lowers the FVU by ~10 %: the plain trend calls the run
    unconverged; the window before the decay sees it flat."""
    from isae.analysis.convergence import plateau_trend

    log = _scheduled()
    assert fvu_trend(log) > 0.05
    trend, end = plateau_trend(log)
    assert end == pytest.approx(800 / 995)
    assert abs(trend) < 0.01 and is_converged(trend, 0.02)
    # A run still learning on the plateau is caught: the factor 1.5 - step/2000 goes from
    # 1.2 to 1.1 over the window (steps 600 to 800), a fall of 1.2 / 1.1 - 1 = 9.1 %.
    learning = log.assign(fvu=log["fvu"] * (1.5 - 0.5 * log["step"] / 1000))
    assert plateau_trend(learning)[0] == pytest.approx(1.2 / 1.1 - 1, abs=0.01)
