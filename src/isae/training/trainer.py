"""The trainer: stream an activation set, optimise sparse coders, write checkpoints.

Several seeds (or architectures) can share the loop (``train_many``): one pass over the
data feeds every model, which is how a multi-seed study spends its GPU time well.

A pass has four phases, each a function below: set up and check (``_set_up``), pick up a
resume state (``_resume``), the step loop (``_step_loop``), and saving each run's
checkpoint (``_save_run``). One loop serves every kind: a *stepper* (training/steppers.py)
does one optimisation step of a model on a batch, and a *pass stepper* steps all the
pass's models (``pass_stepper`` chooses it: on the GPU's fast path the TopK-family runs
of one shape step as one stacked model, training/group.py); the loop owns the data stream, the
learning-rate schedule, logging, resume state and the final checkpoints. The models run on
the op set chosen once for the device (isae.models.compute.select_ops): nothing here
knows which one it is.

Logging: about 200 rows per run whatever its length (TrainConfig.log_every), enough for
the convergence control that ``isae train`` computes from the log as each run ends (the
``report`` hook; isae.analysis.convergence.run_convergence) and writes into cfg.json.

Batches come from the training split held in device memory, or streamed from disk
(training/batches.py chooses; ``TrainConfig.data_on_device``), normalised by the set's
``Normalizer``.

Resume: every ``checkpoint_every`` steps, once ``checkpoint_seconds`` have passed since the
last save, the full state (parameters, optimiser, dead-latent counters, RNG, log, the batch
source) is written atomically to ``<out>.resume/`` beside the checkpoint, as safetensors
plus JSON (training/resume.py: no pickle, so loading it runs no code). A restarted run
starts its batches at the saved step (the device copy jumps there; the stream is replayed,
cheap: no model work) and continues; on CPU with the same thread count it ends bitwise equal
to an uninterrupted run. The state records a fingerprint of the configuration and of the
data (meta.json and the shards' names and sizes): a state made for anything else is refused,
never mixed in. The data's fingerprint is read again at each resume save and before the
checkpoints are written: a set replaced while training (say, regenerated) is refused, and
nothing is saved.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save as safetensors_bytes

from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet, Normalizer
from isae.data.atomic import check_out, check_resume_folder, remove_resume_folder
from isae.errors import UserError
from isae.models.compute import select_ops
from isae.models.config import SAEConfig, TrainConfig
from isae.progress import progress
from isae.training.batches import DEVICE, STREAM, training_batches
from isae.training.footprint import check_training_fits
from isae.training.group import grouped_pass
from isae.training.resume import LEGACY_FILE, STATE_FILE, StateError, load_state, save_state
from isae.training.steppers import EachRun, PassStepper, Run, SAEStepper

__all__ = ["SAEStepper", "identical_checkpoints", "lr_multiplier", "resume_dir", "train",
           "train_many"]

log = logging.getLogger(__name__)

Report = Callable[[pd.DataFrame, int, Path], dict]
"""What ``train_many`` calls as a run ends: (train log, total steps, out) -> cfg.json fields."""

#: Seeds sharing a pass on CUDA run their steps and bookkeeping on one stream each, so one
#: model's small kernels can overlap another's. Opt-in (ISAE_SEED_STREAMS=1) until the GPU
#: benchmark (gpu_bench.py, seeds) has measured what it buys.
SEED_STREAMS = os.environ.get("ISAE_SEED_STREAMS", "0") == "1"


def lr_multiplier(step: int, total: int, tcfg: TrainConfig) -> float:
    """Linear warmup, then constant / linear decay over the last 20% / cosine."""
    warm = max(int(tcfg.warmup_frac * total), 1)
    if step < warm:
        return (step + 1) / warm
    if tcfg.decay == "constant":
        return 1.0
    if tcfg.decay == "cosine":
        p = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * p))
    decay_start = tcfg.decay_start(total)
    if step < decay_start:
        return 1.0
    return max(total - step, 0) / max(total - decay_start, 1)


def resume_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.resume"


def pass_stepper(runs: list[Run], device: torch.device, grouped: bool | None = None
                 ) -> PassStepper:
    """How a pass steps its runs, the one place that chooses: the TopK-family runs of one
    shape as one batched model (training/group.py; ``grouped``, None: on the GPU's fast
    path), the others each with its own stepper in turn."""
    return (grouped_pass(runs, runs[0].tcfg, device, grouped, seed_streams=SEED_STREAMS)
            or EachRun(runs, device, seed_streams=SEED_STREAMS))


def train(
    activations: str | os.PathLike,
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = True,
    force: bool = False,
    report: Report | None = None,
) -> dict:
    """Train one sparse coder; returns the summary printed by ``isae train``."""
    return train_many(activations, [sae_cfg], tcfg, [out], resume, force=force, report=report)[0]


def train_many(
    activations: str | os.PathLike,
    sae_cfgs: list[SAEConfig],
    tcfg: TrainConfig,
    outs: list[str | os.PathLike],
    resume: bool = True,
    lrs: list[float | None] | None = None,
    drop_diverged: bool = False,
    force: bool = False,
    report: Report | None = None,
    grouped: bool | None = None,
) -> list[dict]:
    """Train several sparse coders (e.g. seeds, or architectures) on one shared stream of
    batches.

    ``report(log, total_steps, out)`` is called for each run as it ends, with its train log;
    the dict it returns goes into the run's cfg.json and summary (``isae train`` passes the
    convergence control, isae.analysis.convergence, which this layer may not import).

    The data order comes from ``tcfg.seed``; with one model this is the model's own seed,
    so a single run and a run of several seeds differ only in that the latter share one order.
    ``lrs``: one learning rate per model (None = ``tcfg.lr``), so that architectures tuned
    apart can share the pass. ``drop_diverged``: a model whose loss turns non-finite stops
    training and is not saved (its summary says ``diverged``) while the others go on, as a
    learning-rate sweep needs; otherwise divergence is a UserError.
    An existing out is replaced only if it is a checkpoint, or with ``force``; never the
    activation set or a folder holding it (isae.data.atomic.check_out).
    ``grouped``: whether the TopK-family runs train as one stacked model (``pass_stepper``).
    """
    p = _set_up(activations, sae_cfgs, tcfg, outs, lrs, force)
    start = _resume(p) if resume else _Start()
    batches, source = training_batches(p.acts, tcfg, p.device, start.step, start.source)
    seconds = _step_loop(p, pass_stepper(p.runs, p.device, grouped), batches, source, start,
                         drop_diverged)
    _check_same_data(p)
    tokens = p.total_steps * tcfg.batch_size
    timing = {"tokens_per_s": (tokens - start.step * tcfg.batch_size) * len(p.runs)
              / max(seconds, 1e-9), "wall_s": start.wall + seconds}
    summaries = [_save_run(p, run, source, timing, report) for run in p.runs]
    remove_resume_folder(p.rdir)
    return summaries


# ----------------------------------------------------------------------------- the phases


@dataclass
class _Pass:
    """One pass over an activation set, checked and set up: its runs and where they go."""

    activations: str | os.PathLike
    acts: ActivationSet
    train_rows: int
    norm: Normalizer
    tcfg: TrainConfig
    device: torch.device
    runs: list[Run]
    inputs: list
    """What no output may overlap: the activation set."""
    rdir: Path
    """The resume folder, beside the first run's checkpoint."""
    total_steps: int
    fingerprint: dict
    """The configuration and the data, as a resume state records them."""
    force: bool


