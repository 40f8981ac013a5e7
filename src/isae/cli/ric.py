"""``isae ric CKPT --activations DIR``: restricted isometry of a dictionary on its observed
supports, with its calibrations (see isae.analysis.isometry).

The supports are the checkpoint's own encoder supports on held-out rows; for a synthetic
set's ``truth/`` checkpoint they are the true supports (``z_idx``). When the set has a truth
and CKPT is a model, the true dictionary on its own true supports of the same sampled pairs
is reported as one more calibration (kind ``truth``).
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd

from isae.cli.match import check_activations, is_truth, json_safe, true_codes_columns

log = logging.getLogger(__name__)


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
    from isae.analysis.isometry import n_possible_pairs, ric_report, row_supports
    from isae.data.activations import ActivationSet
    from isae.data.atomic import check_table_out, write_table
    from isae.data.checkpoints import load, load_decoder
    from isae.errors import UserError
    from isae.models.config import MAX_SEED, check_int

    # Refuse what would fail or destroy something before the (long) encoding.
    inputs = [args.ckpt, args.activations]
    check_table_out(args.out, inputs, "--out")
    check_table_out(args.summary, inputs, "--summary")
    check_int("--seed", args.seed, 0, MAX_SEED)
    ckpt = load(args.ckpt, device=args.device)
    acts = ActivationSet(args.activations)
    check_activations(acts, ckpt)
    if args.max_rows < 2:
        raise UserError("--max-rows must be at least 2")
    truth_here = (
        not is_truth(ckpt) and acts.has_truth and {"z_idx", "z_val"} <= set(acts.columns())
    )
    cols = true_codes_columns(acts, ckpt) if is_truth(ckpt) else (["z_idx", "z_val"] if truth_here else [])

    # Count the rows before encoding anything, so an impossible --pairs fails at once.
    rows = min(args.max_rows, acts.meta.get("heldout_rows", args.max_rows))
    if "heldout_rows" in acts.meta and args.pairs > n_possible_pairs(rows):
        raise UserError(
            f"--pairs {args.pairs} is more than the {n_possible_pairs(rows)} distinct pairs of "
            f"the {rows} held-out rows of {acts.path}"
        )
    data = acts.load("heldout", columns=cols, max_rows=args.max_rows)
    x = data["x"]
    if is_truth(ckpt):
        S = row_supports(data["z_val"], data["z_idx"], ckpt.d_sae)
        source = "true codes"
    else:
        log.info("encoding %d held-out rows", len(x))
        c = ckpt.encode_raw(x)
        S = row_supports(c.val, c.idx, ckpt.d_sae)
        source = "encoder"
    truth = None
    if truth_here:
        W_t = load_decoder(acts.path / "truth")
        truth = (W_t, row_supports(data["z_val"], data["z_idx"], W_t.shape[0]))

    k = ckpt.cfg.get("k")
    table, summary = ric_report(ckpt.W_dec, S, args.pairs, args.seed, k=k, truth=truth,
                                device=args.device)
    summary = {
        "ckpt": str(ckpt.path),
        "arch": ckpt.cfg.get("arch"),
        "width": ckpt.d_sae,
        "ckpt_seed": ckpt.cfg.get("seed"),
        "support_source": source,
        **summary,
    }
    log.info(
        "δ_U median %.3f (random supports %.3f, Gaussian %.3f, MP %.3f)",
        summary["observed_q50"], summary["random_support_q50"], summary["gaussian_q50"],
        summary["mp_q50"],
    )
    if args.out:
        write_table(table, args.out)
    if args.summary:
        write_table(pd.DataFrame([summary]), args.summary)
    return json_safe(summary)
