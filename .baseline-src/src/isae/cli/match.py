"""``isae match CKPT_A CKPT_B``: dictionary stability (and code consistency) of two
checkpoints, by isae.analysis.compare (CKPT_B may be a synthetic set's ``truth/``)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "match",
        help="match two dictionaries (optimal signed assignment on |cos|) and compare codes",
        description="Dictionary stability between two checkpoints (CKPT_B may be a synthetic "
        "set's truth/ folder): per-atom matching table, one-line JSON summary. The assignment "
        "is proved optimal (assignment_gap: how far from the optimum its total |cos| can be "
        "at most); without a proof it is solved again densely, and assignment_method says so.",
    )
    p.add_argument("ckpt_a", metavar="CKPT_A", help="checkpoint folder")
    p.add_argument("ckpt_b", metavar="CKPT_B", help="checkpoint folder, or a synthetic set's truth/")
    p.add_argument("--activations", default=None,
                   help="activation set: also compare codes on its held-out rows")
    p.add_argument("--max-rows", type=int, default=50000,
                   help="held-out rows used for code consistency (the first ones)")
    p.add_argument("--out", default=None, help="per-atom matching table (Parquet)")
    p.add_argument("--summary", default=None, help="one-row summary table (Parquet)")
    p.add_argument("--device", default="cpu", help="device of the cosine blocks and the encoders")
    p.add_argument("--block", type=int, default=4096, help="rows of A per cosine block")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.analysis.compare import compare_checkpoints
    from isae.cli.output import write_outputs
    from isae.data.atomic import check_table_out

    # Refuse a table --out that would replace an input before the (long) work.
    inputs = [args.ckpt_a, args.ckpt_b] + ([args.activations] if args.activations else [])
    check_table_out(args.out, inputs, "--out")
    check_table_out(args.summary, inputs, "--summary")

    table, summary = compare_checkpoints(args.ckpt_a, args.ckpt_b, args.activations or None,
                                         max_rows=args.max_rows, device=args.device,
                                         block=args.block)
    return write_outputs(table, summary, args.out, args.summary)
