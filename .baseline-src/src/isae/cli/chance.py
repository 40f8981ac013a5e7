"""``isae chance --activations DIR --width N --out FILE``: the matched |cos| of random
dictionaries of the set's shape, the chance levels stability and truth recovery are read
against (isae.analysis.matching.chance_levels).

The data-shaped dictionaries come from a uniform random sample of the training rows, drawn
over the whole training split (isae.data.activations.sample_rows, seeded by ``--seed``) and
read shard by shard: the first rows of a set are its first documents, which need not look
like the rest."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chance",
        help="chance levels of matched |cos|: isotropic Gaussian, Gaussian with the data's "
             "covariance, and random training rows",
    )
    p.add_argument("--activations", required=True, help="activation set (its training rows shape "
                   "the data-shaped dictionaries; its truth/, if any, is matched too)")
    p.add_argument("--width", type=int, required=True, action="append",
                   help="dictionary size (repeat the flag for several)")
    p.add_argument("--draws", type=int, default=3, help="independent draws of each kind")
    p.add_argument("--sample-rows", "--max-rows", dest="sample_rows", type=int, default=100000,
                   help="training rows drawn uniformly at random (seeded by --seed) from the "
                   "whole training split, shard by shard, for the covariance and the row draws "
                   "(all of them when the split has fewer)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the row sample and of the random dictionaries")
    p.add_argument("--out", required=True, help="Parquet table, one row per width x kind x target x draw")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    import pandas as pd
    import torch

    from isae.analysis.matching import chance_levels
    from isae.data.activations import ActivationSet, sample_rows
    from isae.data.atomic import check_table_out, write_table
    from isae.data.checkpoints import load_decoder
    from isae.errors import UserError
    from isae.models.config import MAX_SEED, check_int

    check_int("--seed", args.seed, 0, MAX_SEED)
    if args.draws < 1 or args.sample_rows < 2 or min(args.width) < 1:
        raise UserError("--draws and --width must be positive and --sample-rows at least 2")
    check_table_out(args.out, [args.activations], "--out")
    acts = ActivationSet(args.activations)
    check_fits(acts, args)
    x = sample_rows(acts, args.sample_rows, args.seed)["x"]
    # The models' space: centred and scaled as in training (directions only matter).
    rows = torch.as_tensor(acts.normalizer().forward(x), dtype=torch.float64)
    if len(rows) < max(args.width):
        raise UserError(f"{acts.path} has {len(rows)} training rows sampled (--sample-rows "
                        f"{args.sample_rows}), fewer than the width {max(args.width)}")
    truth = load_decoder(acts.path / "truth") if acts.has_truth else None
    parts = [chance_levels(w, acts.d, rows=rows, truth=truth, draws=args.draws, seed=args.seed,
                           device=args.device).assign(width=w) for w in sorted(set(args.width))]
    table = pd.concat(parts, ignore_index=True)
    write_table(table, args.out)
    means = table[table["target"] == "seed"].groupby(["width", "kind"])["mean_abs_cos"].mean()
    return {"out": args.out, "rows_sampled": len(rows),
            **{f"w{w}_{k}": round(float(v), 4) for (w, k), v in means.items()}}


#: Bytes a row of the result holds at least while it is collected (a Python dict of five
#: values): what bounds --draws.
ROW_BYTES = 200


def check_fits(acts, args: argparse.Namespace) -> None:
    """Before reading rows: the rows read (float32 twice, then float64), the largest width's
    float64 cost matrix and two dictionaries, and the result's rows, in the host's memory."""
    from isae.analysis.matching import CHANCE_KINDS
    from isae.limits import check_memory

    w = max(args.width)
    rows = min(args.sample_rows, int(acts.meta.get("train_rows", acts.rows)))
    check_memory({
        "the training rows read": rows * acts.d * 16,
        "the largest width's cost matrix and dictionaries": 8 * w * w + 16 * w * acts.d,
        "the table of draws": ROW_BYTES * args.draws * len(CHANCE_KINDS) * 2 * len(set(args.width)),
    }, "cpu", "lower --draws, --width or --sample-rows")
