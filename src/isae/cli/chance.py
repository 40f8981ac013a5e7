"""``isae chance --activations DIR --width N --out FILE``: the matched |cos| of random
dictionaries of the set's shape, the chance levels stability and truth recovery are read
against (isae.analysis.matching.chance_levels)."""

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
    p.add_argument("--max-rows", type=int, default=100000,
                   help="training rows read for the covariance and the row draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the random dictionaries")
    p.add_argument("--out", required=True, help="Parquet table, one row per width x kind x target x draw")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from isae.analysis.matching import chance_levels
    from isae.data.activations import ActivationSet
    from isae.data.atomic import check_table_out, write_table
    from isae.data.checkpoints import load_decoder
    from isae.errors import UserError

    if args.draws < 1 or args.max_rows < 2 or min(args.width) < 1:
        raise UserError("--draws and --width must be positive and --max-rows at least 2")
    check_table_out(args.out, [args.activations], "--out")
    acts = ActivationSet(args.activations)
    x = acts.load("train", max_rows=args.max_rows)["x"]
    # The models' space: centred and scaled as in training (directions only matter).
    rows = torch.as_tensor(acts.normalizer().forward(x), dtype=torch.float64)
    if len(rows) < max(args.width):
        raise UserError(f"{acts.path} has {len(rows)} training rows read (--max-rows "
                        f"{args.max_rows}), fewer than the width {max(args.width)}")
    # A random subset, not the first documents: the row draws pick among these.
    perm = np.random.default_rng(args.seed).permutation(len(rows))
    rows = rows[torch.as_tensor(perm)]
    truth = load_decoder(acts.path / "truth") if acts.has_truth else None
    parts = [chance_levels(w, acts.d, rows=rows, truth=truth, draws=args.draws, seed=args.seed,
                           device=args.device).assign(width=w) for w in sorted(set(args.width))]
    table = pd.concat(parts, ignore_index=True)
    write_table(table, args.out)
    means = table[table["target"] == "seed"].groupby(["width", "kind"])["mean_abs_cos"].mean()
    return {"out": args.out, **{f"w{w}_{k}": round(float(v), 4) for (w, k), v in means.items()}}
