"""A small learning-rate sweep per architecture, so that each is compared at its own tuned
rate: every arch is trained at a few multiples of its default rate (one seed, one shared
pass over the data), and a rate with the lowest held-out FVU is kept.

The rule (``best_rates``), robust to the run-to-run noise of a GPU (reruns of one sweep
moved held-out FVU by ~7e-4, 0.5-1 % of it): the candidates whose FVU is within
``tolerance`` (relative, default 1 %) of the arch's best are tied, and of those the factor
closest to 1x in log scale is chosen (of two equally close, the smaller). A choice at the
smallest or largest factor of the grid is marked ``at_edge``: the best rate may lie beyond
it, and the grid should be extended there. ``sensitivity`` gives each choice's neighbours
on the grid (``isae.study.tables.lr_sensitivity``: FVU, and seed stability where the sweep
trained a second seed, ``pair_seed``).

The held-out rows that choose the rate are the rows the study later reports FVU on: with a
handful of candidates the optimism this adds to FVU is small, and the stability and
truth-recovery numbers do not use the FVU at all.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from isae.analysis.convergence import run_convergence
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import reconstruction_metrics
from isae.data.activations import ActivationSet
from isae.data.atomic import check_out, output_lock, write_json_atomic, write_table
from isae.data.checkpoints import load, load_decoder
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig, parse_arch
from isae.study.tables import lr_sensitivity
from isae.training.trainer import train_many

CRITERION = "heldout_fvu"
#: Relative FVU difference under which two rates are tied (GPU reruns move FVU by ~0.5-1 %).
TIE_TOLERANCE = 0.01
RULE = ("lowest held-out FVU; the candidates within {tol:g} % of it (relative) are tied, and of "
        "those the factor closest to 1x in log scale is chosen (the smaller of two as close)")


def factor_name(f: float) -> str:
    """0.25 -> "x0.25", 4.0 -> "x4": a path component."""
    return f"x{f:g}"


def tied_factors(g: pd.DataFrame, tolerance: float = TIE_TOLERANCE) -> pd.DataFrame:
    """The candidates of one arch (rows with factor, heldout_fvu) whose FVU is finite and
    within ``tolerance`` (relative) of the lowest; empty when every candidate diverged."""
    ok = g[g["heldout_fvu"].map(math.isfinite)]
    if ok.empty:
        return ok
    best = float(ok["heldout_fvu"].min())
    return ok[ok["heldout_fvu"] <= best + tolerance * abs(best)]


def best_rates(table: pd.DataFrame, tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """{arch: lr} by the module's rule: among the candidates within ``tolerance`` of the
    arch's lowest held-out FVU, the factor closest to 1x in log scale (the smaller of two as
    close; a diverged candidate has FVU inf). ``table``: arch, factor, lr, heldout_fvu.
    UserError when every candidate of an arch diverged."""
    out = {}
    for arch, g in table.groupby("arch", sort=False):
        tied = tied_factors(g, tolerance)
        if tied.empty:
            raise UserError(f"lr sweep: every learning rate of {arch} diverged")
        tied = tied.assign(_dist=tied["factor"].map(lambda f: abs(math.log(f))))
        out[str(arch)] = float(tied.sort_values(["_dist", "factor"], kind="stable")["lr"].iloc[0])
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
    pair_seed: int | None = None,
    tolerance: float = TIE_TOLERANCE,
) -> dict:
    """Train ``archs`` x ``factors`` (rate = factor x the arch's default rate) with ``seed``
    on one pass, and write under ``out``: ``ckpt/<arch>/<xF>/`` (the candidates),
    ``sweep.parquet`` (arch, factor, lr, held-out FVU, diverged, seed_abs_cos,
    within_tolerance, chosen, at_edge: the chosen row of an arch whose choice is the
    grid's smallest or largest factor) and ``lr.json`` ({"lr": {arch: chosen rate},
    "width" (the rates are for it; ``isae train --lr-from`` carries them to another width
    as the default scales), "criterion", "rule", "tolerance", "factors", "default": {arch: default rate},
    "at_edge": {arch: bool}, "sensitivity": [``sensitivity`` rows]}), the file ``isae
    train --lr-from`` reads. dl takes no rate and is left out.

    ``pair_seed``: also train every candidate with this seed (``ckpt/<arch>/<xF>-seed<S>/``,
    which the main grid's run of that seed at the chosen rate then reuses) and record the
    two seeds' matched |cos| per factor (``seed_abs_cos``): the stability at each rate,
    for the choice's neighbours. Without it, seed_abs_cos is NaN.
    """
    if not factors or any(not f > 0 for f in factors) or len(set(factors)) != len(factors):
        raise UserError(f"lr sweep factors must be distinct positive numbers, not {factors}")
    if not (0 <= tolerance < 1):
        raise UserError(f"lr sweep tie tolerance must be in [0, 1), not {tolerance}")
    if pair_seed is not None and pair_seed == seed:
        raise UserError(f"lr sweep: the pair seed must differ from the seed ({seed})")
    # Written into as the candidates finish (their resume states live there too), so an
    # existing out must be an lr sweep's, or empty; never an input's or a folder of other files.
    out = check_out(out, "lr-sweep", inputs=[activations], can_force=False)
    acts = ActivationSet(activations)
    archs = [a for a in archs if parse_arch(a).fields["kind"] != "dl"]
    if not archs:
        raise UserError("lr sweep: no architecture with a learning rate (dl has none)")
    default = tcfg.learning_rate(width)
    seeds = [seed] if pair_seed is None else [seed, pair_seed]
    cands = [(a, f, s_) for s_ in seeds for a in archs for f in factors]
    cfgs = [SAEConfig(d_in=acts.d, d_sae=width, k=k, arch=a, seed=s_, **parse_arch(a).fields)
            for a, _, s_ in cands]
    outs = [out / "ckpt" / a / (factor_name(f) + ("" if s_ == seed else f"-seed{s_}"))
            for a, f, s_ in cands]
    # The convergence control into each candidate's cfg.json, as isae train writes it: the
    # main grid reuses the chosen candidate as its first seed.
    with output_lock([out]):
        done = train_many(activations, cfgs, tcfg, outs, lrs=[f * default for _, f, _ in cands],
                          drop_diverged=True,
                          report=lambda log, steps, _out: run_convergence(log, tcfg, steps))
    result = {(a, f, s_): (summary, path) for (a, f, s_), summary, path in zip(cands, done, outs)}
    rows = []
    for arch in archs:
        for f in factors:
            summary, path = result[(arch, f, seed)]
            fvu, cos = math.inf, math.nan
            if not summary.get("diverged"):
                fvu = reconstruction_metrics(load(path, device=tcfg.device), acts)["fvu"]
                if pair_seed is not None and not result[(arch, f, pair_seed)][0].get("diverged"):
                    cos = match_dictionaries(load_decoder(path),
                                             load_decoder(result[(arch, f, pair_seed)][1]),
                                             device=tcfg.device).summary()["mean_abs_cos"]
            rows.append({"arch": arch, "factor": f, "lr": f * default, "heldout_fvu": fvu,
                         "diverged": bool(summary.get("diverged", False)),
                         "seed_abs_cos": float(cos)})
    table = pd.DataFrame(rows)
    chosen = best_rates(table, tolerance)
    tied = pd.concat([tied_factors(g, tolerance) for _, g in table.groupby("arch", sort=False)])
    table["within_tolerance"] = table.index.isin(tied.index)
    table["chosen"] = [chosen[a] == lr for a, lr in zip(table["arch"], table["lr"])]
    edge = table["factor"].isin([min(factors), max(factors)])
    table["at_edge"] = table["chosen"] & edge
    sens = lr_sensitivity(table)
    write_table(table, out / "sweep.parquet")
    choice = {"lr": chosen, "width": width, "criterion": CRITERION,
              "rule": RULE.format(tol=100 * tolerance),
              "tolerance": tolerance, "factors": list(factors),
              "default": {a: default for a in archs}, "seed": seed, "pair_seed": pair_seed,
              "tokens": tcfg.tokens,
              "at_edge": {a: bool(e) for a, e in zip(sens["arch"], sens["at_edge"])},
              "sensitivity": json_records(sens)}
    write_json_atomic(out / "lr.json", choice)
    return {"out": str(out), "lr": chosen,
            "factor": {a: float(table[(table.arch == a) & table.chosen]["factor"].iloc[0]) for a in archs},
            "at_edge": choice["at_edge"]}


def json_records(df: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: NaN and infinities as None, NumPy scalars as Python numbers."""
    out = []
    for rec in df.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else
                        v.item() if hasattr(v, "item") else v) for k, v in rec.items()})
    return out