@dataclass
class _Start:
    """Where the step loop starts: at the beginning, or where a resume state left off."""

    step: int = 0
    wall: float = 0.0
    """Seconds spent before the state was saved."""
    source: str | None = None
    """The batch source the state was trained on."""


def _set_up(activations, sae_cfgs: list[SAEConfig], tcfg: TrainConfig, outs: list,
            lrs: list[float | None] | None, force: bool) -> _Pass:
    """Check the outputs, the data and the device; build the runs on the device's op set."""
    if lrs is not None and len(lrs) != len(sae_cfgs):
        raise ValueError(f"{len(lrs)} learning rates for {len(sae_cfgs)} models")
    tcfgs = [tcfg if lr is None else replace(tcfg, lr=lr) for lr in (lrs or [None] * len(sae_cfgs))]
    outs = [Path(o) for o in outs]
    if len({os.path.realpath(o) for o in outs}) != len(outs):
        raise UserError("two runs would write the same --out (a seed given twice?)")
    inputs = [activations]
    for o in outs:
        check_out(o, "checkpoint", inputs=inputs, force=force)
    rdir = resume_dir(outs[0])
    check_resume_folder(rdir, inputs)
    acts = ActivationSet(activations)
    for c in sae_cfgs:
        if acts.d != c.d_in:
            raise UserError(f"activation set has d={acts.d}, model expects d_in={c.d_in}")
    train_rows = int(acts.meta.get("train_rows", acts.rows))
    if train_rows == 0:
        raise UserError(f"activation set {activations} has no training rows (all held out, or none)")
    device = torch.device(tcfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    check_training_fits(acts, sae_cfgs, tcfg, device)  # before a model is built
    ops = select_ops(device)
    runs = [Run(c, t, o, device, ops) for c, t, o in zip(sae_cfgs, tcfgs, outs)]
    fingerprint = {"sae": [c.to_dict() for c in sae_cfgs],
                   "train": [_train_fingerprint(t) for t in tcfgs],
                   "d": acts.d, "activations": str(Path(activations).resolve()),
                   "data": acts.fingerprint()}
    return _Pass(activations, acts, train_rows, acts.normalizer(), tcfg, device, runs, inputs,
                 rdir, tcfg.total_steps(), fingerprint, force)


def _resume(p: _Pass) -> _Start:
    """The runs restored from the resume state in ``p.rdir``, if there is one for this pass."""
    state = _load_resume(p.rdir, p.fingerprint, p.activations, len(p.runs), p.total_steps)
    if state is None:
        return _Start()
    try:
        for run, s in zip(p.runs, state["runs"]):
            run.restore(s)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"resume state {p.rdir / STATE_FILE} does not fit this run ({e}); "
                        "pass --no-resume to start afresh") from None
    log.info("resuming %s from step %d of %d", p.runs[0].out, state["step"], p.total_steps)
    # states from before the "batches" key streamed
    return _Start(state["step"], float(state["wall"]), state.get("batches", STREAM))


