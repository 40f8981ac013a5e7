"""``isae lr-sweep``: each architecture trained at a few multiples of its default learning
rate on one seed; the rate chosen by held-out FVU, ties within a tolerance going to the
factor closest to 1x, is written to OUT/lr.json for ``isae train --lr-from`` (see
isae.study.lr_sweep)."""

from __future__ import annotations

import argparse

from isae.cli.fields import add_field_flags, field_values
from isae.cli.train import TRAIN_FLAGS
from isae.models.config import TrainConfig

#: isae train's training options that lr-sweep passes on to every candidate (the flags it
#: defines itself aside), so that a rate is chosen for the recipe the runs then train with.
OPTION_FLAGS = tuple(f for f in TRAIN_FLAGS
                     if f not in ("tokens", "batch_size", "lr", "device", "log_every"))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lr-sweep", help="choose each architecture's learning rate by held-out FVU",
        description="Each architecture at each factor x its default rate, one seed. Chosen: "
        "among the factors whose held-out FVU is within --tie-tolerance (relative) of the "
        "lowest, the one closest to 1x in log scale (the smaller of two as close), so that "
        "GPU run-to-run noise does not decide between near-equal rates. A choice at the "
        "grid's smallest or largest factor is marked at_edge in sweep.parquet and lr.json: "
        "extend --factors there.")
    p.add_argument("--activations", required=True, help="activation-set folder")
    p.add_argument("--arch", required=True, help="comma-separated architectures (dl is skipped)")
    p.add_argument("--factors", default="0.25,1,4",
                   help="comma-separated multiples of the default rate to try")
    p.add_argument("--k", type=int, required=True, help="active latents per row")
    p.add_argument("--width", type=int, required=True, help="number of latents")
    p.add_argument("--seed", type=int, default=0, help="the one seed of every candidate")
    p.add_argument("--pair-seed", type=int, default=None,
                   help="also train every candidate with this seed and record the two seeds' "
                   "matched |cos| at each factor (the choice's stability and its neighbours'; "
                   "twice the training)")
    p.add_argument("--tie-tolerance", type=float, default=0.01,
                   help="relative FVU difference under which two rates are tied")
    p.add_argument("--tokens", type=int, required=True, help="training rows per candidate")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: train's)")
    p.add_argument("--lr", type=float, default=None,
                   help="the rate the factors multiply (default: train's width-scaled rate)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the data order (default: --seed)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log rows")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    add_field_flags(p, TrainConfig, OPTION_FLAGS)
    p.add_argument("--out", required=True, help="folder: ckpt/, sweep.parquet, lr.json (an "
                   "existing lr sweep's or an empty folder; never a folder of other files)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from isae.errors import UserError
    from isae.study.lr_sweep import lr_sweep

    try:
        factors = [float(f) for f in args.factors.split(",") if f]
    except ValueError:
        raise UserError(f"--factors must be comma-separated numbers, not {args.factors!r}") from None
    tcfg = TrainConfig(tokens=args.tokens, lr=args.lr, device=args.device,
                       seed=args.seed if args.data_seed is None else args.data_seed,
                       **field_values(args, OPTION_FLAGS))
    if args.batch_size is not None:
        tcfg = replace(tcfg, batch_size=args.batch_size)
    if args.log_every is not None:
        tcfg = replace(tcfg, log_every=args.log_every)
    archs = [a for a in args.arch.split(",") if a]
    return lr_sweep(args.activations, archs, factors, args.k, args.width, tcfg, args.out,
                    seed=args.seed, pair_seed=args.pair_seed, tolerance=args.tie_tolerance)
