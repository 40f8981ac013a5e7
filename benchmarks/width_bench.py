"""Dead latents against width, one command: the training recipes x widths x architectures
(one seed each) on an activation set, and one table of held-out FVU, dead latents and speed.

    python benchmarks/width_bench.py --activations results/activations/minilm --device cuda

Defaults: widths 1536 and 12288 (4 and 32 x d for MiniLM's d 384), topk and isae, k 16,
batch 4096, 20 M training rows, the recipes of isae.models.config.RECIPES:

* ``isae``: today's (AuxK on latents silent for 200 000 rows), at each of --lr-factors x
  the default width-scaled rate (1 and 4; 4 is what the study's lr sweep chose for both
  archs at 4 x d, so the rate at width w is that choice x sqrt(1536 / w));
* ``live``: the same rate, AuxK on latents silent for 20 000 rows, a tied coder's (isae's)
  through its decoder rows only;
* ``sparsify``: EleutherAI sparsify's rate 2e-4 / sqrt(w / 2^14), its AuxK (normalised by
  the batch's variance, decoder rows only) and its 10 M-row dead window (--lr-factors does
  not apply);
* not in the default list: ``detached`` (the study's recipe at 16 and 32 x d: a tied
  coder's AuxK codes detached, today's window) and ``noaux`` (no AuxK), for isae-iter's
  dead latents at 32 x d (``--archs isae-iter --recipes detached,noaux,isae,live,sparsify``).

Training each recipe at factors 1 and 4 at two widths is also the check of the rule that
carries the rate chosen at 4 x d to width w by sqrt(1536 / w): it holds where the same
factor wins at both widths. On the CPU stand-in (benchmarks/RESULTS.md) the 20 000-row
window helped at x4 and hurt at x1, so both rates are worth the device time.

Each (width, recipe) is one pass over the data shared by the archs (isae.training.trainer
.train_many). Each checkpoint is then measured on the set's held-out rows (all of them,
or --heldout-rows): FVU, the latents that never fire (dead %), and, on as many training
rows, the same count (a latent that fires on training rows but never on held-out ones is
specific to the training documents, not dead). ``converged`` is isae train's control
(--converged-below). tok/s is the pass's rate (rows per second, all its archs together).

The default grid is 10 passes of 2 archs x 20 M rows (2 widths x (2 recipes x 2 rates +
sparsify)); on an H100 it should take about 3-5 minutes, most of it at width 12288 (not
measured yet: `--lr-factors 4` or `--widths 12288` halve it). It prints a line as each
pass starts and ends, with its rows/s. Tested on the CPU
at tiny sizes (tests/test_width_bench.py). Checkpoints go to --out (kept) or to a
temporary folder (deleted at the end). Prints the table last; --table writes it as Parquet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from isae.analysis.convergence import run_convergence
from isae.analysis.live import fired_latents
from isae.analysis.reconstruction import reconstruction_and_fired
from isae.data.activations import ActivationSet
from isae.data.checkpoints import load
from isae.errors import UserError
from isae.models.config import RECIPES, SAEConfig, TrainConfig
from isae.training.trainer import train_many


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", required=True, help="activation set (e.g. MiniLM's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--widths", default="1536,12288")
    p.add_argument("--archs", default="topk,isae")
    p.add_argument("--recipes", default="isae,live,sparsify",
                   help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--tokens", type=int, default=20_000_000, help="training rows per run")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr-factors", default="1,4",
                   help="comma-separated multiples of the recipe's width-scaled default rate, "
                        "each trained (not for sparsify, which trains at its own)")
    p.add_argument("--heldout-rows", type=int, default=0,
                   help="held-out rows measured (0: all; the dead count needs >= 100 000)")
    p.add_argument("--converged-below", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the checkpoints here")
    p.add_argument("--table", default=None, help="also write the table as Parquet")
    return p.parse_args(argv)


def learning_rate(recipe: str, width: int, factor: float) -> float:
    """The rate a recipe trains a coder of ``width`` latents at: sparsify's own, the others
    ``factor`` x their width-scaled default."""
    tcfg = TrainConfig.from_recipe(recipe)
    return tcfg.learning_rate(width) * (1.0 if recipe == "sparsify" else factor)


@torch.no_grad()
def dead_on_training_rows(ckpt, acts: ActivationSet, rows: int, batch: int = 8192) -> float:
    """Fraction of latents that never fire on the first ``rows`` training rows."""
    x = acts.load("train", max_rows=rows)["x"]
    fired = np.zeros(ckpt.d_sae, bool)
    for i in range(0, len(x), batch):
        c = ckpt.encode_raw(torch.as_tensor(x[i : i + batch], dtype=torch.float32))
        fired |= fired_latents(c.val, c.idx, ckpt.d_sae)
    return 1.0 - fired.mean()


def train_and_measure(args: argparse.Namespace, acts: ActivationSet, root: Path, archs: list[str],
                      width: int, recipe: str, factor: float) -> list[dict]:
    """One pass: ``archs`` at ``width`` under ``recipe`` at ``factor`` x its rate, then each
    checkpoint measured. -> one table row per arch."""
    lr = learning_rate(recipe, width, factor)
    tcfg = TrainConfig.from_recipe(recipe, tokens=args.tokens, batch_size=args.batch_size, lr=lr,
                                   device=args.device, seed=args.seed,
                                   converged_below=args.converged_below)
    cfgs = [SAEConfig.from_arch(a, d_in=acts.d, d_sae=width, k=args.k, seed=args.seed)
            for a in archs]
    outs = [root / f"w{width}" / f"{recipe}-x{factor:g}" / a for a in archs]
    done = train_many(acts.path, cfgs, tcfg, outs, resume=False, force=True,
                      report=lambda log, steps, out: run_convergence(log, tcfg, steps))
    rows = []
    for arch, out, s in zip(archs, outs, done):
        ckpt = load(out, device=args.device)
        rec, _ = reconstruction_and_fired(ckpt, acts, max_rows=args.heldout_rows or None)
        rows.append({
            "width": width, "arch": arch, "recipe": recipe, "lr_factor": factor, "lr": lr,
            "fvu_heldout": rec["fvu"], "dead_pct": 100 * rec["dead_frac"],
            "dead_train_rows_pct": 100 * dead_on_training_rows(ckpt, acts, rec["rows"]),
            "heldout_rows": rec["rows"], "tok_per_s": s["tokens_per_s"] / len(archs),
            "converged": s["converged"],
            "fvu_trend_pct": 100 * (np.nan if s["fvu_trend"] is None else s["fvu_trend"]),
        })
    return rows


def run(args: argparse.Namespace) -> pd.DataFrame:
    widths = [int(w) for w in args.widths.split(",")]
    archs = args.archs.split(",")
    recipes = args.recipes.split(",")
    factors = [float(f) for f in args.lr_factors.split(",")]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    acts = ActivationSet(args.activations)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="width_bench-"))
    grid = [(w, r, f) for w in widths for r in recipes
            for f in ([1.0] if r == "sparsify" else factors)]
    rows = []
    t0 = time.perf_counter()
    try:
        for i, (width, recipe, factor) in enumerate(grid):
            print(f"[{time.perf_counter() - t0:6.0f} s] pass {i + 1}/{len(grid)}: width {width}, "
                  f"recipe {recipe} x{factor:g} ({', '.join(archs)})", file=sys.stderr, flush=True)
            part = train_and_measure(args, acts, root, archs, width, recipe, factor)
            rows += part
            print(f"[{time.perf_counter() - t0:6.0f} s]   " + "; ".join(
                f"{r['arch']}: FVU {r['fvu_heldout']:.4f}, dead {r['dead_pct']:.1f} %, "
                f"{r['tok_per_s'] / 1e6:.2f} M rows/s" for r in part), file=sys.stderr, flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        table = run(args)
    except UserError as e:
        print(f"width_bench: {e}", file=sys.stderr)
        return 2
    if args.table:
        table.to_parquet(args.table, index=False)
    fmt = {"lr_factor": "{:g}", "lr": "{:.3g}", "fvu_heldout": "{:.4f}", "dead_pct": "{:.1f}",
           "dead_train_rows_pct": "{:.1f}", "tok_per_s": "{:,.0f}", "fvu_trend_pct": "{:.1f}"}
    shown = table.assign(**{c: table[c].map(f.format) for c, f in fmt.items()})
    print(f"\nwidth_bench: {args.tokens:,} rows per run, batch {args.batch_size}, k {args.k}, "
          f"seed {args.seed}, on {args.device}")
    print(shown.to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
