"""``isae match CKPT_A CKPT_B``: dictionary stability (and code consistency) of two checkpoints.

B (or A) may be a synthetic set's ``truth/`` checkpoint: then the comparison is ground-truth
recovery, and with ``--activations`` the truth's codes are the set's own true codes
(``z_idx``/``z_val``), divided by the model's normalisation scale because model codes live
in the normalised space (x - mean) / scale.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TRUE_CODE_COLUMNS = ["z_idx", "z_val"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "match",
        help="match two dictionaries (signed Hungarian on |cos|) and compare their codes",
        description="Dictionary stability between two checkpoints (CKPT_B may be a synthetic "
        "set's truth/ folder): per-atom matching table, one-line JSON summary.",
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


def is_truth(ckpt) -> bool:
    return ckpt.cfg.get("arch") == "truth"


def check_activations(acts, ckpt) -> None:
    from isae.errors import UserError

    if acts.d != ckpt.d_in:
        raise UserError(
            f"activation set {acts.path} has d={acts.d}, checkpoint {ckpt.path} has d_in={ckpt.d_in}"
        )


def true_codes_columns(acts, truth_ckpt) -> list[str]:
    """The columns holding ``truth_ckpt``'s codes in ``acts``; UserError when there are none
    or when the truth is not this set's truth (its codes would mean nothing)."""
    import torch

    from isae.data.checkpoints import load_decoder
    from isae.errors import UserError

    if not set(TRUE_CODE_COLUMNS) <= set(acts.columns()):
        raise UserError(
            f"{truth_ckpt.path} is a truth checkpoint but activation set {acts.path} has no true "
            "codes (columns z_idx, z_val): pass the synthetic set it belongs to"
        )
    if not acts.has_truth or not torch.equal(load_decoder(acts.path / "truth"), truth_ckpt.W_dec.cpu()):
        raise UserError(f"{truth_ckpt.path} is not the truth of activation set {acts.path}")
    return TRUE_CODE_COLUMNS


def run(args: argparse.Namespace) -> dict:
    from isae.analysis.consistency import code_consistency
    from isae.analysis.matching import chance_mean_abs_cos, match_dictionaries
    from isae.data.activations import ActivationSet
    from isae.data.atomic import check_table_out, write_table
    from isae.data.checkpoints import load
    from isae.errors import UserError

    inputs = [args.ckpt_a, args.ckpt_b] + ([args.activations] if args.activations else [])
    check_table_out(args.out, inputs, "--out")
    check_table_out(args.summary, inputs, "--summary")

    A = load(args.ckpt_a, device=args.device)
    B = load(args.ckpt_b, device=args.device)
    if A.d_in != B.d_in:
        raise UserError(f"{A.path} has d_in={A.d_in} but {B.path} has d_in={B.d_in}: not comparable")
    if args.max_rows < 1:
        raise UserError("--max-rows must be at least 1")
    acts = None
    if args.activations:
        # Fail on bad input before the (long) matching.
        acts = ActivationSet(args.activations)
        for c in (A, B):
            check_activations(acts, c)
        cols = sorted({col for c in (A, B) if is_truth(c) for col in true_codes_columns(acts, c)})

    log.info("matching %s (%d atoms) with %s (%d atoms)", A.path, A.d_sae, B.path, B.d_sae)
    m = match_dictionaries(A.W_dec, B.W_dec, device=args.device, block=args.block)
    summary = {**_describe(A, "a"), **_describe(B, "b"), "d_in": A.d_in, **m.summary(),
               "chance_mean_abs_cos": chance_mean_abs_cos(A.d_sae, B.d_sae, A.d_in, device=args.device)}
    table = m.table()

    if acts is not None:
        data = acts.load("heldout", columns=cols, max_rows=args.max_rows)
        log.info("codes on %d held-out rows of %s", len(data["x"]), acts.path)
        codes = [_codes(c, other, data) for c, other in ((A, B), (B, A))]
        cons = code_consistency(codes[0], codes[1], m)
        summary.update({f"code_{k}": v for k, v in cons.summary().items()})
        per_pair = pd.DataFrame(
            {
                "a": m.a,
                "pearson_all": cons.pearson_all,
                "pearson_active": cons.pearson_active,
                "active_a": cons.active_a,
                "active_b": cons.active_b,
                "active_both": cons.active_both,
            }
        )
        table = table.merge(per_pair.assign(matched=True), on=["a", "matched"], how="left")

    if args.out:
        write_table(table, args.out)
    if args.summary:
        write_table(pd.DataFrame([summary]), args.summary)
    return json_safe(summary)


def json_safe(summary: dict) -> dict:
    """NaN is not JSON: undefined numbers go out as null."""
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}


def _describe(ckpt, side: str) -> dict:
    c = ckpt.cfg
    return {
        side: str(Path(ckpt.path)),
        f"arch_{side}": c.get("arch"),
        f"k_{side}": c.get("k"),
        f"width_{side}": ckpt.d_sae,
        f"seed_{side}": c.get("seed"),
        f"truth_{side}": is_truth(ckpt),
    }


def _codes(ckpt, other, data: dict):
    """(val, idx) codes of ``ckpt`` on the loaded rows: the true codes for a truth checkpoint
    (in the other model's normalised units), the encoder's otherwise."""
    if is_truth(ckpt):
        scale = 1.0 if is_truth(other) else float(other.norm.scale)
        return np.asarray(data["z_val"], np.float64) / scale, np.asarray(data["z_idx"], np.int64)
    c = ckpt.encode_raw(data["x"])
    return c.val, c.idx
