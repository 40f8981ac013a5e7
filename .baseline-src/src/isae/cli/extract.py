"""``isae extract synthetic|lm|vision|array|gaussian``: write an activation set (see
isae.data.activations)."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output activation-set folder (an existing "
                   "activation set or empty folder is replaced; never a folder holding files "
                   "isae did not write)")
    p.add_argument("--force", action="store_true",
                   help="also replace an isae output of another kind at --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the split")
    p.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="fraction of documents / images / rows held out for evaluation")
    p.add_argument("--rows-per-shard", type=int, default=16384, help="rows per Parquet shard")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage type of the activations")


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help="write an activation set")
    src = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    s = src.add_parser("synthetic", help="known dictionary, signed sparse codes, noise")
    s.add_argument("--d", type=int, required=True, help="activation dimension")
    s.add_argument("--atoms", type=int, required=True, help="true dictionary size")
    s.add_argument("--k", type=int, required=True, help="active atoms per row")
    s.add_argument("--rows", type=int, required=True, help="rows to generate")
    s.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std per dimension")
    s.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of atom frequencies (0 = uniform)")
    s.add_argument("--coherence", type=float, default=None,
                   help="target mutual coherence of the dictionary (default: plain Gaussian)")
    s.add_argument("--correlation", type=float, default=0.0,
                   help="probability that a row's support is drawn from a correlated block")
    _common(s)
    s.set_defaults(func=_run_synthetic)

    lm = src.add_parser("lm", help="residual-stream (or any hook) activations of a language model")
    lm.add_argument("--model", required=True, help="all-MiniLM-L6-v2, a local path, or a HF name")
    lm.add_argument("--hook", required=True, help="e.g. blocks.3.hook_resid_post")
    lm.add_argument("--text", default="pydoc", help="pydoc | stdlib | a text file or folder | a HF dataset name")
    lm.add_argument("--context", type=int, default=128, help="tokens per context")
    lm.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    lm.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass")
    lm.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _common(lm)
    lm.set_defaults(func=_run_lm)

    v = src.add_parser("vision", help="patch tokens of a Hugging Face vision backbone")
    v.add_argument("--model", required=True, help="local path or HF name (e.g. facebook/dinov2-base)")
    v.add_argument("--images", required=True, help="folder of images, or 'skimage' for the samples")
    v.add_argument("--layer", type=int, default=-1, help="hidden-state index (-1 = last layer)")
    v.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    v.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    v.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _common(v)
    v.set_defaults(func=_run_vision)

    a = src.add_parser(
        "array", help="your own activations: a .npy, a .safetensors tensor or a Parquet column",
        description="Make an activation set (held-out split, normalisation constants) from "
        "activations computed elsewhere, streamed in chunks of rows.",
    )
    a.add_argument("--input", required=True, help="FILE.npy | FILE.safetensors | FILE.parquet")
    a.add_argument("--column", default=None,
                   help="Parquet: the list<float> column of activations (default: x, or the only one)")
    a.add_argument("--tensor", default=None,
                   help="safetensors: the [rows, d] tensor (default: the file's only tensor)")
    a.add_argument("--group-column", default=None,
                   help="Parquet: hold out by the values of this column (e.g. doc), not by row blocks")
    a.add_argument("--block-rows", type=int, default=128,
                   help="without --group-column: consecutive rows held out together")
    a.add_argument("--chunk-rows", type=int, default=None,
                   help="rows read at a time (default: about 64 MB of input)")
    _common(a)
    a.set_defaults(func=_run_array)

    g = src.add_parser(
        "gaussian", help="Gaussian rows with another set's mean and covariance (a trained null)",
        description="Rows x = mean + Σ^½ z, z ~ N(0, I), with the mean and covariance of every "
        "training row of --like (streamed, one pass), and --like's held-out split (row i as "
        "its row i mod its rows). SAEs trained on it are the trained null: the same recipe "
        "on data with the activations' second-order structure and nothing else.",
    )
    g.add_argument("--like", required=True, help="the activation set whose moments and split it copies")
    g.add_argument("--rows", type=int, default=None, help="rows to generate (default: --like's rows)")
    g.add_argument("--out", required=True, help="output activation-set folder (an existing "
                   "activation set or empty folder is replaced; never a folder holding files "
                   "isae did not write)")
    g.add_argument("--force", action="store_true",
                   help="also replace an isae output of another kind at --out")
    g.add_argument("--seed", type=int, default=0, help="seed of the Gaussian draws")
    g.add_argument("--rows-per-shard", type=int, default=16384, help="rows per Parquet shard")
    g.add_argument("--dtype", choices=["float32", "float16"], default=None,
                   help="storage type of the activations (default: --like's)")
    g.set_defaults(func=_run_gaussian)


def _kwargs(args: argparse.Namespace) -> dict:
    skip = {"func", "command", "source", "quiet", "threads"}  # the root parser's own
    return {k: v for k, v in vars(args).items() if k not in skip}


def _run_synthetic(args: argparse.Namespace) -> dict:
    from isae.data.sources import synthetic

    return synthetic.extract(**_kwargs(args))


def _run_lm(args: argparse.Namespace) -> dict:
    from isae.data.sources import text as lm

    return lm.extract(**_kwargs(args))


def _run_vision(args: argparse.Namespace) -> dict:
    from isae.data.sources import vision

    return vision.extract(**_kwargs(args))


def _run_array(args: argparse.Namespace) -> dict:
    from isae.data.sources import array

    return array.extract(**_kwargs(args))


def _run_gaussian(args: argparse.Namespace) -> dict:
    from isae.data.sources import gaussian

    return gaussian.extract(**_kwargs(args))
