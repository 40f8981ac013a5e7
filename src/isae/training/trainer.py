"""The trainer: stream an activation set, optimise one sparse coder, write a checkpoint.

Several seeds of one configuration can share the loop (``train_many``): one pass over the
data feeds every model, which is how a multi-seed study spends its GPU time well.

One loop serves every kind: a *stepper* (SAEStepper here, DLStepper for dictionary
learning) does one optimisation step on a batch; the loop owns the data stream, the
learning-rate schedule, dead-latent bookkeeping, logging, resume state and the final
checkpoint.

Logging: about 200 rows per run whatever its length (TrainConfig.log_every), enough for
the convergence control that ``isae train`` computes from the log as each run ends (the
``report`` hook; isae.analysis.convergence.run_convergence) and writes into cfg.json.

Batches come from the training split held in device memory, or streamed from disk
(training/batches.py chooses; ``TrainConfig.data_on_device``).

Resume: every ``checkpoint_every`` steps the full state (parameters, optimiser, dead-latent
counters, RNG, log, the batch source) is written atomically to ``<out>.resume/`` beside the
checkpoint, as safetensors plus JSON (training/resume.py: no pickle, so loading it runs no
code). A restarted run starts its batches at the saved step (the device copy jumps there;
the stream is replayed, cheap: no model work) and continues; on CPU with the same thread
count it ends bitwise equal to an uninterrupted run. The state records a fingerprint of the
configuration and of the data (meta.json and the shards' names and sizes): a state made
for anything else is refused, never mixed in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save as safetensors_bytes

from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.data.atomic import check_out, check_resume_folder, remove_resume_folder
from isae.errors import UserError
from isae.gpu import cuda_graphs as graphs
from isae.gpu import ops as fast
from isae.models.compute import Ops, select_ops
from isae.models.config import SAEConfig, TrainConfig
from isae.models.dictionary_learning import DLStepper
from isae.models.sparse_coder import Codes, SparseCoder
from isae.progress import progress
from isae.training.batches import DEVICE, STREAM, training_batches
from isae.training.footprint import check_training_fits
from isae.training.resume import LEGACY_FILE, STATE_FILE, StateError, load_state, save_state

log = logging.getLogger(__name__)

Report = Callable[[pd.DataFrame, int, Path], dict]
"""What ``train_many`` calls as a run ends: (train log, total steps, out) -> cfg.json fields."""

#: Seeds sharing a pass on CUDA run their steps and bookkeeping on one stream each, so one
#: model's small kernels can overlap another's. Opt-in (ISAE_SEED_STREAMS=1) until the GPU
#: benchmark (gpu_bench.py, seeds) has measured what it buys.
SEED_STREAMS = os.environ.get("ISAE_SEED_STREAMS", "0") == "1"


@contextlib.contextmanager
def _on_stream(stream: torch.cuda.Stream | None, *inputs: torch.Tensor):
    """Run the block on ``stream`` once the current stream's work is done, keeping
    ``inputs`` (made on the current stream) alive until the stream has read them; with
    None, run it as it is."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    for t in inputs:
        t.record_stream(stream)
    with torch.cuda.stream(stream):
        yield


