"""``isae ric CKPT --activations DIR``: restricted isometry of a dictionary on its observed
supports, with its calibrations, by isae.analysis.isometry.ric_of_checkpoint.

The supports are the checkpoint's own encoder supports on held-out rows; for a synthetic
set's ``truth/`` checkpoint they are the true supports (``z_idx``).
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ric",
        help="restricted isometry δ_U on unions of observed supports, with calibrations",
        description="δ_U = max(σ_max² − 1, 1 − σ_min²) of the unit decoder rows in U = S_i ∪ S_j "
        "for sampled pairs of held-out rows; calibrated by random supports and a Gaussian "
        "dictionary of the same shape.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (or a synthetic set's truth/)")
    p.add_argument("--activations", required=True, help="activation set (held-out rows are used)")
    p.add_argument("--pairs", type=int, default=10000, help="pairs of held-out rows to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sample and calibrations")
    p.add_argument("--max-rows", type=int, default=50000,
                   help="held-out rows the pairs are drawn from (the first ones)")
    p.add_argument("--out", default=None, help="per-pair δ table (Parquet)")
    p.add_argument("--summary", default=None, help="one-row summary table (Parquet)")
    p.add_argument("--device", default="cpu", help="device of the encoder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.analysis.isometry import ric_of_checkpoint
    from isae.cli.output import write_outputs
    from isae.data.atomic import check_table_out

    # Refuse a table --out that would replace an input before the (long) work.
    inputs = [args.ckpt, args.activations]
    check_table_out(args.out, inputs, "--out")
    check_table_out(args.summary, inputs, "--summary")

    table, summary = ric_of_checkpoint(args.ckpt, args.activations, pairs=args.pairs,
                                       seed=args.seed, max_rows=args.max_rows, device=args.device)
    return write_outputs(table, summary, args.out, args.summary)
