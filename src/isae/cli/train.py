"""``isae train``: train one sparse coder on an activation set.

The flags that set a config field come from that field (isae.cli.fields): its default and
its docstring, so they are written once, in isae.models.config.
"""

from __future__ import annotations

import argparse

from isae.cli.fields import add_field_flags, field_values
from isae.data.activations import ActivationSet
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig, arch_help, parse_arch

#: SAEConfig fields with a flag. The width's default is known once the data is; the IHT
#: steps default to the architecture's.
SAE_FLAGS = ("k", "d_sae", "seed", "l1_coeff", "encoder_steps")
#: TrainConfig fields with a flag (its seed, of the data order, is the first model seed).
TRAIN_FLAGS = ("tokens", "batch_size", "lr", "decay", "warmup_frac", "auxk_alpha", "dead_tokens",
               "shuffle_buffer", "checkpoint_every", "log_every", "device", "data_on_device",
               "data_memory_fraction")
#: Times d, the width when --width is not given.
WIDTH_PER_DIM = 8


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one sparse coder (resumes after a crash)")
    p.add_argument("--activations", required=True, help="activation-set folder")
    p.add_argument("--arch", required=True, help=f"architecture: {arch_help()}")
    add_field_flags(p, SAEConfig, SAE_FLAGS, flags={"d_sae": "--width"},
                    defaults={"d_sae": (None, f"{WIDTH_PER_DIM} x d"),
                              "encoder_steps": (None, "the arch's")},
                    notes={"seed": "isae train also orders the data by it."})
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds trained together on one pass over the data "
                        "(--out must contain {seed}; the data order comes from the first seed)")
    add_field_flags(p, TrainConfig, TRAIN_FLAGS)
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
    width = WIDTH_PER_DIM * acts.d if args.d_sae is None else args.d_sae
    spec = {**parse_arch(args.arch).fields, "l1_coeff": args.l1_coeff}
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
    tcfg = TrainConfig(**field_values(args, TRAIN_FLAGS), seed=seeds[0])
    if not args.seeds:
        return train(args.activations, cfgs[0], tcfg, args.out, resume=not args.no_resume,
                     force=args.force)
    outs = [args.out.replace("{seed}", str(s)) for s in seeds]
    runs = train_many(args.activations, cfgs, tcfg, outs, resume=not args.no_resume,
                      force=args.force)
    return {"runs": runs, "tokens_per_s": runs[0]["tokens_per_s"]}