def _step_loop(p: _Pass, stepper: PassStepper, batches: Iterator[torch.Tensor], source: str,
               start: _Start, drop_diverged: bool) -> float:
    """Steps ``start.step`` to the end: each run's log rows, resume states on the way.
    Returns the seconds it took."""
    tcfg, runs = p.tcfg, p.runs
    log_every = tcfg.log_interval(p.total_steps)
    archs = set(r.cfg.arch for r in runs)
    name = f"{len(runs)} models" if len(archs) > 1 else runs[0].cfg.arch + (
        f" x{len(runs)} seeds" if len(runs) > 1 else "")
    t0 = last_save = time.perf_counter()
    bar = progress(total=p.total_steps * tcfg.batch_size, desc=f"train {name}", unit="tok")
    bar.update(start.step * tcfg.batch_size)
    try:
        for step in range(start.step, p.total_steps):
            x = p.norm.forward(next(batches))
            lr_scale = lr_multiplier(step, p.total_steps, tcfg)
            deads = [run.since_fired >= tcfg.dead_tokens for run in runs]
            metrics = stepper.step(x, lr_scale, deads)
            logging_step = step % log_every == 0 or step == p.total_steps - 1
            if logging_step:
                wall = start.wall + time.perf_counter() - t0
                for run, m, dead in zip(runs, metrics, deads):
                    if m is not None:
                        _log_step(run, m, dead, step, lr_scale, wall, drop_diverged)
            bar.update(x.shape[0])
            if logging_step and runs[0].rows:
                r = runs[0].rows[-1]
                bar.set_postfix(fvu=f"{r['fvu']:.3f}", l0=f"{r['l0']:.1f}", dead=f"{r['dead_frac']:.2f}")
            if ((step + 1) % tcfg.checkpoint_every == 0 and step + 1 < p.total_steps
                    and time.perf_counter() - last_save >= tcfg.checkpoint_seconds):
                last_save = time.perf_counter()
                _check_same_data(p)
                _save_state(p.rdir, {
                    "fingerprint": p.fingerprint,
                    "runs": [run.state() for run in runs],
                    "step": step + 1,
                    "wall": start.wall + time.perf_counter() - t0,
                    "batches": source,
                })
    finally:
        bar.close()
    return time.perf_counter() - t0


