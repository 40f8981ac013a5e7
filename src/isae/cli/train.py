"""``isae train``: train one sparse coder on an activation set.

The flags that set a config field come from that field (isae.cli.fields): its default and
its docstring, so they are written once, in isae.models.config.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from isae.cli.fields import add_field_flags, field_values
from isae.data.activations import ActivationSet
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig, arch_help, parse_arch

if TYPE_CHECKING:
    import pandas as pd

#: SAEConfig fields with a flag. The width's default is known once the data is; the IHT
#: steps default to the architecture's.
SAE_FLAGS = ("k", "d_sae", "seed", "l1_coeff", "encoder_steps")
#: TrainConfig fields with a flag (its seed, of the data order, is the first model seed).
TRAIN_FLAGS = ("tokens", "batch_size", "lr", "decay", "warmup_frac", "auxk_alpha", "dead_tokens",
               "shuffle_buffer", "checkpoint_every", "log_every", "converged_below", "device",
               "data_on_device", "data_memory_fraction")
log = logging.getLogger(__name__)

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
    add_field_flags(p, TrainConfig, TRAIN_FLAGS,
                    defaults={"log_every": (None, "total steps // 200, at least 1")})
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
    report = partial(convergence_report, tcfg)
    if not args.seeds:
        return train(args.activations, cfgs[0], tcfg, args.out, resume=not args.no_resume,
                     force=args.force, report=report)
    outs = [args.out.replace("{seed}", str(s)) for s in seeds]
    runs = train_many(args.activations, cfgs, tcfg, outs, resume=not args.no_resume,
                      force=args.force, report=report)
    return {"runs": runs, "tokens_per_s": runs[0]["tokens_per_s"]}


def convergence_report(tcfg: TrainConfig, log_table: pd.DataFrame, total_steps: int,
                       out: Path) -> dict:
    """The trainer's end-of-run hook: the convergence control (into cfg.json and the
    summary), and one warning line on stderr when the run has not converged."""
    from isae.analysis.convergence import run_convergence

    c = run_convergence(log_table, tcfg, total_steps)
    if not c["converged"]:
        start, end = c["fvu_trend_steps"]
        trend = c["fvu_trend"]
        if trend is None:
            why = f"its log ({len(log_table)} rows over {total_steps} steps) is too short to tell"
        else:
            why = (f"its smoothed training FVU still {'fell' if trend > 0 else 'rose'} by "
                   f"{100 * abs(trend):.1f} % over steps {start}-{end} of {total_steps} "
                   f"(converged: under {100 * tcfg.converged_below:.1f} %)")
        log.warning("%s has not converged: %s; train on more tokens (--tokens, now %d)",
                    out, why, tcfg.tokens)
    return c
