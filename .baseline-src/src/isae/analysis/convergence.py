"""Has a training run stopped moving? Convergence controls read from a run's train log and
its dictionaries.

A stability number from a run that has not converged measures its initialisation, not the
architecture. Three controls, each a pure function:

* ``fvu_trend``: the relative change of the smoothed training FVU over the last ``tail`` of
  the steps, (FVU_start - FVU_end) / FVU_end; positive while the FVU still falls. The log's
  FVU is per batch and noisy, so it is smoothed first by a centred moving average over a
  ``smooth`` fraction of the logged rows.
* ``is_converged``: that change below a threshold (the study's config sets it).
* ``init_abs_cos``: each atom's |cos| with its own initial atom; near 1 means the atom has
  barely moved from where the seed put it.

``run_convergence`` is the control ``isae train`` states at the end of each run: the trend
over the 20 % of steps before the final learning-rate decay, whose size must be small.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from isae.models.config import TrainConfig


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average with a window of ``window`` rows, shrunk at the edges (each
    output averages the rows within window // 2 of it that exist)."""
    v = np.asarray(values, np.float64)
    if window <= 1 or len(v) < 2:
        return v.copy()
    half = window // 2
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo = np.maximum(i - half, 0)
    hi = np.minimum(i + half + 1, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


def fvu_trend(log: pd.DataFrame, tail: float = 0.2, smooth_frac: float = 0.05,
              column: str = "fvu") -> float:
    """Relative change of the smoothed ``column`` over the last ``tail`` fraction of the
    steps: (s_start - s_end) / s_end, where s_start is the smoothed value at the first logged
    step of the tail and s_end at the last step. NaN when the tail holds fewer than 3 logged
    rows (too short a log to say).

    (log: a train_log table with columns ``step`` and ``column``, one row per logging step.)
    """
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], not {tail}")
    df = log.sort_values("step")
    steps = df["step"].to_numpy(np.float64)
    vals = df[column].to_numpy(np.float64)
    if len(steps) < 3:
        return math.nan
    start = steps[-1] - tail * (steps[-1] - steps[0])
    in_tail = np.nonzero(steps >= start)[0]
    if len(in_tail) < 3:
        return math.nan
    s = smooth(vals, max(int(round(smooth_frac * len(vals))), 1))
    end = s[-1]
    if not np.isfinite(end) or end <= 0:
        return math.nan
    return float((s[in_tail[0]] - end) / end)


def is_converged(rel_change: float, threshold: float) -> bool:
    """Converged: the smoothed FVU fell by less than ``threshold`` (relative) over the tail.
    An undefined change (too short a log) is not converged."""
    return bool(np.isfinite(rel_change) and rel_change < threshold)


def init_abs_cos(W: np.ndarray, W_init: np.ndarray) -> np.ndarray:
    """[N] |cos| of each atom (row of W [N, D]) with the same row of its initial dictionary."""
    W = np.asarray(W, np.float64)
    W0 = np.asarray(W_init, np.float64)
    if W.shape != W0.shape:
        raise ValueError(f"dictionaries of shapes {W.shape} and {W0.shape}")
    num = np.abs((W * W0).sum(1))
    den = np.linalg.norm(W, axis=1) * np.linalg.norm(W0, axis=1)
    return num / np.maximum(den, 1e-300)


#: Fraction of a run's steps over which ``run_convergence`` measures the FVU's change.
CONVERGENCE_TAIL = 0.2


def convergence_window(total_steps: int, tcfg: TrainConfig) -> tuple[int, int]:
    """[start, end) steps over which ``run_convergence`` measures: the last
    CONVERGENCE_TAIL of the steps before the final linear decay begins, or of all steps for
    the other schedules. The decay lowers the FVU by itself, converged or not: over the last
    20 % of steps, runs trained 10x longer than needed still fell by 1.6-6.5 %
    (benchmarks/RESULTS.md, the defaults sweep)."""
    end = tcfg.decay_start(total_steps) if tcfg.decay == "linear" else total_steps
    return max(end - round(CONVERGENCE_TAIL * total_steps), 0), end


def run_convergence(log: pd.DataFrame, tcfg: TrainConfig, total_steps: int) -> dict:
    """The convergence control of one finished training run, from its own log:
    ``fvu_trend`` (``fvu_trend`` over ``convergence_window``, positive while the FVU falls;
    None when the log is too short to say), ``fvu_trend_steps`` (the window), ``converged``
    (|trend| under ``tcfg.converged_below``: an FVU that rises at a constant learning rate
    has not settled either) and ``converged_below``.

    (log: a train_log table with columns ``step`` and ``fvu``; smoothed within the window's
    part of the log only, so no row of the decay leaks into it.)
    """
    start, end = convergence_window(total_steps, tcfg)
    part = log[log["step"] < end]
    span = float(part["step"].max() - part["step"].min()) if len(part) else 0.0
    trend = fvu_trend(part, tail=min((end - start) / span, 1.0)) if span > 0 else math.nan
    return {"fvu_trend": trend if math.isfinite(trend) else None,
            "fvu_trend_steps": [start, end],
            "converged": is_converged(abs(trend), tcfg.converged_below),
            "converged_below": tcfg.converged_below}
