"""Which training defaults (batch size, learning rate, schedule) recover a known dictionary
best at a fixed token budget? The evidence behind ``TrainConfig``'s defaults.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/defaults_sweep.py [--out DIR]
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/defaults_sweep.py --stage coarse
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/defaults_sweep.py --quick   # a minute

Synthetic sets with signed codes and a known dictionary (``truth/``), several shapes; SAEs
with width = atoms and k = the true k, all at the same token budget (``--tokens``, default
1.5 M). Each run records held-out FVU, truth recovery (Hungarian-matched mean |cos| of the
decoder with the true dictionary), optimiser steps, wall time and the convergence control
(relative fall of the smoothed training FVU over the last 20 % of steps).

Four stages, each a grid; finished runs are kept in ``<out>/runs.parquet`` and not rerun,
so an interrupted sweep resumes and a later stage reuses earlier runs:

* ``coarse``: batch size x learning rate (xF = F x the width-scaled formula
  2e-4 / sqrt(width / 2^14) of Gao et al.), linear decay, ``isae`` and ``topk``, seed 0, on
  the coherent and the well-posed shape. It picks the cell whose worst (shape, arch) truth
  recovery is best, ties (within ``--tol``) going to the larger batch;
* ``refine``: that cell x schedule (linear decay over the last 20 %, cosine, constant),
  ``topk`` and ``isae``, two seeds, every shape; picks the schedule with the best mean
  truth recovery, ties (within ``--tol``) going to the lower held-out FVU;
* ``compare``: the old default (batch 4096, lr x1), batch 1024 at lr x1, and the chosen
  default, ``topk``, ``isae`` and ``isae-iter``, two seeds, every shape;
* ``long``: the chosen default at the budget and at 10x it, to calibrate the convergence
  threshold (the runs at 10x are the reference for "has stopped moving").

Prints a table per stage (means over shapes, seeds and archs) and writes
``<out>/runs.parquet``. One process, one thread: the machine is shared.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from isae import progress
from isae.analysis.convergence import fvu_trend, run_convergence
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import reconstruction_metrics
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.data.sources import synthetic
from isae.models.config import SAEConfig, TrainConfig
from isae.training.trainer import train


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    atoms: int
    k: int


#: Coherent (the embedded default's shape), well-posed (restricted isometry on unions of true
#: supports), and two in between.
SHAPES = [
    Shape("d64-a256-k8", 64, 256, 8),
    Shape("d128-a512-k4", 128, 512, 4),
    Shape("d32-a128-k3", 32, 128, 3),
    Shape("d96-a384-k6", 96, 384, 6),
]
KEY = ["shape", "arch", "batch", "lr_spec", "decay", "seed", "tokens"]


def formula_lr(width: int) -> float:
    """The width-scaled learning rate of Gao et al. / sparsify: 2e-4 / sqrt(width / 2^14)."""
    return 2e-4 / math.sqrt(width / 2**14)


def resolve_lr(spec: str, width: int) -> float:
    """``"x4"`` = 4 x the width-scaled formula; ``"3e-3"`` = that absolute value."""
    return formula_lr(width) * float(spec[1:]) if spec.startswith("x") else float(spec)


def make_sets(root: Path, shapes: list[Shape], rows: int) -> dict[str, Path]:
    paths = {}
    for s in shapes:
        p = root / "sets" / s.name
        if not (p / "truth").is_dir():
            synthetic.extract(str(p), seed=0, d=s.d, atoms=s.atoms, k=s.k, rows=rows,
                              noise=0.05, zipf=1.0)
        paths[s.name] = p
    return paths


def run_one(set_path: Path, shape: Shape, arch: str, batch: int, lr_spec: str, decay: str,
            seed: int, tokens: int, tmp: Path) -> dict:
    sae = SAEConfig.from_arch(arch, d_in=shape.d, d_sae=shape.atoms, k=shape.k, seed=seed)
    steps = max(math.ceil(tokens / batch), 1)
    lr = resolve_lr(lr_spec, shape.atoms)
    # ~200 log rows whatever the batch, so that the convergence control is comparable.
    tcfg = TrainConfig(tokens=tokens, batch_size=batch, lr=lr, decay=decay, seed=seed,
                       log_every=max(steps // 200, 1), checkpoint_every=10**9)
    out = tmp / f"{shape.name}-{arch}-{batch}-{lr_spec}-{decay}-{seed}-{tokens}"
    t0 = time.perf_counter()
    summary = train(set_path, sae, tcfg, out, resume=False)
    wall = time.perf_counter() - t0
    ck = checkpoint.load(out)
    rec = reconstruction_metrics(ck, ActivationSet(set_path))
    truth = checkpoint.load_decoder(set_path / "truth")
    m = match_dictionaries(ck.W_dec, truth)
    train_log = pd.read_parquet(out / "train_log.parquet")
    # kept, so that any convergence control can be recomputed later without training again
    (tmp.parent / "logs").mkdir(exist_ok=True)
    train_log.to_parquet(tmp.parent / "logs" / f"{out.name}.parquet", index=False)
    conv = run_convergence(train_log, tcfg, steps)
    row = {"shape": shape.name, "arch": arch, "batch": batch, "lr_spec": lr_spec, "decay": decay,
           "seed": seed, "tokens": tokens, "lr": lr, "steps": steps,
           "tokens_seen": summary["tokens"], "fvu_heldout": rec["fvu"],
           "dead_frac": rec["dead_frac"], "truth_cos": float(m.abs_cos.mean()),
           "truth_gt_0.9": float((m.abs_cos > 0.9).mean()),
           # the trainer's convergence control, and the plain fall over the last 20 % of steps
           # (which includes what the final linear decay itself takes off the FVU)
           "fvu_trend": conv["fvu_trend"] if conv["fvu_trend"] is not None else math.nan,
           "converged": conv["converged"], "trend_last20": fvu_trend(train_log),
           "train_fvu_last": summary["fvu"], "wall_s": wall}
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return row


class Store:
    """runs.parquet: one row per finished run, keyed by KEY; written after every run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.df = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=KEY)

    def has(self, key: tuple) -> bool:
        if self.df.empty:
            return False
        sel = np.ones(len(self.df), bool)
        for c, v in zip(KEY, key):
            sel &= (self.df[c] == v).to_numpy()
        return bool(sel.any())

    def add(self, row: dict) -> None:
        self.df = pd.concat([self.df, pd.DataFrame([row])], ignore_index=True)
        tmp = self.path.with_suffix(".tmp")
        self.df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)


