"""Split-data reproducibility: SAEs of one recipe trained on two disjoint halves of the data
(``isae split``), each matched with the SAE of the same architecture and seed on the other
half.

The seed is held equal, so the two SAEs start from the same dictionary and see the same
order of steps; what differs is the data they were trained on. Their matched |cos| says how
much of a dictionary the data fix, beside the seeds' agreement on the same data (a seed
pair) and the trained null's (the same recipe on Gaussian data).
"""

from __future__ import annotations

import os

import pandas as pd

from isae.analysis.compare import compare_checkpoints
from isae.analysis.runs import find_checkpoints
from isae.data.activations import ActivationSet
from isae.data.checkpoints import read_cfg
from isae.errors import UserError

#: The columns of ``match_halves``' table besides arch and seed: the summary of ``isae
#: match`` that does not describe one side (paths, shapes), where it has them.
DROPPED = ("a", "b", "arch_a", "arch_b", "k_a", "k_b", "width_a", "width_b", "seed_a",
           "seed_b", "truth_a", "truth_b")


def _by_identity(folder: str | os.PathLike) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for path in find_checkpoints([folder]):
        cfg = read_cfg(path)
        key = (str(cfg.get("arch")), int(cfg.get("seed", -1)))
        if key in out:
            raise UserError(f"two checkpoints of arch {key[0]} seed {key[1]} under {folder}")
        out[key] = str(path)
    return out


def match_halves(
    half0: str | os.PathLike,
    half1: str | os.PathLike,
    activations: str | os.PathLike | None = None,
    *,
    max_rows: int | None = 10000,
    device: str = "cpu",
) -> pd.DataFrame:
    """Every checkpoint under ``half0`` against the one of the same arch and seed under
    ``half1`` (``isae.analysis.compare.compare_checkpoints``; B matched onto A). With
    ``activations`` (a set whose held-out rows both halves share: the split set, or either
    half), codes are compared on its first ``max_rows`` held-out rows too.

    -> one row per (arch, seed) present under both, sorted: arch, seed, mean_abs_cos,
    frac_gt_0.9, ... (the summary of ``isae match``). UserError when no (arch, seed) is
    under both."""
    a, b = _by_identity(half0), _by_identity(half1)
    common = sorted(set(a) & set(b))
    if not common:
        raise UserError(f"no checkpoint of the same arch and seed under both {half0} and {half1}")
    acts = ActivationSet(activations) if activations is not None else None
    if max_rows is None:
        max_rows = acts.rows if acts is not None else 1
    rows = []
    for arch, seed in common:
        _, summary = compare_checkpoints(a[(arch, seed)], b[(arch, seed)], acts,
                                         max_rows=max_rows, device=device)
        rows.append({"arch": arch, "seed": seed,
                     **{k: v for k, v in summary.items() if k not in DROPPED}})
    return pd.DataFrame(rows)
