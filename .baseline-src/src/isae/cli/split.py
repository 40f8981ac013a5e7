"""``isae split SET --half 0|1 --out DIR``: one of two disjoint halves of an activation set by
document, for split-data reproducibility (see isae.data.halves)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "split", help="one of two disjoint halves of an activation set, by document",
        description="Write the training rows of one half of SET's documents (a seeded random "
        "order of the documents, cut at half the training rows) and every held-out row of SET, "
        "so that SAEs trained on the two halves are evaluated on the same rows. The two "
        "halves (--half 0 and --half 1, same --seed) are disjoint by document and together "
        "hold the whole training split.",
    )
    p.add_argument("set", metavar="SET", help="the activation set to split")
    p.add_argument("--half", type=int, required=True, choices=[0, 1], help="which half to write")
    p.add_argument("--by", default="auto", choices=["auto", "doc", "row"],
                   help="the unit kept whole: doc (column doc), row, or auto (doc when SET "
                   "has the column, else row)")
    p.add_argument("--seed", type=int, default=0, help="seed of the documents' order")
    p.add_argument("--rows-per-shard", type=int, default=16384, help="rows per Parquet shard")
    p.add_argument("--out", required=True, help="output activation-set folder (an existing "
                   "activation set or empty folder is replaced; never a folder holding files "
                   "isae did not write)")
    p.add_argument("--force", action="store_true",
                   help="also replace an isae output of another kind at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.data.halves import write_half
    from isae.data.sources import check_extract_out, check_layout

    check_layout(0.0, args.rows_per_shard, args.seed)
    check_extract_out(args.out, [args.set], args.force)
    return write_half(args.set, args.half, args.out, seed=args.seed, by=args.by,
                      rows_per_shard=args.rows_per_shard, force=args.force)
