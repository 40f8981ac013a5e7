"""``isae eval``: held-out reconstruction metrics of one checkpoint."""

from __future__ import annotations

import argparse

import pandas as pd


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out MSE/dim, FVU, L0 and dead fraction of a checkpoint")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--activations", required=True, help="activation set (its held-out rows are used)")
    p.add_argument("--out", default=None, help="one-row Parquet table to write")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4096)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.analysis.reconstruction import describe, reconstruction_metrics
    from isae.data.activations import ActivationSet
    from isae.data.atomic import check_table_out, write_table
    from isae.data.checkpoints import load

    inputs = [args.ckpt, args.activations]
    check_table_out(args.out, inputs, "--out")

    acts = ActivationSet(args.activations)
    ckpt = load(args.ckpt, device=args.device)
    row = {**describe(ckpt), **reconstruction_metrics(ckpt, acts, args.batch_size)}
    if args.out:
        write_table(pd.DataFrame([row]), args.out)
    return row