class SAEStepper:
    """Adam on the SAE loss with the unit-norm decoder constraint.

    On CUDA the TopK family's step is replayed as a CUDA graph (isae.gpu.cuda_graphs) when the
    model's op set asks for it (the fast path); elsewhere it runs eagerly.
    """

    def __init__(self, model: SparseCoder, tcfg: TrainConfig) -> None:
        self.model = model
        self.tcfg = tcfg
        self.base_lr = tcfg.learning_rate(model.cfg.d_sae)
        cuda = model.W_dec.is_cuda
        self.graphs = None
        lr: float | torch.Tensor = self.base_lr
        if cuda and model.ops.cuda_graphs and model.cfg.kind == "topk":
            # A recorded step reads the learning rate from a tensor, so the schedule can
            # change it between replays.
            lr = torch.tensor(self.base_lr, device=model.device)
            self.graphs = graphs.StepGraphs(self._body, self._before_recording)
        # The fused kernel on CUDA (what benchmarks/gpu_bench.py measured); the CPU keeps the
        # reference implementation.
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=cuda, capturable=self.graphs is not None)

    def step(self, x: torch.Tensor, lr_scale: float, dead: torch.Tensor | None,
             n_dead: int | None = None) -> dict:
        """One optimisation step. ``n_dead``: ``dead.sum()`` when the caller already read it
        (it picks the CUDA graph; reading it is a host sync)."""
        if self.graphs is None:
            for g in self.opt.param_groups:
                g["lr"] = self.base_lr * lr_scale
            return self._body(x, dead, None)
        for g in self.opt.param_groups:
            g["lr"].fill_(self.base_lr * lr_scale)
        if dead is None:
            dead = torch.zeros(self.model.cfg.d_sae, dtype=torch.bool, device=x.device)
        if n_dead is None:
            n_dead = int(dead.sum())  # the one host sync
        width = graphs.aux_bucket(n_dead, self.model.cfg.d_sae)
        return self.graphs(x, dead, width)

    def _body(self, x: torch.Tensor, dead: torch.Tensor | None, aux_width: int | None) -> dict:
        model = self.model
        out = model(x, dead=dead, aux_width=aux_width)
        if model.cfg.kind == "relu":
            mse = (x - out.x_hat).pow(2).sum(-1).mean() / x.shape[1]
            loss = mse + model.cfg.l1_coeff * out.l1
        else:
            loss = out.fvu + self.tcfg.auxk_alpha * out.auxk
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        model.project_decoder_grad()
        self.opt.step()
        model.normalize_decoder()
        # Tensors, not floats: the loop reads them only when it logs (no GPU sync per step).
        # Detached codes: holding the step's autograd graph until the next step would keep
        # its memory (and, across streams, its gradient-accumulation nodes) alive.
        codes = Codes(out.codes.val.detach(), out.codes.idx)
        return {"loss": loss.detach(), "fvu": out.fvu.detach(), "auxk": out.auxk.detach(),
                "codes": codes}

    def _before_recording(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        # The bfloat16 decoder copy must be current: the recorded forward reads it as is,
        # and each replay's normalisation rewrites it (fast.normalize_rows_).
        fast.low(self.model.W_dec)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        # Adam does not check the shapes of its moments; a wrong one would broadcast.
        params = [p for g in s["opt"]["param_groups"] for p in g["params"]]
        mine = list(self.model.parameters())
        if len(params) != len(mine):
            raise ValueError("optimiser state for another set of parameters")
        for i, p in zip(params, mine):
            for key in ("exp_avg", "exp_avg_sq"):
                t = s["opt"]["state"].get(i, {}).get(key)
                if t is not None and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"optimiser {key} of shape {list(t.shape)} for a parameter "
                                     f"of shape {list(p.shape)}")
        self.opt.load_state_dict(s["opt"])
        if self.graphs is not None:  # the optimiser's state tensors were replaced
            for g in self.opt.param_groups:  # a state saved by an eager run has a float lr
                g["lr"] = torch.as_tensor(g["lr"], dtype=torch.float32,
                                          device=self.model.device).clone()
            self.graphs.reset()


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