def run_grid(store: Store, sets: dict[str, Path], shapes: list[Shape], grid: list[tuple],
             tmp: Path, stage: str) -> pd.DataFrame:
    """Train every cell of ``grid`` not yet in the store; return the grid's rows."""
    todo = [g for g in grid if not store.has(g)]
    print(f"[{stage}] {len(grid)} runs, {len(grid) - len(todo)} already done", flush=True)
    by_name = {s.name: s for s in shapes}
    t0 = time.perf_counter()
    for i, key in enumerate(todo):
        shape, arch, batch, lr_spec, decay, seed, tokens = key
        row = run_one(sets[shape], by_name[shape], arch, batch, lr_spec, decay, seed, tokens, tmp)
        row["stage"] = stage
        store.add(row)
        print(f"[{stage} {i + 1}/{len(todo)} {time.perf_counter() - t0:.0f}s] {shape} {arch} "
              f"b{batch} lr {lr_spec} {decay} s{seed} {tokens} tok: {row['steps']} steps, truth "
              f"{row['truth_cos']:.3f}, fvu {row['fvu_heldout']:.3f}, trend {row['fvu_trend']:.3f}, "
              f"{row['wall_s']:.1f}s", flush=True)
    keys = pd.DataFrame(grid, columns=KEY)
    return keys.merge(store.df.drop_duplicates(KEY, keep="last"), on=KEY, how="left")


def show(t: pd.DataFrame, title: str) -> None:
    print(f"\n{title}\n{t.to_string(float_format=lambda v: f'{v:.3f}')}\n", flush=True)


