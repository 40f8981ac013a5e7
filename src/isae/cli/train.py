"""``isae train``: train one sparse coder on an activation set."""

from __future__ import annotations

import argparse

from isae.data.activations import ActivationSet
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig, parse_arch


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one sparse coder (resumes after a crash)")
    p.add_argument("--activations", required=True, help="activation-set folder")
    p.add_argument("--arch", required=True,
                   help="preset (topk, relu, isae, isae-iter, dl) with optional +switch/-switch "
                        "(signed, tied, nobias, iter), e.g. topk+signed or isae-tied")
    p.add_argument("--k", type=int, default=32, help="active latents per row")
    p.add_argument("--width", type=int, default=None, help="number of latents (default 8 x d)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the data order")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds trained together on one pass over the data "
                        "(--out must contain {seed}; the data order comes from the first seed)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training rows to consume")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default scales with width)")
    p.add_argument("--decay", choices=["linear", "cosine", "constant"], default="linear",
                   help="learning-rate decay after the warm-up")
    p.add_argument("--warmup-frac", type=float, default=0.02,
                   help="fraction of the steps spent warming the learning rate up")
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
    p.add_argument("--data-on-device", choices=["auto", "always", "never"], default="auto",
                   help="auto: hold the training split in CUDA memory when it fits, else stream "
                        "it from disk (streams on the CPU); always: hold it on any device; never: stream")
    p.add_argument("--data-memory-fraction", type=float, default=0.5,
                   help="auto only: largest share of the device's free memory the split may take")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing resume state")
    p.add_argument("--out", required=True, help="checkpoint folder to write (an existing "
                   "checkpoint is replaced; anything else needs --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out even if it is not a checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.training.trainer import train, train_many

    acts = ActivationSet(args.activations)
    # Only an absent --width takes the default: --width 0 is refused, not replaced.
    width = 8 * acts.d if args.width is None else args.width
    spec = {**parse_arch(args.arch), "l1_coeff": args.l1_coeff}
    if args.encoder_steps is not None:
        spec["encoder_steps"] = args.encoder_steps
    seeds = [args.seed]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, not {args.seeds!r}") from None
        if len(set(seeds)) != len(seeds):
            raise UserError(f"--seeds {args.seeds} names a seed twice")
        if "{seed}" not in args.out:
            raise UserError("with --seeds, --out must contain {seed} (one checkpoint per seed)")
    cfgs = [SAEConfig(d_in=acts.d, d_sae=width, k=args.k, arch=args.arch, seed=s, **spec) for s in seeds]
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
        data_on_device=args.data_on_device,
        data_memory_fraction=args.data_memory_fraction,
        seed=seeds[0],
    )
    if not args.seeds:
        return train(args.activations, cfgs[0], tcfg, args.out, resume=not args.no_resume,
                     force=args.force)
    outs = [args.out.replace("{seed}", str(s)) for s in seeds]
    runs = train_many(args.activations, cfgs, tcfg, outs, resume=not args.no_resume,
                      force=args.force)
    return {"runs": runs, "tokens_per_s": runs[0]["tokens_per_s"]}
