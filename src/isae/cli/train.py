"""``isae train``: train one sparse coder on an activation set (or several: seeds and
architectures sharing one pass over the data).

The flags that set a config field come from that field (isae.cli.fields): its default and
its docstring, so they are written once, in isae.models.config.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from isae.cli.fields import add_field_flags, field_values
from isae.data.activations import ActivationSet
from isae.data.atomic import check_out, output_lock
from isae.errors import UserError
from isae.models.config import (
    SAEConfig,
    TrainConfig,
    arch_fields,
    arch_help,
    carry_lr,
    parse_arch,
    steps_hint,
)

if TYPE_CHECKING:
    import pandas as pd

#: SAEConfig fields with a flag. The width's default is known once the data is; the IHT
#: steps are the architecture's (the flag may only repeat them: +iterN asks for steps).
SAE_FLAGS = ("k", "d_sae", "seed", "l1_coeff", "encoder_steps")
#: TrainConfig fields with a flag (its seed, of the data order, is the first model seed).
TRAIN_FLAGS = ("tokens", "batch_size", "lr", "base_lr", "decay", "warmup_frac", "auxk_alpha",
               "auxk_norm", "auxk_detach", "auxk_fit", "auxk_skip", "dead_tokens",
               "shuffle_buffer", "checkpoint_every", "checkpoint_seconds", "log_every",
               "converged_below", "device", "data_on_device", "data_memory_fraction")
log = logging.getLogger(__name__)

#: Times d, the width when --width is not given.
WIDTH_PER_DIM = 8


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one sparse coder (resumes after a crash)")
    p.add_argument("--activations", required=True, help="activation-set folder")
    p.add_argument("--arch", required=True,
                   help=f"architecture: {arch_help()}; several comma-separated share one pass "
                        "over the data (--out must contain {arch})")
    add_field_flags(p, SAEConfig, SAE_FLAGS, flags={"d_sae": "--width"},
                    defaults={"d_sae": (None, f"{WIDTH_PER_DIM} x d"),
                              "encoder_steps": (None, "the arch's")},
                    notes={"seed": "isae train also orders the data by it.",
                           "encoder_steps": "The arch decides them (topk+iter3 asks for 3); a "
                                            "value that contradicts it is refused."})
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds trained together on one pass over the data "
                        "(--out must contain {seed}; the data order comes from the first seed)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the data order, the first seed's when not given; fixing it "
                        "makes a run's result independent of which runs share its pass")
    add_field_flags(p, TrainConfig, TRAIN_FLAGS,
                    defaults={"log_every": (None, "total steps // 200, at least 1")})
    p.add_argument("--lr-from", default=None, metavar="FILE",
                   help="learning rates by arch from a JSON file {\"lr\": {arch: lr}} (as "
                        "written by isae lr-sweep); a variant such as topk+signed takes its "
                        "preset's rate when it has none of its own. When the file names the "
                        "width its rates were chosen at (\"width\": N, as lr-sweep writes), a "
                        "run of another --width gets them x sqrt(N / width), as the default "
                        "rate scales")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="copy, instead of training, any run that a checkpoint under DIR already "
                        "is: the same arch, shape, seed, training settings, learning rate, data "
                        "seed and activation set (CPU training is deterministic)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing resume state")
    p.add_argument("--out", required=True, help="checkpoint folder to write (an existing "
                   "checkpoint or empty folder is replaced; never a folder holding files isae "
                   "did not write)")
    p.add_argument("--force", action="store_true",
                   help="also replace an isae output of another kind at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    acts = ActivationSet(args.activations)
    # Only an absent --width takes the default: --width 0 is refused, not replaced.
    width = WIDTH_PER_DIM * acts.d if args.d_sae is None else args.d_sae
    archs = [a for a in args.arch.split(",") if a]
    if len(archs) != len(set(archs)) or not archs:
        raise UserError(f"--arch must name distinct architectures, not {args.arch!r}")
    if len(archs) > 1 and "{arch}" not in args.out:
        raise UserError("with several --arch, --out must contain {arch} (one checkpoint per arch)")
    for arch in archs:
        parse_arch(arch)  # an unknown name or switch: one line
        steps = arch_fields(arch)["encoder_steps"]
        if args.encoder_steps is not None and args.encoder_steps != steps:
            # The name decides: a checkpoint labelled topk never runs thresholding steps.
            raise UserError(f"--encoder-steps {args.encoder_steps} contradicts --arch {arch}, "
                            f"which runs {steps}; {steps_hint(arch, args.encoder_steps)}")
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
    if args.lr is not None and args.lr_from:
        raise UserError("give --lr or --lr-from, not both")
    rates = read_lr_file(args.lr_from, archs, width) if args.lr_from else {}
    runs = [(a, s) for a in archs for s in seeds]
    cfgs = [SAEConfig(d_in=acts.d, d_sae=width, k=args.k, arch=a, seed=s, l1_coeff=args.l1_coeff)
            for a, s in runs]
    tcfg = TrainConfig(**field_values(args, TRAIN_FLAGS),
                       seed=seeds[0] if args.data_seed is None else args.data_seed)
    outs = [args.out.replace("{seed}", str(s)).replace("{arch}", a) for a, s in runs]
    lrs = [rates.get(a) for a, _ in runs]
    # Before any work, against every input: the set, the lr file, the folder reused from.
    inputs = [args.activations, *(p for p in (args.lr_from, args.reuse) if p)]
    for out in outs:
        check_out(out, "checkpoint", inputs=inputs, force=args.force)
    with output_lock(outs):  # a second run writing one of outs is refused
        return _train(args, runs, cfgs, tcfg, outs, lrs, inputs)


def _train(args: argparse.Namespace, runs: list, cfgs: list[SAEConfig], tcfg: TrainConfig,
           outs: list[str], lrs: list[float | None], inputs: list[str]) -> dict:
    from isae.training.trainer import train, train_many

    report = partial(convergence_report, tcfg)
    reused = []
    if args.reuse:
        from isae.data import checkpoints
        from isae.training.trainer import identical_checkpoints

        wanted = [(cfg, replace(tcfg, lr=lr) if lr is not None else tcfg)
                  for cfg, lr in zip(cfgs, lrs)]
        keep = []
        for i, (cfg, out, found) in enumerate(
                zip(cfgs, outs, identical_checkpoints(args.reuse, wanted, args.activations))):
            if found is None:
                keep.append(i)
                continue
            checkpoints.copy(found, out, inputs=inputs, force=args.force)
            reused.append({"out": out, "arch": cfg.arch, "seed": cfg.seed, "reused": str(found)})
        cfgs, outs, lrs = [cfgs[i] for i in keep], [outs[i] for i in keep], [lrs[i] for i in keep]
        runs = [runs[i] for i in keep]
        if not runs:
            return {"runs": reused, "tokens_per_s": None}
    if len(runs) == 1 and not reused:
        one = replace(tcfg, lr=lrs[0]) if lrs[0] is not None else tcfg
        return train(args.activations, cfgs[0], one, outs[0], resume=not args.no_resume,
                     force=args.force, report=report)
    done = train_many(args.activations, cfgs, tcfg, outs, resume=not args.no_resume, lrs=lrs,
                      force=args.force, report=report)
    return {"runs": reused + done, "tokens_per_s": done[0]["tokens_per_s"]}


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


def read_lr_file(path: str, archs: list[str], width: int | None = None) -> dict[str, float]:
    """{arch: learning rate} for ``archs`` from a JSON file {"lr": {name: rate}}: the arch's
    own entry, else its preset's (topk+signed -> topk). dl trains without one. UserError
    when an arch has neither. A file that names its ``width`` (isae lr-sweep's lr.json) has
    its rates carried to ``width`` as the default rate scales (carry_lr: x sqrt(its width /
    width)), so that the factor the sweep chose over the default holds at every width."""
    from isae.data.json_files import read_json

    try:
        obj = read_json(path)
    except UserError as e:
        raise UserError(f"--lr-from {e}") from None
    table = obj.get("lr") if isinstance(obj, dict) else None
    if not isinstance(table, dict):
        raise UserError(f"--lr-from {path}: not a JSON object with an \"lr\" table")
    at = obj.get("width")
    if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 1):
        raise UserError(f"--lr-from {path}: \"width\" is not a positive integer")
    rates = {}
    for arch in archs:
        parsed = parse_arch(arch)
        if parsed.fields["kind"] == "dl":
            continue
        for name in (arch, parsed.preset):
            value = table.get(name)
            if value is not None:
                if not isinstance(value, (int, float)) or not value > 0:
                    raise UserError(f"--lr-from {path}: the rate of {name!r} is not a positive number")
                rates[arch] = float(value)
                if at is not None and width is not None and at != width:
                    rates[arch] = carry_lr(float(value), at, width)
                    log.info("%s: lr %.4g, chosen at width %d, carried to width %d: %.4g",
                             arch, value, at, width, rates[arch])
                break
        else:
            alt = "" if parsed.preset == arch else f" or its preset {parsed.preset!r}"
            raise UserError(f"--lr-from {path} has no learning rate for {arch!r}{alt}")
    return rates
