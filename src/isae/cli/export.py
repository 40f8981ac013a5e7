"""``isae export``: a checkpoint in SAELens's or sparsify's folder layout."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint in SAELens or sparsify layout")
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--format", required=True, choices=["saelens", "sparsify"],
                   help="the library whose folder layout to write")
    p.add_argument("--out", required=True, help="folder to write (an existing export of the "
                   "same format is replaced; anything else needs --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out even if it is not an export of this format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.data.atomic import check_out
    from isae.data.checkpoints import load
    from isae.data.export import export_saelens, export_sparsify

    # Refuse a destructive --out before reading anything.
    check_out(args.out, args.format, inputs=[args.ckpt], force=args.force)
    ckpt = load(args.ckpt)
    log.info("exporting %s (%s, %d x %d) to %s's layout", ckpt.path, ckpt.cfg.get("arch"),
             ckpt.d_in, ckpt.d_sae, args.format)
    fn = export_saelens if args.format == "saelens" else export_sparsify
    path = fn(ckpt, args.out, force=args.force)
    log.info("wrote %s", path)
    return {"out": str(path), "format": args.format, "d_in": ckpt.d_in, "d_sae": ckpt.d_sae}
