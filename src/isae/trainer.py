"""The trainer: stream an activation set, optimise one sparse coder, write a checkpoint.

One loop serves every kind: a *stepper* (SAEStepper here, dl.DLStepper for dictionary
learning) does one optimisation step on a batch; the loop owns the data stream, the
learning-rate schedule, dead-latent bookkeeping, logging, resume state and the final
checkpoint.

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

from . import checkpoint
from .actset import ActivationSet
from .config import SAEConfig, TrainConfig
from .dl import DLStepper
from .errors import UserError
from .io import progress
from .sae import SparseCoder
from .stream import shuffled_batches

log = logging.getLogger(__name__)


class SAEStepper:
    """Adam on the SAE loss with the unit-norm decoder constraint."""

    def __init__(self, model: SparseCoder, tcfg: TrainConfig) -> None:
        self.model = model
        self.tcfg = tcfg
        self.base_lr = tcfg.learning_rate(model.cfg.d_sae)
        self.opt = torch.optim.Adam(model.parameters(), lr=self.base_lr, betas=(0.9, 0.999), eps=1e-8)

    def step(self, x: torch.Tensor, lr_scale: float, dead: torch.Tensor | None) -> dict:
        model = self.model
        for g in self.opt.param_groups:
            g["lr"] = self.base_lr * lr_scale
        out = model(x, dead=dead)
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
        return {
            "loss": float(loss.detach()),
            "fvu": float(out.fvu.detach()),
            "auxk": float(out.auxk.detach()),
            "codes": out.codes,
        }

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])


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
    decay_start = int(0.8 * total)
    if step < decay_start:
        return 1.0
    return max(total - step, 0) / max(total - decay_start, 1)


def resume_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.resume"


def _check_out(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: folder {out.parent} is not writable")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")


def train(
    activations: str | os.PathLike,
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = True,
) -> dict:
    """Train one sparse coder; returns the summary printed by ``isae train``."""
    out = Path(out)
    _check_out(out)
    acts = ActivationSet(activations)
    if acts.d != sae_cfg.d_in:
        raise UserError(f"activation set has d={acts.d}, model expects d_in={sae_cfg.d_in}")
    train_rows = int(acts.meta.get("train_rows", acts.rows))
    device = torch.device(tcfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")

    norm = acts.normalizer()
    mean = torch.as_tensor(norm.mean, device=device)
    model = SparseCoder(sae_cfg, device=device)
    stepper = DLStepper(model, seed=tcfg.seed) if sae_cfg.kind == "dl" else SAEStepper(model, tcfg)
    N = sae_cfg.d_sae
    total_steps = max(math.ceil(tcfg.tokens / tcfg.batch_size), 1)
    since_fired = torch.zeros(N, dtype=torch.long, device=device)
    rows: list[dict] = []
    start_step = 0
    wall0 = 0.0

    rdir = resume_dir(out)
    fingerprint = {"sae": sae_cfg.to_dict(), "train": _train_fingerprint(tcfg), "d": acts.d,
                   "activations": str(Path(activations).resolve())}
    if resume and (rdir / "state.pt").is_file():
        state = torch.load(rdir / "state.pt", map_location=device, weights_only=False)
        if state["fingerprint"]["d"] != acts.d:
            raise UserError(
                f"resume state {rdir} was made on data of dimension {state['fingerprint']['d']}, "
                f"but {activations} has d={acts.d}; delete {rdir} to start afresh"
            )
        if state["fingerprint"] != fingerprint:
            raise UserError(f"resume state {rdir} belongs to a different configuration; delete it to start afresh")
        stepper.load_state_dict(state["stepper"])
        since_fired = state["since_fired"].to(device)
        rows = state["log"]
        start_step = state["step"]
        wall0 = state["wall"]
        log.info("resuming %s from step %d of %d", out, start_step, total_steps)

    batches = shuffled_batches(acts, tcfg.batch_size, tcfg.shuffle_buffer, tcfg.seed)
    for _ in range(start_step):  # replay the stream: same order as an uninterrupted run
        next(batches)

    t0 = time.perf_counter()
    bar = progress(total=total_steps * tcfg.batch_size, desc=f"train {sae_cfg.arch}", unit="tok")
    bar.update(start_step * tcfg.batch_size)
    try:
        step = start_step
        for step in range(start_step, total_steps):
            xb = torch.from_numpy(next(batches)).to(device)
            x = (xb - mean) / norm.scale
            dead = since_fired >= tcfg.dead_tokens
            lr_scale = lr_multiplier(step, total_steps, tcfg)
            m = stepper.step(x, lr_scale, dead)
            codes = m["codes"]
            with torch.no_grad():
                active = codes.idx[codes.val != 0]
                fired = torch.zeros(N, dtype=torch.bool, device=device)
                fired[active] = True
                since_fired += x.shape[0]
                since_fired[fired] = 0
            if not math.isfinite(m["loss"]):
                raise UserError(f"training diverged at step {step} (loss {m['loss']}); lower --lr")
            bar.update(x.shape[0])
            if step % tcfg.log_every == 0 or step == total_steps - 1:
                l0 = float((codes.val != 0).sum(-1).float().mean())
                row = {
                    "step": step,
                    "tokens": (step + 1) * tcfg.batch_size,
                    "loss": m["loss"],
                    "fvu": m["fvu"],
                    "auxk": m["auxk"],
                    "l0": l0,
                    "dead_frac": float(dead.float().mean()),
                    "lr": getattr(stepper, "base_lr", 0.0) * lr_scale,
                    "wall_s": wall0 + time.perf_counter() - t0,
                }
                rows.append(row)
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{l0:.1f}", dead=f"{row['dead_frac']:.2f}")
            if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < total_steps:
                _save_state(rdir, {
                    "fingerprint": fingerprint,
                    "stepper": stepper.state_dict(),
                    "since_fired": since_fired,
                    "log": rows,
                    "step": step + 1,
                    "wall": wall0 + time.perf_counter() - t0,
                })
    finally:
        bar.close()

    tokens_seen = total_steps * tcfg.batch_size
    elapsed = wall0 + time.perf_counter() - t0
    log_bytes = io.BytesIO()
    pd.DataFrame(rows).to_parquet(log_bytes, index=False)
    extra = {
        "tokens_seen": tokens_seen,
        "train": {k: v for k, v in _train_fingerprint(tcfg).items()},
        "lr": getattr(stepper, "base_lr", None),
        "activations": {
            "path": str(Path(activations)),
            "d": acts.d,
            "train_rows": train_rows,
            **{k: acts.meta[k] for k in ("source", "model", "hook", "dtype") if k in acts.meta},
        },
    }
    checkpoint.save(model, out, norm, extra=extra, files={"train_log.parquet": log_bytes.getvalue()})
    shutil.rmtree(rdir, ignore_errors=True)
    last = rows[-1]
    return {
        "out": str(out),
        "arch": sae_cfg.arch,
        "k": sae_cfg.k,
        "width": sae_cfg.d_sae,
        "seed": sae_cfg.seed,
        "tokens": tokens_seen,
        "fvu": last["fvu"],
        "l0": last["l0"],
        "dead_frac": last["dead_frac"],
        "tokens_per_s": (tokens_seen - start_step * tcfg.batch_size) / max(time.perf_counter() - t0, 1e-9),
        "wall_s": elapsed,
    }


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

