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

Three stages, each a grid; finished runs are kept in ``<out>/runs.parquet`` and not rerun,
so an interrupted sweep resumes and a later stage reuses earlier runs:

* ``coarse``: batch size x learning rate (the width-scaled formula x 0.25, 1, 4, and
  absolute values), linear decay, ``isae`` and ``topk``, one seed, every shape;
* ``refine``: the batch sizes and learning rates that did best in the coarse stage,
  x schedule (linear decay over the last 20 %, cosine, constant), every arch, two seeds;
* ``long``: the chosen default trained 10x longer, for the convergence threshold.

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

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads this once
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from isae.analysis.convergence import fvu_trend
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
    trend = fvu_trend(train_log)
    # kept, so that any convergence control can be recomputed later without training again
    (tmp.parent / "logs").mkdir(exist_ok=True)
    train_log.to_parquet(tmp.parent / "logs" / f"{out.name}.parquet", index=False)
    row = {"shape": shape.name, "arch": arch, "batch": batch, "lr_spec": lr_spec, "decay": decay,
           "seed": seed, "tokens": tokens, "lr": lr, "steps": steps,
           "tokens_seen": summary["tokens"], "fvu_heldout": rec["fvu"],
           "dead_frac": rec["dead_frac"], "truth_cos": float(m.abs_cos.mean()),
           "truth_gt_0.9": float((m.abs_cos > 0.9).mean()), "trend": trend,
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
             tmp: Path, stage: str) -> None:
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
              f"b{batch} lr {lr_spec} {decay} s{seed}: steps {row['steps']}, truth "
              f"{row['truth_cos']:.3f}, fvu {row['fvu_heldout']:.3f}, trend {row['trend']:.3f}, "
              f"{row['wall_s']:.1f}s", flush=True)


def table(df: pd.DataFrame, by: list[str], title: str) -> pd.DataFrame:
    """Means over the other keys, plus the worst shape's truth recovery (must do well on all)."""
    per_shape = df.groupby(by + ["shape"], dropna=False)["truth_cos"].mean()
    t = df.groupby(by, dropna=False).agg(
        runs=("truth_cos", "size"), steps=("steps", "mean"), truth_cos=("truth_cos", "mean"),
        fvu_heldout=("fvu_heldout", "mean"), trend=("trend", "mean"), wall_s=("wall_s", "mean"))
    t["truth_worst_shape"] = per_shape.groupby(level=list(range(len(by)))).min()
    t = t.sort_values("truth_cos", ascending=False)
    print(f"\n{title}\n{t.to_string(float_format=lambda v: f'{v:.3f}')}\n", flush=True)
    return t