def _log_step(run: Run, m: dict, dead: torch.Tensor, step: int, lr_scale: float, wall: float,
              drop_diverged: bool) -> None:
    """Append a row to ``run``'s log; a non-finite loss stops the run (or the pass)."""
    codes = m["codes"]
    row = {
        "step": step,
        "tokens": (step + 1) * run.tcfg.batch_size,
        "loss": float(m["loss"]),
        "fvu": float(m["fvu"]),
        "auxk": float(m["auxk"]),
        "l0": int((codes.val != 0).sum()) / codes.val.shape[0],
        "dead_frac": int(dead.sum()) / dead.numel(),
        "lr": getattr(run.stepper, "base_lr", 0.0) * lr_scale,
        "wall_s": wall,
    }
    if not math.isfinite(row["loss"]):
        if not drop_diverged:
            raise UserError(f"training diverged at step {step} (loss {row['loss']}); lower --lr")
        log.warning("%s seed %d diverged at step %d (lr %.3g); dropped",
                    run.cfg.arch, run.cfg.seed, step, row["lr"] / max(lr_scale, 1e-30))
        run.diverged = True
        return
    run.rows.append(row)


def _check_same_data(p: _Pass) -> None:
    """UserError when the activation set on disk is no longer the one training started on
    (its meta.json or shards replaced, say regenerated): the runs would mix two sets."""
    try:
        now = p.acts.fingerprint()  # read afresh: meta.json and the shards now on disk
    except OSError:
        now = None
    if now != p.fingerprint["data"]:
        raise UserError(
            f"activation set {p.activations} changed while training (meta.json or its shards "
            "were replaced, e.g. regenerated), so the runs would mix two sets; nothing was "
            "saved: train again with --no-resume"
        )


def _save_run(p: _Pass, run: Run, source: str, timing: dict, report: Report | None) -> dict:
    """Write ``run``'s checkpoint (with its train log and initial decoder); its summary."""
    tokens_seen = p.total_steps * p.tcfg.batch_size
    if run.diverged:
        return {"out": None, "arch": run.cfg.arch, "k": run.cfg.k, "width": run.cfg.d_sae,
                "seed": run.cfg.seed, "diverged": True,
                "lr": getattr(run.stepper, "base_lr", None)}
    log_bytes = io.BytesIO()
    table = pd.DataFrame(run.rows)
    table.to_parquet(log_bytes, index=False)
    conv = report(table, p.total_steps, run.out) if report is not None else {}
    acts = p.acts
    extra = {
        "tokens_seen": tokens_seen,
        **conv,
        "train": {**_train_fingerprint(run.tcfg), "batches": source},
        "lr": getattr(run.stepper, "base_lr", None),
        "activations": {
            "path": str(Path(p.activations)),
            "d": acts.d,
            "train_rows": p.train_rows,
            **{k: acts.meta[k] for k in ("source", "model", "hook", "dtype") if k in acts.meta},
        },
    }
    files = {checkpoint.TRAIN_LOG: log_bytes.getvalue()}
    W_init = run.initial_decoder()
    if W_init is not None:
        files[checkpoint.INIT_FILE] = safetensors_bytes({"W_dec": W_init.float().contiguous()})
    checkpoint.save(run.model, run.out, p.norm, extra=extra, files=files, inputs=p.inputs,
                    force=p.force)
    last = run.rows[-1]
    return {
        "out": str(run.out),
        "arch": run.cfg.arch,
        "k": run.cfg.k,
        "width": run.cfg.d_sae,
        "seed": run.cfg.seed,
        "tokens": tokens_seen,
        "fvu": last["fvu"],
        "l0": last["l0"],
        "dead_frac": last["dead_frac"],
        **conv,
        **timing,
        "batches": source,
    }


def identical_checkpoints(
    search: str | os.PathLike,
    runs: list[tuple[SAEConfig, TrainConfig]],
    activations: str | os.PathLike,
) -> list[Path | None]:
    """For each run (its model and training settings), a checkpoint under ``search`` that
    the run would reproduce: the same architecture, shape and seed, the same training
    settings (learning rate, tokens, batch size, schedule, data seed and batch source) on
    the same activation set; None where there is none. Training is deterministic on the CPU
    for a fixed thread count and a run does not depend on the others of its pass, so such a
    checkpoint is the run's result (the study reuses the lr sweep's runs this way). The set
    and the checkpoints' cfg.json are read once for all the runs."""
    from isae.training.batches import choose_source

    acts = ActivationSet(activations)
    found = []
    for cfg_path in sorted(Path(search).rglob(checkpoint.CFG)):
        try:
            found.append((cfg_path.parent, checkpoint.read_cfg(cfg_path.parent)))
        except UserError:
            continue
    data_path = str(Path(activations))
    out: list[Path | None] = []
    for sae_cfg, tcfg in runs:
        want_train = {**_train_fingerprint(tcfg), "batches": choose_source(tcfg, tcfg.device, acts, None)}
        want_sae = sae_cfg.to_dict()
        out.append(next(
            (path for path, cfg in found
             if all(cfg.get(k) == v for k, v in want_sae.items())
             and (cfg.get("activations") or {}).get("path") == data_path
             and cfg.get("train") == want_train),
            None))
    return out


