"""``isae export``: a checkpoint in SAELens's or sparsify's folder layout, exact or refused.

An export the target library would compute differently (signed codes in sparsify, iterative
encoders, dictionary learning) fails with the reason; ``--lossy`` writes it anyway and warns,
with the FVU it costs on the held-out rows of ``--activations`` when that is given.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint in SAELens or sparsify layout")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--format", required=True, choices=["saelens", "sparsify"],
                   help="the library whose folder layout to write")
    p.add_argument("--out", required=True, help="folder to write (an isae export of the same "
                   "format or an empty folder is replaced; never a folder holding files isae "
                   "did not write)")
    p.add_argument("--force", action="store_true",
                   help="also replace an isae output of another kind at --out")
    p.add_argument("--lossy", action="store_true",
                   help="export even what the target library computes differently (warns)")
    p.add_argument("--activations", default=None,
                   help="activation set whose held-out rows measure the FVU of the export "
                   "against the checkpoint's (the cost of --lossy); a SAELens export also "
                   "records its context size and BOS (default: the set the checkpoint's "
                   "cfg.json names, if it is still there)")
    p.add_argument("--max-rows", type=int, default=20000,
                   help="held-out rows used to measure the FVU change")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.data.activations import ActivationSet
    from isae.data.atomic import check_out
    from isae.data.checkpoints import load
    from isae.data.export import (
        LIBRARY,
        check_exportable,
        export_saelens,
        export_sparsify,
        unrepresentable,
    )
    from isae.errors import UserError

    # Refuse a destructive --out before reading anything.
    check_out(args.out, args.format, inputs=[args.ckpt, args.activations], force=args.force)
    if args.max_rows < 1:
        raise UserError("--max-rows must be at least 1")
    ckpt = load(args.ckpt)
    check_exportable(ckpt, args.format)
    lost = unrepresentable(ckpt, args.format)
    summary = {"format": args.format, "d_in": ckpt.d_in, "d_sae": ckpt.d_sae, "exact": not lost}
    if lost and not args.lossy:
        raise UserError(f"{LIBRARY[args.format]} cannot represent {ckpt.path}: {'; '.join(lost)} "
                        "(--lossy exports anyway)")
    log.info("exporting %s (%s, %d x %d) to %s's layout", ckpt.path, ckpt.cfg.get("arch"),
             ckpt.d_in, ckpt.d_sae, args.format)
    change = measure_change(ckpt, args) if args.activations else None
    if change is not None:
        summary.update({"fvu_isae": change["fvu"], "fvu_exported": change["fvu_other"],
                        "same_support": change["same_support"], "rows": change["rows"]})
    if args.format == "saelens":
        set_meta = ActivationSet(args.activations).meta if args.activations else None
        path = export_saelens(ckpt, args.out, lossy=args.lossy, force=args.force, set_meta=set_meta)
    else:
        path = export_sparsify(ckpt, args.out, lossy=args.lossy, force=args.force)
    log.info("wrote %s", path)
    if lost:
        if change is None:
            measured = "pass --activations SET to measure the FVU change"
        else:
            measured = (f"FVU on {change['rows']} held-out rows of {args.activations}: "
                        f"{change['fvu']:.4f} -> {change['fvu_other']:.4f}, "
                        f"{100 * change['same_support']:.1f}% of rows keep their active latents")
        log.warning("lossy export to %s: %s; %s", LIBRARY[args.format], "; ".join(lost), measured)
    return {"out": str(path), **summary}


def measure_change(ckpt, args: argparse.Namespace) -> dict:
    """The checkpoint against the target library's forward pass on the exported tensors."""
    from isae.analysis.reconstruction import compare_with
    from isae.data.activations import ActivationSet
    from isae.data.export import target_coder

    acts = ActivationSet(args.activations)
    log.info("measuring the lossy export on up to %d held-out rows of %s", args.max_rows, acts.path)
    return compare_with(ckpt, target_coder(ckpt, args.format), acts, max_rows=args.max_rows)
