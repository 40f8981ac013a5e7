"""``isae measure CKPT_OR_FOLDER ... --activations DIR --out DIR``: every per-run and per-pair
measurement of checkpoints trained together (see isae.analysis.runs), three Parquet tables."""

from __future__ import annotations

import argparse

TABLES = ("runs", "pairs", "latents")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "measure",
        help="measure a group of checkpoints: reconstruction, convergence, cost, truth, "
             "restricted isometry, seed and same-seed architecture matchings",
        description="Writes OUT/runs.parquet (one row per checkpoint), OUT/pairs.parquet (seed "
        "pairs of one arch; same-seed pairs of two archs) and OUT/latents.parquet (matched "
        "|cos| per latent of the seed pairs). A seed pair's stability is given over all "
        "latents and, in the live_ columns, over the latents that fire on some held-out row "
        "in both seeds (matched among themselves), beside the chance level of as many random "
        "training rows.",
    )
    p.add_argument("ckpts", nargs="+", metavar="CKPT",
                   help="checkpoint folders, or folders holding checkpoints")
    p.add_argument("--activations", required=True, help="the activation set they were trained on")
    p.add_argument("--out", required=True, help="folder for the three tables (an existing "
                   "measure folder is replaced; never a folder of other files)")
    p.add_argument("--max-rows", type=int, default=10000,
                   help="held-out rows for codes (pairs, truth, restricted isometry)")
    p.add_argument("--ric-pairs", type=int, default=0,
                   help="pairs of held-out rows for the restricted isometry (0: skip it)")
    p.add_argument("--cross-archs", default=None,
                   help="comma-separated archs compared with each other at equal seeds")
    p.add_argument("--converged-below", type=float, default=None,
                   help="a run has converged when its smoothed training FVU moved by less than "
                        "this (relative) over the 20 %% of steps before the learning-rate decay "
                        "(default: the threshold each run was trained with)")
    p.add_argument("--live-chance-rows", type=int, default=100000,
                   help="training rows the chance level of live-latent stability draws its "
                        "random rows from (0: skip that chance level)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    import shutil

    from isae.analysis.runs import measure_group
    from isae.data.atomic import check_out, publish, staging_folder, write_table
    from isae.errors import UserError

    if args.max_rows < 2:
        raise UserError("--max-rows must be at least 2")
    if args.ric_pairs < 0:
        raise UserError("--ric-pairs must be >= 0")
    if args.live_chance_rows < 0:
        raise UserError("--live-chance-rows must be >= 0")
    if args.converged_below is not None and not args.converged_below > 0:
        raise UserError("--converged-below must be positive")
    # Before the work: never inside, holding or replacing an input, nor a folder of other files.
    out = check_out(args.out, "measure", inputs=[*args.ckpts, args.activations], can_force=False)
    tables = measure_group(
        args.ckpts, args.activations, max_rows=args.max_rows, ric_pairs=args.ric_pairs,
        cross_archs=[a for a in (args.cross_archs or "").split(",") if a],
        threshold=args.converged_below, live_chance_rows=args.live_chance_rows,
        device=args.device,
    )
    stage = staging_folder(out)  # the three tables appear together or not at all
    try:
        for name in TABLES:
            write_table(getattr(tables, name), stage / f"{name}.parquet")
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    runs = tables.runs
    return {"out": str(out), "runs": len(runs), "pairs": len(tables.pairs),
            "converged": int(runs["converged"].sum()), "mean_fvu": float(runs["fvu"].mean())}
