"""The trainer: stream an activation set, optimise one sparse coder, write a checkpoint.

Several seeds of one configuration can share the loop (``train_many``): one pass over the
data feeds every model, which is how a multi-seed study spends its GPU time well.

One loop serves every kind: a *stepper* (SAEStepper here, dl.DLStepper for dictionary
learning) does one optimisation step on a batch; the loop owns the data stream, the
learning-rate schedule, dead-latent bookkeeping, logging, resume state and the final
checkpoint.

Convergence: the log has about 200 rows whatever the run's length (TrainConfig.log_every).
When a run ends, the trainer measures how much its smoothed training FVU still fell over
the 20 % of steps before the final linear decay (``convergence``), writes that trend and a
``converged`` flag into cfg.json and the summary, and warns on stderr when the run has not
converged. The window stops where the decay starts because the decay lowers the FVU by
itself, converged or not (benchmarks/RESULTS.md, the defaults sweep).

Resume: every ``checkpoint_every`` steps the full state (parameters, optimiser, dead-latent
counters, RNG, log) is written atomically to ``<out>.resume/`` beside the checkpoint. A
restarted run replays the data stream up to the saved step (cheap: no model work) and
continues; on CPU with the same thread count it ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

# The convergence control is a pure function of the run's own log (it imports nothing from
# isae), so the trainer can state it in cfg.json as the run ends.
from isae.analysis.convergence import fvu_trend, is_converged
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.data.atomic import writable_parent
from isae.data.stream import shuffled_batches
from isae.errors import UserError
from isae.gpu import cuda_graphs as graphs
from isae.gpu import ops as fast
from isae.models.config import SAEConfig, TrainConfig
from isae.models.dictionary_learning import DLStepper
from isae.models.sparse_coder import Codes, SparseCoder
from isae.progress import progress

log = logging.getLogger(__name__)

CONVERGENCE_TAIL = 0.2
"""Fraction of the steps over which the convergence control measures the FVU's fall."""


class SAEStepper:
    """Adam on the SAE loss with the unit-norm decoder constraint.

    On CUDA the TopK family's step is replayed as a CUDA graph (cuda_cuda_graphs.py); elsewhere it
    runs eagerly, the CPU with the reference implementation.
    """

    def __init__(self, model: SparseCoder, tcfg: TrainConfig) -> None:
        self.model = model
        self.tcfg = tcfg
        self.base_lr = tcfg.learning_rate(model.cfg.d_sae)
        cuda = model.W_dec.is_cuda
        self.graphs = None
        lr: float | torch.Tensor = self.base_lr
        if cuda and graphs.ENABLED and fast.ENABLED and model.cfg.kind == "topk":
            # A recorded step reads the learning rate from a tensor, so the schedule can
            # change it between replays.
            lr = torch.tensor(self.base_lr, device=model.device)
            self.graphs = graphs.StepGraphs(self._body, self._before_recording)
        # The fused kernel on CUDA (what benchmarks/gpu_bench.py measured); the CPU keeps the
        # reference implementation.
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=cuda, capturable=self.graphs is not None)

    def step(self, x: torch.Tensor, lr_scale: float, dead: torch.Tensor | None) -> dict:
        if self.graphs is None:
            for g in self.opt.param_groups:
                g["lr"] = self.base_lr * lr_scale
            return self._body(x, dead, None)
        for g in self.opt.param_groups:
            g["lr"].fill_(self.base_lr * lr_scale)
        if dead is None:
            dead = torch.zeros(self.model.cfg.d_sae, dtype=torch.bool, device=x.device)
        width = graphs.aux_bucket(int(dead.sum()), self.model.cfg.d_sae)  # the one host sync
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
    decay_start = _decay_start(total)
    if step < decay_start:
        return 1.0
    return max(total - step, 0) / max(total - decay_start, 1)


def _decay_start(total: int) -> int:
    """First step of the linear decay: the last 20 % of the steps."""
    return int(0.8 * total)


def resume_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.resume"


