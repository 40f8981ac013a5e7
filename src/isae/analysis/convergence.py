"""Has a training run stopped moving? Convergence controls read from a run's train log and
its dictionaries.

A stability number from a run that has not converged measures its initialisation, not the
architecture. Three controls, each a pure function:

* ``fvu_trend``: the relative change of the smoothed training FVU over a window of ``tail``
  of the steps ending at ``end`` (a fraction of the run; 1 = its last step),
  (FVU_start - FVU_end) / FVU_end; positive while the FVU still falls. The log's FVU is per
  batch and noisy, so it is smoothed first by a centred moving average over a ``smooth``
  fraction of the logged rows.
* ``decay_start``: where the learning rate starts to fall, read from the log's ``lr``
  column. A schedule that decays the rate to zero lowers the FVU by itself (less noise in
  the steps), so a window that covers the decay sees a fall even in a run that has long
  stopped learning; the study measures the window that ends where the decay starts.
* ``is_converged``: that change below a threshold (the study's config sets it).
* ``init_abs_cos``: each atom's |cos| with its own initial atom; near 1 means the atom has
  barely moved from where the seed put it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


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
              column: str = "fvu", end: float = 1.0) -> float:
    """Relative change of the smoothed ``column`` over a window of ``tail`` of the steps that
    ends at ``end`` of them (1: the last step): (s_start - s_end) / s_end, with s_start the
    smoothed value at the window's first logged step and s_end at its last. NaN when the
    window holds fewer than 3 logged rows (too short a log to say).

    (log: a train_log table with columns ``step`` and ``column``, one row per logging step.)
    """
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], not {tail}")
    if not tail <= end <= 1:
        raise ValueError(f"end must be in [tail, 1], not {end}")
    df = log.sort_values("step")
    steps = df["step"].to_numpy(np.float64)
    vals = df[column].to_numpy(np.float64)
    if len(steps) < 3:
        return math.nan
    span = steps[-1] - steps[0]
    stop = steps[0] + end * span
    start = stop - tail * span
    window = np.nonzero((steps >= start - 1e-9 * span) & (steps <= stop + 1e-9 * span))[0]
    if len(window) < 3:
        return math.nan
    s = smooth(vals, max(int(round(smooth_frac * len(vals))), 1))
    last = s[window[-1]]
    if not np.isfinite(last) or last <= 0:
        return math.nan
    return float((s[window[0]] - last) / last)


def decay_start(log: pd.DataFrame, column: str = "lr", tol: float = 1e-9) -> float:
    """The fraction of the run's steps after which the learning rate (``column``) stays
    below its maximum: 0.8 for a linear decay over the last 20 %, 1 for a constant rate
    (after warmup), just past the warmup for a cosine decay. 1 without the column.

    (log: a train_log table with ``step`` and ``column``, one row per logging step.)
    """
    if column not in log.columns or len(log) < 2:
        return 1.0
    df = log.sort_values("step")
    steps = df["step"].to_numpy(np.float64)
    lr = df[column].to_numpy(np.float64)
    top = np.nonzero(lr >= lr.max() * (1 - tol))[0]
    span = steps[-1] - steps[0]
    if span <= 0:
        return 1.0
    return float((steps[top[-1]] - steps[0]) / span)


def plateau_trend(log: pd.DataFrame, tail: float = 0.2, smooth_frac: float = 0.05) -> tuple[float, float]:
    """The study's convergence control: ``fvu_trend`` over the last ``tail`` of the steps
    before the learning rate starts to decay (``decay_start``), where only learning moves
    the FVU; over the run's last ``tail`` when the rate decays from early on (no such
    window). -> (the relative fall, the window's end as a fraction of the steps)."""
    end = decay_start(log)
    if end < tail:
        end = 1.0
    return fvu_trend(log, tail=tail, smooth_frac=smooth_frac, end=end), end


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
