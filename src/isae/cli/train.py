"""``isae train``: train one sparse coder on an activation set (or several: seeds and
architectures sharing one pass over the data)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from isae.data.activations import ActivationSet
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig, parse_arch


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one sparse coder (resumes after a crash)")
    p.add_argument("--activations", required=True, help="activation-set folder")
    p.add_argument("--arch", required=True,
                   help="preset (topk, relu, isae, isae-iter, dl) with optional +switch/-switch "
                        "(signed, tied, nobias, iter, iterN), e.g. topk+signed or isae-tied; "
                        "several comma-separated share one pass over the data (--out must "
                        "contain {arch})")
    p.add_argument("--k", type=int, default=32, help="active latents per row")
    p.add_argument("--width", type=int, default=None, help="number of latents (default 8 x d)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the data order")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds trained together on one pass over the data "
                        "(--out must contain {seed}; the data order comes from the first seed)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the data order (default: the first seed); fixing it makes a "
                        "run's result independent of which runs share its pass")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training rows to consume")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default scales with width)")
    p.add_argument("--lr-from", default=None, metavar="FILE",
                   help="learning rates by arch from a JSON file {\"lr\": {arch: lr}} (as "
                        "written by the study's lr sweep); a variant such as topk+signed "
                        "takes its preset's rate when it has none of its own")
    p.add_argument("--decay", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup-frac", type=float, default=0.02)
    p.add_argument("--auxk-alpha", type=float, default=1 / 32, help="AuxK loss weight")
    p.add_argument("--dead-tokens", type=int, default=200_000,
                   help="rows without firing after which a latent counts as dead")
    p.add_argument("--l1-coeff", type=float, default=1e-3, help="relu only: L1 penalty weight")
    p.add_argument("--encoder-steps", type=int, default=None,
                   help="override the arch's iterative-hard-thresholding steps")
    p.add_argument("--shuffle-buffer", type=int, default=65536, help="rows in the shuffle buffer")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between resume saves")
    p.add_argument("--log-every", type=int, default=20, help="steps between log rows")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing resume state")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.training.trainer import train, train_many

    acts = ActivationSet(args.activations)
    width = args.width or 8 * acts.d
    archs = [a for a in args.arch.split(",") if a]
    if len(archs) != len(set(archs)) or not archs:
        raise UserError(f"--arch must name distinct architectures, not {args.arch!r}")
    if len(archs) > 1 and "{arch}" not in args.out:
        raise UserError("with several --arch, --out must contain {arch} (one checkpoint per arch)")
    specs = {}
    for arch in archs:
        specs[arch] = {**parse_arch(arch), "l1_coeff": args.l1_coeff}
        if args.encoder_steps is not None:
            specs[arch]["encoder_steps"] = args.encoder_steps
    seeds = [args.seed]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, not {args.seeds!r}") from None
        if "{seed}" not in args.out:
            raise UserError("with --seeds, --out must contain {seed} (one checkpoint per seed)")
    if args.lr is not None and args.lr_from:
        raise UserError("give --lr or --lr-from, not both")
    rates = read_lr_file(args.lr_from, archs) if args.lr_from else {}
    runs = [(a, s) for a in archs for s in seeds]
    cfgs = [SAEConfig(d_in=acts.d, d_sae=width, k=args.k, arch=a, seed=s, **specs[a]) for a, s in runs]
    tcfg = TrainConfig(
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_frac=args.warmup_frac,
        decay=args.decay,
        auxk_alpha=args.auxk_alpha,
        dead_tokens=args.dead_tokens,
        shuffle_buffer=args.shuffle_buffer,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        seed=seeds[0] if args.data_seed is None else args.data_seed,
    )
    outs = [args.out.replace("{seed}", str(s)).replace("{arch}", a) for a, s in runs]
    lrs = [rates.get(a) for a, _ in runs]
    if len(runs) == 1:
        one = replace(tcfg, lr=lrs[0]) if lrs[0] is not None else tcfg
        return train(args.activations, cfgs[0], one, outs[0], resume=not args.no_resume)
    done = train_many(args.activations, cfgs, tcfg, outs, resume=not args.no_resume, lrs=lrs)
    return {"runs": done, "tokens_per_s": done[0]["tokens_per_s"]}


def read_lr_file(path: str, archs: list[str]) -> dict[str, float]:
    """{arch: learning rate} for ``archs`` from a JSON file {"lr": {name: rate}}: the arch's
    own entry, else its preset's (topk+signed -> topk). dl trains without one. UserError
    when an arch has neither."""
    from isae.models.config import preset_of

    try:
        table = json.loads(Path(path).read_text())["lr"]
    except FileNotFoundError:
        raise UserError(f"--lr-from {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--lr-from {path}: not a JSON object with an \"lr\" table") from None
    rates = {}
    for arch in archs:
        if parse_arch(arch)["kind"] == "dl":
            continue
        for name in (arch, preset_of(arch)):
            value = table.get(name)
            if value is not None:
                if not isinstance(value, (int, float)) or not value > 0:
                    raise UserError(f"--lr-from {path}: the rate of {name!r} is not a positive number")
                rates[arch] = float(value)
                break
        else:
            alt = "" if preset_of(arch) == arch else f" or its preset {preset_of(arch)!r}"
            raise UserError(f"--lr-from {path} has no learning rate for {arch!r}{alt}")
    return rates
