"""``isae browse A B --activations SET --out page.html``: the cross-seed feature browser."""

from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "browse",
        help="a static HTML page of matched latent pairs and their top contexts",
        description="Match the latents of two checkpoints trained on a language-model set and "
        "write one self-contained HTML page: per pair, the |cos| of the decoder rows, both "
        "firing frequencies and both latents' top-activating held-out contexts side by side.",
    )
    p.add_argument("ckpt_a", metavar="A", help="checkpoint folder")
    p.add_argument("ckpt_b", metavar="B", help="checkpoint folder (e.g. the same run, another seed)")
    p.add_argument("--activations", required=True,
                   help="the language-model activation set both were trained on (held-out rows)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--pairs", type=int, default=200,
                   help="pairs on the page, spread over the |cos| ranking (0 = all)")
    p.add_argument("--contexts", type=int, default=8, help="top-activating contexts per latent")
    p.add_argument("--window", type=int, default=8, help="tokens of context either side")
    p.add_argument("--max-rows", type=int, default=None,
                   help="encode at most this many held-out rows (default: all)")
    p.add_argument("--model", default=None,
                   help="model whose tokenizer decodes token_id (default: the set's meta.json model)")
    p.add_argument("--title", default=None, help="page title (default: arch and seeds)")
    p.add_argument("--batch-size", type=int, default=4096, help="held-out rows per encoder call")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.analysis.browser import browse, check_activations, tokenizer_for
    from isae.data.activations import ActivationSet
    from isae.data.atomic import check_file_out, writable_parent, write_text_atomic
    from isae.data.checkpoints import load
    from isae.study.browser_html import render

    t0 = time.perf_counter()
    # fail before the work, not after it: never a folder, an input or another kind of file
    check_file_out(args.out, [args.activations, args.ckpt_a, args.ckpt_b], "--out",
                   kind="an HTML page", magic=b"<!DOCTYPE html", example=".html")
    writable_parent(args.out)
    acts = ActivationSet(args.activations)
    a = load(args.ckpt_a, device=args.device)
    b = load(args.ckpt_b, device=args.device)
    check_activations(acts, [a, b])  # before the tokenizer loads: a wrong set fails at once
    tokenizer = tokenizer_for(acts, args.model)
    data = browse(a, b, acts, tokenizer, pairs=args.pairs, contexts=args.contexts,
                  window=args.window, max_rows=args.max_rows, batch_size=args.batch_size,
                  device=args.device)
    html = render(data, title=args.title)
    write_text_atomic(html, args.out)
    seconds = time.perf_counter() - t0
    log.info("wrote %s (%d pairs, %.1f MB) in %.1f s", args.out, len(data.pairs),
             len(html.encode()) / 1e6, seconds)
    s = data.summary
    return {
        "out": str(args.out),
        "pairs_shown": s["pairs_shown"],
        "pairs_total": s["pairs_total"],
        "rows": s["rows"],
        "mean_abs_cos": s["mean_abs_cos"],
        "chance_mean_abs_cos": s["chance_mean_abs_cos"],
        "seconds": round(seconds, 3),
    }