def per_shape_table(df: pd.DataFrame, by: list[str], title: str) -> None:
    t = df.pivot_table(index=by, columns="shape", values="truth_cos", aggfunc="mean")
    print(f"{title}\n{t.to_string(float_format=lambda v: f'{v:.3f}')}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/defaults_sweep", help="folder for sets and runs.parquet")
    p.add_argument("--stage", choices=["coarse", "refine", "long", "all"], default="all")
    p.add_argument("--tokens", type=int, default=1_500_000, help="training rows per run")
    p.add_argument("--rows", type=int, default=100_000, help="rows per synthetic set")
    p.add_argument("--shapes", default=",".join(s.name for s in SHAPES),
                   help="comma-separated shape names")
    p.add_argument("--batches", default="256,512,1024,2048,4096", help="coarse batch sizes")
    p.add_argument("--lrs", default="x0.25,x1,x4,3e-3,1e-2",
                   help="coarse learning rates: xF = F x the width-scaled formula, or absolute")
    p.add_argument("--archs", default="topk,isae,isae-iter", help="archs of the refine stage")
    p.add_argument("--seeds", default="0,1", help="seeds of the refine stage")
    p.add_argument("--keep", type=int, default=2, help="best batch sizes / lrs kept for refine")
    p.add_argument("--default", default=None,
                   help="batch,lr_spec,decay of the long stage (default: best of refine)")
    p.add_argument("--quick", action="store_true", help="a tiny sweep that checks the script")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.tokens, args.rows = 60_000, 20_000
        args.shapes, args.batches, args.lrs = "d32-a128-k3", "512,1024", "x1,x4"
        args.archs, args.seeds = "isae", "0"
    shapes = [s for s in SHAPES if s.name in args.shapes.split(",")]
    if not shapes:
        print(f"defaults_sweep: no known shape in {args.shapes!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    sets = make_sets(out, shapes, args.rows)
    store = Store(out / "runs.parquet")
    names = [s.name for s in shapes]
    batches = [int(b) for b in args.batches.split(",")]
    lrs = args.lrs.split(",")
    archs = args.archs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    T = args.tokens
    t0 = time.perf_counter()

    if args.stage in ("coarse", "refine", "all"):
        grid = [(s, a, b, lr, "linear", 0, T)
                for s, a, b, lr in itertools.product(names, ["isae", "topk"], batches, lrs)]
        run_grid(store, sets, shapes, grid, tmp, "coarse")
        df = store.df[store.df["tokens"] == T]
        df = df[df["shape"].isin(names) & df["decay"].eq("linear") & df["batch"].isin(batches)
                & df["lr_spec"].isin(lrs) & df["seed"].eq(0) & df["arch"].isin(["isae", "topk"])]
        coarse = table(df, ["batch", "lr_spec"], "coarse: batch x lr (linear decay, isae + topk, seed 0)")
        per_shape_table(df, ["batch", "lr_spec"], "coarse: truth recovery per shape")
    if args.stage in ("refine", "all"):
        best = coarse.head(args.keep)
        # keep the best cells' batch sizes and learning rates, crossed
        kb = sorted({int(b) for b, _ in best.index})
        kl = sorted({str(lr) for _, lr in best.index})
        grid = [(s, a, b, lr, dec, sd, T) for s, a, b, lr, dec, sd in
                itertools.product(names, archs, kb, kl, ["linear", "cosine", "constant"], seeds)]
        run_grid(store, sets, shapes, grid, tmp, "refine")
        df = store.df[store.df["tokens"] == T]
        df = df[df["shape"].isin(names) & df["batch"].isin(kb) & df["lr_spec"].isin(kl)
                & df["seed"].isin(seeds) & df["arch"].isin(archs)]
        refine = table(df, ["batch", "lr_spec", "decay"], "refine: every arch, seeds " + args.seeds)
        table(df, ["batch", "lr_spec", "decay", "arch"], "refine: per arch")
        per_shape_table(df, ["batch", "lr_spec", "decay"], "refine: truth recovery per shape")
    if args.stage in ("long", "all"):
        if args.default:
            b, lr, dec = args.default.split(",")
            chosen = (int(b), lr, dec)
        else:
            chosen = refine.index[0]
        b, lr, dec = int(chosen[0]), str(chosen[1]), str(chosen[2])
        grid = [(s, a, b, lr, dec, 0, t) for s, a, t in
                itertools.product(names, archs, [T, 10 * T])]
        run_grid(store, sets, shapes, grid, tmp, "long")
        df = store.df
        df = df[df["shape"].isin(names) & df["batch"].eq(b) & df["lr_spec"].eq(lr)
                & df["decay"].eq(dec) & df["seed"].eq(0) & df["arch"].isin(archs)
                & df["tokens"].isin([T, 10 * T])]
        cols = ["shape", "arch", "tokens", "steps", "truth_cos", "fvu_heldout", "trend", "wall_s"]
        print(f"long: batch {b}, lr {lr}, {dec}: each run at {T} and {10 * T} tokens\n"
              f"{df[cols].sort_values(['shape', 'arch', 'tokens']).to_string(index=False)}\n")
    print(f"defaults_sweep: {time.perf_counter() - t0:.0f} s; runs in {out / 'runs.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
