"""``isae import SRC --out CKPT``: a SAELens or sparsify folder as an isae checkpoint.

The checkpoint computes exactly what the library computes, on raw activations: it stores
the identity normalisation (mean 0, scale 1), so its MSE is in the units of the raw
activations (FVU is unaffected). ``cfg.json`` records the source under ``source``. What an
isae checkpoint cannot hold exactly is refused with the reason; ``isae match``, ``ric`` and
``eval`` read such folders directly.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="convert a SAELens or sparsify checkpoint folder into an isae checkpoint",
        description="Convert a SAELens folder (cfg.json + sae_weights.safetensors) or a "
        "sparsify folder (cfg.json + sae.safetensors; for several hookpoints name one: "
        "FOLDER/HOOKPOINT) into an isae checkpoint that computes the same codes.",
    )
    p.add_argument("src", metavar="SRC", help="SAELens or sparsify checkpoint folder")
    p.add_argument("--out", required=True, help="isae checkpoint folder to write (an existing "
                   "checkpoint is replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from isae.data import checkpoints, foreign
    from isae.data.atomic import check_out
    from isae.errors import UserError
    from isae.models.foreign import as_sparse_coder
    from isae.models.sparse_coder import SparseCoder

    # Before reading: never the source, inside it or holding it; a checkpoint is replaced.
    check_out(args.out, "checkpoint", inputs=[args.src], can_force=False)
    fmt = foreign.detect(args.src)
    if fmt == "isae":
        raise UserError(f"{args.src} is already an isae checkpoint")
    ckpt = checkpoints.load_foreign(args.src)
    try:
        cfg, tensors = as_sparse_coder(ckpt.model)
    except ValueError as e:
        raise UserError(f"cannot import {args.src} exactly: {e}; isae match, ric and eval read "
                        "the folder as it is") from None
    model = SparseCoder(cfg)
    model.load_exported(tensors)
    source = dict(ckpt.cfg["source"], path=str(Path(args.src).resolve()))
    extra = {"source": source, "activations": ckpt.cfg["activations"],
             "tokens_seen": ckpt.cfg.get("tokens_seen")}
    if ckpt.cfg.get("seed") is not None:  # a folder isae exported knows its seed
        extra["seed"] = ckpt.cfg["seed"]
    out = checkpoints.save(model, args.out, ckpt.norm, extra=extra, inputs=[args.src])
    log.info("imported %s (%s) as %s", args.src, ckpt.cfg["arch"], cfg.arch)
    return {"out": str(out), "source": fmt, "source_arch": source["architecture"],
            "arch": cfg.arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k}