def summarise(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Means over shapes, archs and seeds (abs_trend: of |fvu_trend|; converged: the
    fraction converged); the worst (shape, arch) cell's truth recovery, since a default
    must do well on every shape, not on average."""
    cell = df.groupby(by + ["shape", "arch"], dropna=False)["truth_cos"].mean()
    df = df.assign(abs_trend=df["fvu_trend"].abs(), converged=df["converged"].astype(float))
    t = df.groupby(by, dropna=False).agg(
        runs=("truth_cos", "size"), steps=("steps", "mean"), truth_cos=("truth_cos", "mean"),
        fvu_heldout=("fvu_heldout", "mean"), abs_trend=("abs_trend", "mean"),
        converged=("converged", "mean"), wall_s=("wall_s", "mean"))
    t["truth_worst"] = cell.groupby(level=list(range(len(by)))).min()
    return t


def per_cell(df: pd.DataFrame, by: list[str], value: str = "truth_cos") -> pd.DataFrame:
    return df.pivot_table(index=by, columns=["shape", "arch"], values=value, aggfunc="mean")


def choose_cell(t: pd.DataFrame, tol: float) -> tuple[int, str]:
    """Robust first: the cells whose worst (shape, arch) truth recovery is within ``tol`` of
    the best worst case; of those the largest batch (fewest steps, cheapest on a GPU); then
    that batch's learning rate with the best mean."""
    good = t[t["truth_worst"] >= t["truth_worst"].max() - tol]
    batch = max(b for b, _ in good.index)
    lr = good.loc[batch]["truth_cos"].idxmax()
    return int(batch), str(lr)


OLD_DEFAULT = (4096, "x1", "linear")
"""TrainConfig's defaults before this sweep: batch 4096, Gao et al.'s width-scaled lr, linear decay."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/defaults_sweep", help="folder for sets and runs.parquet")
    p.add_argument("--stage", choices=["coarse", "refine", "compare", "long", "all"], default="all")
    p.add_argument("--tokens", type=int, default=1_500_000, help="training rows per run")
    p.add_argument("--rows", type=int, default=100_000, help="rows per synthetic set")
    p.add_argument("--shapes", default=",".join(s.name for s in SHAPES),
                   help="shapes of the refine and compare stages")
    p.add_argument("--coarse-shapes", default="d64-a256-k8,d128-a512-k4",
                   help="shapes of the coarse stage (the coherent and the well-posed one)")
    p.add_argument("--batches", default="512,1024,2048,4096", help="coarse batch sizes")
    p.add_argument("--lrs", default="x1,x4,x16",
                   help="coarse learning rates: xF = F x the width-scaled formula, or absolute")
    p.add_argument("--tol", type=float, default=0.01,
                   help="worst-case truth recovery within this of the best counts as a tie "
                        "(seed noise); ties go to the larger batch")
    p.add_argument("--cell", default=None, help="batch,lr_spec for refine (default: from coarse)")
    p.add_argument("--decay", default=None, help="schedule for compare/long (default: from refine)")
    p.add_argument("--seeds", default="0,1", help="seeds of the refine and compare stages")
    p.add_argument("--long-shapes", default="d32-a128-k3,d64-a256-k8,d128-a512-k4",
                   help="shapes trained 10x longer to calibrate the convergence threshold")
    p.add_argument("--quick", action="store_true", help="a tiny sweep that checks the script")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    progress.ENABLED = False  # one line per run instead
    logging.basicConfig(level=logging.ERROR)  # the runs' own convergence warnings are in the table
    if args.quick:
        args.tokens, args.rows = 60_000, 20_000
        args.shapes = args.coarse_shapes = args.long_shapes = "d32-a128-k3"
        args.batches, args.lrs, args.seeds = "512,1024", "x1,x4", "0"
    names = args.shapes.split(",")
    coarse_names = args.coarse_shapes.split(",")
    long_names = args.long_shapes.split(",")
    known = {s.name: s for s in SHAPES}
    unknown = [n for n in {*names, *coarse_names, *long_names} if n not in known]
    if unknown:
        print(f"defaults_sweep: unknown shape(s) {', '.join(unknown)}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    shapes = [known[n] for n in dict.fromkeys([*names, *coarse_names, *long_names])]
    out = Path(args.out)
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    sets = make_sets(out, shapes, args.rows)
    store = Store(out / "runs.parquet")
    batches = [int(b) for b in args.batches.split(",")]
    lrs = args.lrs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    T = args.tokens
    every = args.stage == "all"
    t0 = time.perf_counter()

    cell = None
    if args.cell:
        b, lr = args.cell.split(",")
        cell = (int(b), lr)
    if every or args.stage == "coarse" or (cell is None and args.stage == "refine"):
        grid = [(s, a, b, lr, "linear", 0, T) for s, a, b, lr in
                itertools.product(coarse_names, ["isae", "topk"], batches, lrs)]
        df = run_grid(store, sets, shapes, grid, tmp, "coarse")
        t = summarise(df, ["batch", "lr_spec"])
        show(t, f"coarse: batch x lr, linear decay, isae and topk, seed 0, {T} tokens "
                f"(lr xF = F x 2e-4 / sqrt(width / 2^14))")
        show(per_cell(df, ["batch", "lr_spec"]), "coarse: truth recovery per shape and arch")
        if cell is None:
            cell = choose_cell(t, args.tol)
        print(f"coarse: chosen batch {cell[0]}, lr {cell[1]}")

    decay = args.decay
    archs2 = ["topk", "isae"]
    if every or args.stage == "refine" or (decay is None and args.stage in ("compare", "long")):
        if cell is None:
            print("defaults_sweep: --cell batch,lr is needed without the coarse stage", file=sys.stderr)
            return 2
        b, lr = cell
        grid = [(s, a, b, lr, dec, sd, T) for s, a, dec, sd in
                itertools.product(names, archs2, ["linear", "cosine", "constant"], seeds)]
        df = run_grid(store, sets, shapes, grid, tmp, "refine")
        t = summarise(df, ["decay"])
        show(t, f"refine: schedule at batch {b}, lr {lr}; topk and isae, seeds {args.seeds}")
        show(per_cell(df, ["decay"]), "refine: truth recovery per shape and arch")
        if decay is None:  # best truth recovery; within --tol of it, the lowest held-out FVU
            decay = str(t[t["truth_cos"] >= t["truth_cos"].max() - args.tol]["fvu_heldout"].idxmin())
        print(f"refine: chosen schedule {decay}")

    if every or args.stage in ("compare", "long"):
        if cell is None or decay is None:
            print("defaults_sweep: --cell and --decay are needed without the earlier stages",
                  file=sys.stderr)
            return 2
    chosen = (cell[0], cell[1], decay) if cell and decay else None
    if every or args.stage == "compare":
        configs = [OLD_DEFAULT, (1024, "x1", "linear"), chosen]
        grid = [(s, a, b, lr, dec, sd, T) for (b, lr, dec), s, a, sd in
                itertools.product(dict.fromkeys(configs), names, ["topk", "isae", "isae-iter"], seeds)]
        df = run_grid(store, sets, shapes, grid, tmp, "compare")
        by = ["batch", "lr_spec", "decay"]
        show(summarise(df, by), f"compare: old default (batch 4096, lr x1), batch 1024 at lr x1, "
                                f"and the chosen default; every shape, arch and seed {args.seeds}")
        show(summarise(df, by + ["arch"]), "compare: per arch")
        show(per_cell(df, by), "compare: truth recovery per shape and arch")
        show(per_cell(df, by, "fvu_heldout"), "compare: held-out FVU per shape and arch")

    if every or args.stage == "long":
        b, lr, dec = chosen
        grid = [(s, a, b, lr, dec, 0, t) for s, a, t in
                itertools.product(long_names, archs2, [T, 10 * T])]
        df = run_grid(store, sets, shapes, grid, tmp, "long")
        cols = ["shape", "arch", "tokens", "steps", "truth_cos", "fvu_heldout", "fvu_trend",
                "trend_last20", "converged", "wall_s"]
        show(df[cols].sort_values(["shape", "arch", "tokens"]).set_index(["shape", "arch", "tokens"]),
             f"long: batch {b}, lr {lr}, {dec}, at {T} and {10 * T} tokens (fvu_trend: the "
             f"trainer's control, before the final decay; trend_last20: over the last 20 %)")
    print(f"defaults_sweep: {time.perf_counter() - t0:.0f} s; runs in {out / 'runs.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
