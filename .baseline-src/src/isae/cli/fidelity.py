"""``isae fidelity CKPT``: downstream fidelity of one checkpoint, its reconstruction spliced
into the language model at its hook (isae.analysis.fidelity).

The model, hook, text, context and held-out split default to those of the activation set
the checkpoint was trained on (``--activations``), so the splice sees that very setting.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fidelity",
        help="loss (or embedding similarity) recovered with the reconstruction spliced in",
        description="Cross-entropy (causal LM) or sentence-embedding similarity (encoder) with "
        "the checkpoint's reconstruction spliced in at the hook, against zero- and "
        "mean-ablation: one-row Parquet table, one-line JSON summary.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder")
    p.add_argument("--activations", default=None,
                   help="the activation set the checkpoint was trained on: model, hook, text, "
                        "context, split and mean vector default to its own")
    p.add_argument("--model", default=None, help="model name or path (default: the set's)")
    p.add_argument("--hook", default=None, help="hook name (default: the set's)")
    p.add_argument("--text", default=None, help="pydoc | a text file or folder (default: the set's)")
    p.add_argument("--context", type=int, default=None, help="tokens per context (default: the set's)")
    p.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                   help="documents to run on: held out from training (default), trained on, or all")
    p.add_argument("--max-tokens", type=int, default=8192, help="stop after this many content tokens")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    p.add_argument("--device", default="cpu", help="device of the language model and the SAE")
    p.add_argument("--out", default=None, help="one-row Parquet table to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    import os

    import pandas as pd

    from isae.analysis.fidelity import fidelity
    from isae.cli.output import write_outputs
    from isae.data.atomic import check_table_out

    # Before the (long) work: never an input's file or a new file inside an input folder.
    check_table_out(args.out, [p for p in (args.ckpt, args.activations, args.text, args.model)
                               if p and os.path.exists(p)], "--out")

    row = fidelity(args.ckpt, model=args.model, hook=args.hook, text=args.text,
                   context=args.context, max_tokens=args.max_tokens, device=args.device,
                   batch_size=args.batch_size, activations=args.activations, split=args.split)
    return write_outputs(pd.DataFrame([row]), row, args.out, None)
