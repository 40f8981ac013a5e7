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
    # Defaults are TrainConfig's (its field docs say why each was chosen).
    T = TrainConfig
    p.add_argument("--tokens", type=int, default=T.tokens, help="training rows to consume")
    p.add_argument("--batch-size", type=int, default=T.batch_size, help="rows per step")
    p.add_argument("--lr", type=float, default=T.lr,
                   help="Adam learning rate (default scales with width; see TrainConfig.lr)")
    p.add_argument("--decay", choices=["linear", "cosine", "constant"], default=T.decay,
                   help="learning-rate decay after warmup")
    p.add_argument("--warmup-frac", type=float, default=T.warmup_frac,
                   help="fraction of steps with a linear warmup")
    p.add_argument("--auxk-alpha", type=float, default=T.auxk_alpha, help="AuxK loss weight")
    p.add_argument("--dead-tokens", type=int, default=T.dead_tokens,
                   help="rows without firing after which a latent counts as dead")
    p.add_argument("--l1-coeff", type=float, default=1e-3, help="relu only: L1 penalty weight")
    p.add_argument("--encoder-steps", type=int, default=None,
                   help="override the arch's iterative-hard-thresholding steps")
    p.add_argument("--shuffle-buffer", type=int, default=T.shuffle_buffer,
                   help="rows in the shuffle buffer")
    p.add_argument("--checkpoint-every", type=int, default=T.checkpoint_every,
                   help="steps between resume saves")
    p.add_argument("--log-every", type=int, default=T.log_every,
                   help="steps between log rows (default: about 200 rows per run)")
    p.add_argument("--converged-below", type=float, default=T.converged_below,
                   help="convergence threshold: relative fall of the smoothed training FVU "
                        "over the last 20%% of steps")
    p.add_argument("--device", default=T.device, help="cpu | cuda | cuda:N")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing resume state")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from isae.training.trainer import train, train_many

    acts = ActivationSet(args.activations)
    width = args.width or 8 * acts.d
    spec = {**parse_arch(args.arch), "l1_coeff": args.l1_coeff}
    if args.encoder_steps is not None:
        spec["encoder_steps"] = args.encoder_steps
    seeds = [args.seed]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, not {args.seeds!r}") from None
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
        converged_below=args.converged_below,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        seed=seeds[0],
    )
    if not args.seeds:
        return train(args.activations, cfgs[0], tcfg, args.out, resume=not args.no_resume)
    outs = [args.out.replace("{seed}", str(s)) for s in seeds]
    runs = train_many(args.activations, cfgs, tcfg, outs, resume=not args.no_resume)
    return {"runs": runs, "tokens_per_s": runs[0]["tokens_per_s"]}