def _check_out(out: Path) -> None:
    writable_parent(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")


class _Run:
    """One model being trained: its stepper, dead-latent counters, log and destination."""

    def __init__(self, sae_cfg: SAEConfig, tcfg: TrainConfig, out: Path, device) -> None:
        self.cfg = sae_cfg
        self.out = out
        self.model = SparseCoder(sae_cfg, device=device)
        self.stepper = (DLStepper(self.model, seed=sae_cfg.seed) if sae_cfg.kind == "dl"
                        else SAEStepper(self.model, tcfg))
        self.since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
        self.rows: list[dict] = []

    def state(self) -> dict:
        return {"stepper": self.stepper.state_dict(), "since_fired": self.since_fired,
                "log": self.rows}

    def restore(self, s: dict) -> None:
        self.stepper.load_state_dict(s["stepper"])
        self.since_fired = s["since_fired"].to(self.since_fired.device)
        self.rows = s["log"]


def train(
    activations: str | os.PathLike,
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = True,
) -> dict:
    """Train one sparse coder; returns the summary printed by ``isae train``."""
    return train_many(activations, [sae_cfg], tcfg, [out], resume)[0]


def train_many(
    activations: str | os.PathLike,
    sae_cfgs: list[SAEConfig],
    tcfg: TrainConfig,
    outs: list[str | os.PathLike],
    resume: bool = True,
) -> list[dict]:
    """Train several sparse coders (e.g. seeds) on one shared stream of batches.

    The data order comes from ``tcfg.seed``; with one model this is the model's own seed,
    so a single run and a run of several seeds differ only in that the latter share one order.
    """
    outs = [Path(o) for o in outs]
    for o in outs:
        _check_out(o)
    acts = ActivationSet(activations)
    for c in sae_cfgs:
        if acts.d != c.d_in:
            raise UserError(f"activation set has d={acts.d}, model expects d_in={c.d_in}")
    train_rows = int(acts.meta.get("train_rows", acts.rows))
    device = torch.device(tcfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")

    norm = acts.normalizer()
    mean = torch.as_tensor(norm.mean, device=device)
    runs = [_Run(c, tcfg, o, device) for c, o in zip(sae_cfgs, outs)]
    total_steps = max(math.ceil(tcfg.tokens / tcfg.batch_size), 1)
    log_every = tcfg.log_interval(total_steps)
    start_step = 0
    wall0 = 0.0

    rdir = resume_dir(outs[0])
    fingerprint = {"sae": [c.to_dict() for c in sae_cfgs], "train": _train_fingerprint(tcfg),
                   "d": acts.d, "activations": str(Path(activations).resolve())}
    if resume and (rdir / "state.pt").is_file():
        state = torch.load(rdir / "state.pt", map_location=device, weights_only=False)
        if state["fingerprint"]["d"] != acts.d:
            raise UserError(
                f"resume state {rdir} was made on data of dimension {state['fingerprint']['d']}, "
                f"but {activations} has d={acts.d}; delete {rdir} to start afresh"
            )
        if state["fingerprint"] != fingerprint:
            raise UserError(f"resume state {rdir} belongs to a different configuration; delete it to start afresh")
        for run, s in zip(runs, state["runs"]):
            run.restore(s)
        start_step = state["step"]
        wall0 = state["wall"]
        log.info("resuming %s from step %d of %d", outs[0], start_step, total_steps)

    batches = shuffled_batches(acts, tcfg.batch_size, tcfg.shuffle_buffer, tcfg.seed, device)
    for _ in range(start_step):  # replay the stream: same order as an uninterrupted run
        next(batches)

    name = sae_cfgs[0].arch + (f" x{len(runs)} seeds" if len(runs) > 1 else "")
    t0 = time.perf_counter()
    bar = progress(total=total_steps * tcfg.batch_size, desc=f"train {name}", unit="tok")
    bar.update(start_step * tcfg.batch_size)
    try:
        for step in range(start_step, total_steps):
            x = (next(batches) - mean) / norm.scale
            lr_scale = lr_multiplier(step, total_steps, tcfg)
            logging_step = step % log_every == 0 or step == total_steps - 1
            for run in runs:
                dead = run.since_fired >= tcfg.dead_tokens
                m = run.stepper.step(x, lr_scale, dead)
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
                        raise UserError(f"training diverged at step {step} (loss {row['loss']}); lower --lr")
                    run.rows.append(row)
            bar.update(x.shape[0])
            if logging_step:
                r = runs[0].rows[-1]
                bar.set_postfix(fvu=f"{r['fvu']:.3f}", l0=f"{r['l0']:.1f}", dead=f"{r['dead_frac']:.2f}")
            if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < total_steps:
                _save_state(rdir, {
                    "fingerprint": fingerprint,
                    "runs": [run.state() for run in runs],
                    "step": step + 1,
                    "wall": wall0 + time.perf_counter() - t0,
                })
    finally:
        bar.close()

    tokens_seen = total_steps * tcfg.batch_size
    elapsed = wall0 + time.perf_counter() - t0
    rate = (tokens_seen - start_step * tcfg.batch_size) * len(runs) / max(time.perf_counter() - t0, 1e-9)
    summaries = []
    for run in runs:
        log_bytes = io.BytesIO()
        table = pd.DataFrame(run.rows)
        table.to_parquet(log_bytes, index=False)
        conv = convergence(table, tcfg, run.out, total_steps)
        extra = {
            "tokens_seen": tokens_seen,
            **conv,
            "train": _train_fingerprint(tcfg),
            "lr": getattr(run.stepper, "base_lr", None),
            "activations": {
                "path": str(Path(activations)),
                "d": acts.d,
                "train_rows": train_rows,
                **{k: acts.meta[k] for k in ("source", "model", "hook", "dtype") if k in acts.meta},
            },
        }
        checkpoint.save(run.model, run.out, norm, extra=extra,
                        files={"train_log.parquet": log_bytes.getvalue()})
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
        })
    shutil.rmtree(rdir, ignore_errors=True)
    return summaries