class _Run:
    """One model being trained: its stepper, dead-latent counters, log and destination."""

    def __init__(self, sae_cfg: SAEConfig, tcfg: TrainConfig, out: Path, device, ops: Ops) -> None:
        self.cfg = sae_cfg
        self.tcfg = tcfg
        self.out = out
        self.model = SparseCoder(sae_cfg, device=device, ops=ops)
        self.stepper = (DLStepper(self.model, seed=sae_cfg.seed) if sae_cfg.kind == "dl"
                        else SAEStepper(self.model, tcfg))
        self.since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
        self.rows: list[dict] = []
        self.diverged = False
        # Dictionary learning draws its first atoms from the first batch (DLStepper.initial).
        self.W_init = None if sae_cfg.kind == "dl" else self.model.W_dec.detach().cpu().clone()

    def initial_decoder(self) -> torch.Tensor | None:
        if self.W_init is None and getattr(self.stepper, "initial", None) is not None:
            self.W_init = self.stepper.initial.detach().cpu().clone()
        return self.W_init

    def state(self) -> dict:
        return {"stepper": self.stepper.state_dict(), "since_fired": self.since_fired,
                "log": self.rows, "W_init": self.initial_decoder(), "diverged": self.diverged}

    def restore(self, s: dict) -> None:
        self.stepper.load_state_dict(s["stepper"])
        if not all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()):
            raise ValueError("the saved parameters hold NaN or Inf")
        since = s["since_fired"]
        if (not isinstance(since, torch.Tensor) or since.shape != self.since_fired.shape
                or since.dtype != self.since_fired.dtype):
            raise ValueError("dead-latent counters of the wrong shape or type")
        self.since_fired = since.to(self.since_fired.device)
        if not isinstance(s["log"], list) or not all(isinstance(r, dict) for r in s["log"]):
            raise ValueError("the log is not a list of rows")
        self.rows = s["log"]
        if s.get("W_init") is not None:
            self.W_init = s["W_init"].cpu()
        self.diverged = bool(s.get("diverged", False))


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
    """
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

    norm = acts.normalizer()
    mean = torch.as_tensor(norm.mean, device=device)
    ops = select_ops(device)
    runs = [_Run(c, t, o, device, ops) for c, t, o in zip(sae_cfgs, tcfgs, outs)]
    total_steps = tcfg.total_steps()
    log_every = tcfg.log_interval(total_steps)
    start_step = 0
    wall0 = 0.0
    saved_source = None

    fingerprint = {"sae": [c.to_dict() for c in sae_cfgs],
                   "train": [_train_fingerprint(t) for t in tcfgs],
                   "d": acts.d, "activations": str(Path(activations).resolve()),
                   "data": acts.fingerprint()}
    if resume:
        state = _load_resume(rdir, fingerprint, activations, len(runs), total_steps)
        if state is not None:
            try:
                for run, s in zip(runs, state["runs"]):
                    run.restore(s)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                raise UserError(f"resume state {rdir / STATE_FILE} does not fit this run ({e}); "
                                "pass --no-resume to start afresh") from None
            start_step = state["step"]
            wall0 = float(state["wall"])
            saved_source = state.get("batches", STREAM)  # states from before the key streamed
            log.info("resuming %s from step %d of %d", outs[0], start_step, total_steps)

    batches, source = training_batches(acts, tcfg, device, start_step, saved_source)
    # With several graphed models, their dead counts are read in one host sync per step
    # (one per model would idle the GPU after each model's step while the host waits).
    one_sync = len(runs) > 1 and all(getattr(r.stepper, "graphs", None) is not None for r in runs)
    streams = ([torch.cuda.Stream(device) for _ in runs] if one_sync and SEED_STREAMS
               else [None] * len(runs))

    archs = set(c.arch for c in sae_cfgs)
    name = f"{len(runs)} models" if len(archs) > 1 else sae_cfgs[0].arch + (
        f" x{len(runs)} seeds" if len(runs) > 1 else "")
    t0 = time.perf_counter()
    bar = progress(total=total_steps * tcfg.batch_size, desc=f"train {name}", unit="tok")
    bar.update(start_step * tcfg.batch_size)
    try:
        for step in range(start_step, total_steps):
            x = (next(batches) - mean) / norm.scale
            lr_scale = lr_multiplier(step, total_steps, tcfg)
            logging_step = step % log_every == 0 or step == total_steps - 1
            deads = [run.since_fired >= tcfg.dead_tokens for run in runs]
            n_deads = (torch.stack([d.sum() for d in deads]).tolist() if one_sync
                       else [None] * len(runs))
            for run, dead, n_dead, stream in zip(runs, deads, n_deads, streams):
                if run.diverged:
                    continue
                with _on_stream(stream, x, dead):
                    m = (run.stepper.step(x, lr_scale, dead) if n_dead is None
                         else run.stepper.step(x, lr_scale, dead, n_dead))
                    codes = m["codes"]
                    with torch.no_grad():  # no boolean indexing: it would wait for the GPU
                        if run.cfg.kind == "relu":  # dense codes
                            fires = (codes.val != 0).sum(0)
                        else:
                            fires = torch.zeros(run.cfg.d_sae, dtype=torch.long, device=device)
                            fires.scatter_add_(0, codes.idx.reshape(-1), (codes.val != 0).reshape(-1).long())
                        run.since_fired = torch.where(fires > 0, 0, run.since_fired + x.shape[0])
                    if logging_step:
                        row = {
                            "step": step,
                            "tokens": (step + 1) * tcfg.batch_size,
                            "loss": float(m["loss"]),
                            "fvu": float(m["fvu"]),
                            "auxk": float(m["auxk"]),
                            "l0": int((codes.val != 0).sum()) / codes.val.shape[0],
                            "dead_frac": int(dead.sum()) / dead.numel(),
                            "lr": getattr(run.stepper, "base_lr", 0.0) * lr_scale,
                            "wall_s": wall0 + time.perf_counter() - t0,
                        }
                        if not math.isfinite(row["loss"]):
                            if not drop_diverged:
                                raise UserError(f"training diverged at step {step} (loss {row['loss']}); lower --lr")
                            log.warning("%s seed %d diverged at step %d (lr %.3g); dropped",
                                        run.cfg.arch, run.cfg.seed, step,
                                        row["lr"] / max(lr_scale, 1e-30))
                            run.diverged = True
                            continue
                        run.rows.append(row)
            for stream in streams:  # the next step's dead counts read every model's counters
                if stream is not None:
                    torch.cuda.current_stream(device).wait_stream(stream)
            bar.update(x.shape[0])
            if logging_step and runs[0].rows:
                r = runs[0].rows[-1]
                bar.set_postfix(fvu=f"{r['fvu']:.3f}", l0=f"{r['l0']:.1f}", dead=f"{r['dead_frac']:.2f}")
            if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < total_steps:
                _save_state(rdir, {
                    "fingerprint": fingerprint,
                    "runs": [run.state() for run in runs],
                    "step": step + 1,
                    "wall": wall0 + time.perf_counter() - t0,
                    "batches": source,
                })
    finally:
        bar.close()

    tokens_seen = total_steps * tcfg.batch_size
    elapsed = wall0 + time.perf_counter() - t0
    rate = (tokens_seen - start_step * tcfg.batch_size) * len(runs) / max(time.perf_counter() - t0, 1e-9)
    summaries = []
    for run in runs:
        if run.diverged:
            summaries.append({"out": None, "arch": run.cfg.arch, "k": run.cfg.k,
                              "width": run.cfg.d_sae, "seed": run.cfg.seed, "diverged": True,
                              "lr": getattr(run.stepper, "base_lr", None)})
            continue
        log_bytes = io.BytesIO()
        table = pd.DataFrame(run.rows)
        table.to_parquet(log_bytes, index=False)
        conv = report(table, total_steps, run.out) if report is not None else {}
        extra = {
            "tokens_seen": tokens_seen,
            **conv,
            "train": {**_train_fingerprint(run.tcfg), "batches": source},
            "lr": getattr(run.stepper, "base_lr", None),
            "activations": {
                "path": str(Path(activations)),
                "d": acts.d,
                "train_rows": train_rows,
                **{k: acts.meta[k] for k in ("source", "model", "hook", "dtype") if k in acts.meta},
            },
        }
        files = {checkpoint.TRAIN_LOG: log_bytes.getvalue()}
        W_init = run.initial_decoder()
        if W_init is not None:
            files[checkpoint.INIT_FILE] = safetensors_bytes({"W_dec": W_init.float().contiguous()})
        checkpoint.save(run.model, run.out, norm, extra=extra, files=files, inputs=inputs,
                        force=force)
        last = run.rows[-1]
        summaries.append({
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
            "tokens_per_s": rate,
            "wall_s": elapsed,
            "batches": source,
        })
    remove_resume_folder(rdir)
    return summaries


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


def _train_fingerprint(tcfg: TrainConfig) -> dict:
    """The training settings that change the result (not the device or logging cadence)."""
    keep = ("tokens", "batch_size", "lr", "warmup_frac", "decay", "auxk_alpha", "dead_tokens",
            "shuffle_buffer", "seed")
    return {k: getattr(tcfg, k) for k in keep}


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