#: Settings added after checkpoints were first written: recorded only where they differ
#: from their default, so that a checkpoint trained before they existed keeps its record.
_LATER_SETTINGS = ("base_lr", "auxk_norm", "auxk_detach", "auxk_fit", "auxk_skip")


def _train_fingerprint(tcfg: TrainConfig) -> dict:
    """The training settings that change the result (not the device or logging cadence)."""
    keep = ("tokens", "batch_size", "lr", "warmup_frac", "decay", "auxk_alpha", "dead_tokens",
            "shuffle_buffer", "seed")
    out = {k: getattr(tcfg, k) for k in keep}
    default = TrainConfig()
    out.update({k: getattr(tcfg, k) for k in _LATER_SETTINGS
                if getattr(tcfg, k) != getattr(default, k)})
    return out


def _load_resume(rdir: Path, fingerprint: dict, activations, n_runs: int,
                 total_steps: int) -> dict | None:
    """The saved state in ``rdir`` if there is one and it belongs to this run; UserError
    (saying that --no-resume starts afresh) for one that does not, or cannot be read."""
    legacy = rdir / LEGACY_FILE
    path = rdir / STATE_FILE
    if not path.is_file():
        if legacy.exists():
            raise UserError(
                f"{legacy} is a resume state in the old pickle format, which is never loaded "
                "(a pickle can run code); pass --no-resume to start afresh"
            )
        return None
    try:
        state = load_state(path)
        fp, runs, step = state["fingerprint"], state["runs"], state["step"]
        if not (isinstance(fp, dict) and isinstance(runs, list)
                and isinstance(step, int) and not isinstance(step, bool)
                and step >= 0 and isinstance(state["wall"], (int, float))
                and state.get("batches", STREAM) in (DEVICE, STREAM)):
            raise StateError("its contents are not a resume state of this shape")
    except (StateError, KeyError, TypeError) as e:
        raise UserError(f"resume state {path} is unreadable or corrupt ({e}); "
                        "pass --no-resume to start afresh") from None
    if fp.get("d") != fingerprint["d"]:
        raise UserError(
            f"resume state {rdir} was made on data of dimension {fp.get('d')}, but "
            f"{activations} has d={fingerprint['d']}; pass --no-resume to start afresh"
        )
    if fp.get("activations") != fingerprint["activations"]:
        raise UserError(
            f"resume state {rdir} was made on the activation set {fp.get('activations')}, not "
            f"{activations}; pass --no-resume to start afresh"
        )
    if fp.get("data") != fingerprint["data"]:
        raise UserError(
            f"resume state {rdir} was made on other data than {activations} (meta.json or the "
            "shards differ: the set was changed or regenerated); pass --no-resume to start afresh"
        )
    if fp != fingerprint:
        raise UserError(f"resume state {rdir} belongs to another configuration "
                        f"({_settings_differ(fp, fingerprint)}); pass --no-resume to start afresh")
    if len(runs) != n_runs or step > total_steps:
        raise UserError(f"resume state {path} is unreadable or corrupt (its contents are not a "
                        "resume state of this run's shape); pass --no-resume to start afresh")
    return state


def _settings_differ(saved: dict, now: dict) -> str:
    """The first setting in which a resume state's fingerprint differs from this run's, as
    "tokens 2000 there, 4000 here"."""
    for part, label in (("train", "training"), ("sae", "model")):
        a, b = saved.get(part), now.get(part)
        if not (isinstance(a, list) and len(a) == len(b)):
            n = len(a) if isinstance(a, list) else "?"
            return f"it trains {n} models together, this run {len(b)}"
        for x, y in zip(a, b):
            if not isinstance(x, dict):
                return f"its {label} settings are unreadable"
            for key in sorted(set(x) | set(y), key=str):
                if x.get(key) != y.get(key):
                    return f"{label} setting {key} is {x.get(key)!r} there, {y.get(key)!r} here"
    return "a setting differs"


def _save_state(rdir: Path, state: dict) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    save_state(rdir / STATE_FILE, state)
    # A state of the old format must not outlive a newer one.
    (rdir / LEGACY_FILE).unlink(missing_ok=True)
