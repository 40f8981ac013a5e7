"""``isae eval``: held-out reconstruction metrics of one checkpoint."""

from __future__ import annotations

import argparse
import logging
import time

import pandas as pd

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out MSE/dim, FVU, L0 and dead fraction of a checkpoint")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--activations", required=True, help="activation set (its held-out rows are used)")
    p.add_argument("--out", default=None, help="one-row Parquet table to write")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=4096, help="held-out rows per encoder call")
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
    log.info("evaluating %s (%s, %d latents) on the held-out rows of %s",
             ckpt.path, ckpt.cfg.get("arch"), ckpt.d_sae, acts.path)
    t0 = time.perf_counter()
    row = {**describe(ckpt), **reconstruction_metrics(ckpt, acts, args.batch_size)}
    log.info("%d held-out rows in %.1f s: FVU %.4f, L0 %.2f, dead %.3f", row["rows"],
             time.perf_counter() - t0, row["fvu"], row["l0"], row["dead_frac"])
    if args.out:
        write_table(pd.DataFrame([row]), args.out)
        log.info("wrote %s", args.out)
    return row
