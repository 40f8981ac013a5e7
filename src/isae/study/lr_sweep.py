"""A small learning-rate sweep per architecture, so that each is compared at its own tuned
rate: every arch is trained at a few multiples of its default rate (one seed, one shared
pass over the data), and the rate with the lowest held-out FVU is kept.

The held-out rows that choose the rate are the rows the study later reports FVU on: with a
handful of candidates the optimism this adds to FVU is small, and the stability and
truth-recovery numbers do not use the FVU at all.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from isae.analysis.convergence import run_convergence
from isae.analysis.reconstruction import reconstruction_metrics
from isae.data.activations import ActivationSet
from isae.data.atomic import write_json_atomic, write_table
from isae.data.checkpoints import load
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig, parse_arch
from isae.training.trainer import train_many

CRITERION = "heldout_fvu"


def factor_name(f: float) -> str:
    """0.25 -> "x0.25", 4.0 -> "x4": a path component."""
    return f"x{f:g}"


def best_rates(table: pd.DataFrame) -> dict[str, float]:
    """{arch: lr} with the lowest held-out FVU per arch (ties: the smaller rate; a diverged
    candidate has FVU inf). UserError when every candidate of an arch diverged."""
    out = {}
    for arch, g in table.groupby("arch", sort=False):
        ok = g[g["heldout_fvu"].map(math.isfinite)]
        if ok.empty:
            raise UserError(f"lr sweep: every learning rate of {arch} diverged")
        ok = ok.sort_values(["heldout_fvu", "lr"], kind="stable")
        out[str(arch)] = float(ok["lr"].iloc[0])
    return out


def lr_sweep(
    activations: str | os.PathLike,
    archs: list[str],
    factors: list[float],
    k: int,
    width: int,
    tcfg: TrainConfig,
    out: str | os.PathLike,
    seed: int = 0,
) -> dict:
    """Train ``archs`` x ``factors`` (rate = factor x the arch's default rate) with ``seed``
    on one pass, and write under ``out``: ``ckpt/<arch>/<xF>/`` (the candidates),
    ``sweep.parquet`` (arch, factor, lr, held-out FVU, diverged) and ``lr.json``
    ({"lr": {arch: chosen rate}, "criterion", "factors", "default": {arch: default rate}}),
    the file ``isae train --lr-from`` reads. dl takes no rate and is left out.
    """
    if not factors or any(not f > 0 for f in factors) or len(set(factors)) != len(factors):
        raise UserError(f"lr sweep factors must be distinct positive numbers, not {factors}")
    acts = ActivationSet(activations)
    archs = [a for a in archs if parse_arch(a).fields["kind"] != "dl"]
    if not archs:
        raise UserError("lr sweep: no architecture with a learning rate (dl has none)")
    out = Path(out)
    default = tcfg.learning_rate(width)
    cands = [(a, f) for a in archs for f in factors]
    cfgs = [SAEConfig(d_in=acts.d, d_sae=width, k=k, arch=a, seed=seed, **parse_arch(a).fields)
            for a, _ in cands]
    outs = [out / "ckpt" / a / factor_name(f) for a, f in cands]
    # The convergence control into each candidate's cfg.json, as isae train writes it: the
    # main grid reuses the chosen candidate as its first seed.
    done = train_many(activations, cfgs, tcfg, outs, lrs=[f * default for _, f in cands],
                      drop_diverged=True,
                      report=lambda log, steps, _out: run_convergence(log, tcfg, steps))
    rows = []
    for (arch, f), summary, path in zip(cands, done, outs):
        fvu = math.inf
        if not summary.get("diverged"):
            fvu = reconstruction_metrics(load(path), acts)["fvu"]
        rows.append({"arch": arch, "factor": f, "lr": f * default, "heldout_fvu": fvu,
                     "diverged": bool(summary.get("diverged", False))})
    table = pd.DataFrame(rows)
    chosen = best_rates(table)
    table["chosen"] = [chosen[a] == lr for a, lr in zip(table["arch"], table["lr"])]
    write_table(table, out / "sweep.parquet")
    choice = {"lr": chosen, "criterion": CRITERION, "factors": list(factors),
              "default": {a: default for a in archs}, "seed": seed, "tokens": tcfg.tokens}
    write_json_atomic(out / "lr.json", choice)
    return {"out": str(out), "lr": chosen,
            "factor": {a: float(table[(table.arch == a) & table.chosen]["factor"].iloc[0]) for a in archs}}