def convergence_window(total_steps: int, tcfg: TrainConfig) -> tuple[int, int]:
    """[start, end) steps over which the convergence control measures the FVU's fall: the
    last CONVERGENCE_TAIL of the steps before the final linear decay begins (that decay
    lowers the FVU by itself, converged or not), or of all steps for the other schedules."""
    end = _decay_start(total_steps) if tcfg.decay == "linear" else total_steps
    return max(end - round(CONVERGENCE_TAIL * total_steps), 0), end


def convergence(log_table: pd.DataFrame, tcfg: TrainConfig, out: Path, total_steps: int) -> dict:
    """The convergence control of a finished run, from its own log: the relative fall of the
    smoothed training FVU over ``convergence_window`` (``fvu_trend``, positive while it
    falls; None when the log is too short to say) and ``converged`` (its size under
    ``tcfg.converged_below``). Warns on stderr when the run has not converged."""
    start, end = convergence_window(total_steps, tcfg)
    part = log_table[log_table["step"] < end]
    span = float(part["step"].max() - part["step"].min()) if len(part) else 0.0
    # fvu_trend measures over the last `tail` of the log it is given, smoothed over all of it
    trend = fvu_trend(part, tail=min((end - start) / span, 1.0)) if span > 0 else math.nan
    # Either way: an FVU that rises at a constant learning rate has not settled either
    # (isae-iter's can, by several per cent, while its codes and dictionary co-adapt).
    converged = is_converged(abs(trend), tcfg.converged_below)
    if not converged:
        if math.isfinite(trend):
            moved = "fell" if trend > 0 else "rose"
            why = (f"its smoothed training FVU still {moved} by {100 * abs(trend):.1f} % over "
                   f"steps {start}-{end} of {total_steps} (converged: under "
                   f"{100 * tcfg.converged_below:.1f} %)")
        else:
            why = f"its log ({len(log_table)} rows over {total_steps} steps) is too short to tell"
        log.warning("%s has not converged: %s; train on more tokens (--tokens, now %d)",
                    out, why, tcfg.tokens)
    return {"fvu_trend": trend if math.isfinite(trend) else None,
            "fvu_trend_steps": [start, end], "converged": converged,
            "converged_below": tcfg.converged_below}


def _train_fingerprint(tcfg: TrainConfig) -> dict:
    """The training settings that change the result (not the device or logging cadence)."""
    keep = ("tokens", "batch_size", "lr", "warmup_frac", "decay", "auxk_alpha", "dead_tokens",
            "shuffle_buffer", "seed")
    return {k: getattr(tcfg, k) for k in keep}


def _save_state(rdir: Path, state: dict) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    tmp = rdir / f".state.pt.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, rdir / "state.pt")

