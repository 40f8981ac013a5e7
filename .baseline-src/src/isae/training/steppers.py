"""What one optimisation step does: the SAE family's gradient step (``SAEStepper``), one
model in training (``Run``), and how a pass over the data steps all of its runs on a
batch (``PassStepper``; ``EachRun`` steps them one after another).

A stepper runs on its model's op set (isae.models.compute): where the op set replays a
step as a recording (the fast path's CUDA graphs), the stepper hands it the step, and
nothing here knows how the recording is made. Dictionary learning has its own stepper
(isae.models.dictionary_learning.DLStepper) with the same interface.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch

from isae.models.compute import Ops
from isae.models.config import SAEConfig, TrainConfig
from isae.models.dictionary_learning import DLStepper
from isae.models.reference import auxk_weight
from isae.models.sparse_coder import Codes, SparseCoder


class SAEStepper:
    """Adam on the model's loss (``SparseCoder.loss``) with the unit-norm decoder constraint.

    Where the model's op set replays a step as a recording (``Ops.step_graphs``: the fast
    path on CUDA) and the model allows it (``SparseCoder.replays_steps``), the step is
    replayed; elsewhere it runs eagerly.
    """

    def __init__(self, model: SparseCoder, tcfg: TrainConfig) -> None:
        self.model = model
        self.tcfg = tcfg
        self.base_lr = tcfg.learning_rate(model.cfg.d_sae)
        #: The decoder before any step (a checkpoint keeps it as init.safetensors).
        self.initial = model.W_dec.detach().cpu().clone()
        self.graphs = (model.ops.step_graphs(self._body, self._before_recording, model.device)
                       if model.replays_steps else None)
        lr: float | torch.Tensor = self.base_lr
        if self.graphs is not None:
            # A recorded step reads the learning rate from a tensor, so the schedule can
            # change it between replays.
            lr = torch.tensor(self.base_lr, device=model.device)
        # The fused kernel on CUDA (what benchmarks/gpu_bench.py measured); the CPU keeps the
        # reference implementation.
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=model.W_dec.is_cuda, capturable=self.graphs is not None)

    def step(self, x: torch.Tensor, lr_scale: float, dead: torch.Tensor | None,
             n_dead: int | None = None) -> dict:
        """One optimisation step. ``n_dead``: ``dead.sum()`` when the caller already read it
        (it picks the recording; reading it is a host sync)."""
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
        return self.graphs.replay(x, dead, n_dead)

    def _body(self, x: torch.Tensor, dead: torch.Tensor | None, aux_width: int | None) -> dict:
        model = self.model
        out = model(x, dead=dead, aux_width=aux_width,
                    aux_detach=self.tcfg.auxk_detaches(model.cfg),
                    aux_fit=self.tcfg.auxk_fits(model.cfg))
        alpha = auxk_weight(self.tcfg.auxk_alpha_for(model.cfg), self.tcfg.auxk_norm, x, out.x_hat, dead,
                            max(model.cfg.d_in // 2, 1))
        loss = model.loss(x, out, alpha)
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
        # The op set's copies of the decoder must be current: the recorded forward reads
        # them as they are.
        self.model.ops.refresh_copies(self.model.W_dec)

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


def make_stepper(model: SparseCoder, tcfg: TrainConfig) -> SAEStepper | DLStepper:
    """The stepper that trains ``model``: gradient steps, or dictionary learning's update."""
    return SAEStepper(model, tcfg) if model.by_gradient else DLStepper(model, seed=model.cfg.seed)


class Run:
    """One model being trained: its stepper, dead-latent counters, log and destination."""

    def __init__(self, sae_cfg: SAEConfig, tcfg: TrainConfig, out: Path, device, ops: Ops) -> None:
        self.cfg = sae_cfg
        self.tcfg = tcfg
        self.out = out
        self.model = SparseCoder(sae_cfg, device=device, ops=ops)
        self.stepper = make_stepper(self.model, tcfg)
        self.since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
        self.rows: list[dict] = []
        self.diverged = False
        # Dictionary learning draws its first atoms from the first batch (DLStepper.initial).
        self.W_init: torch.Tensor | None = None

    def note_fired(self, codes: Codes, rows: int) -> None:
        """Count ``rows`` more rows since each latent last fired, 0 for those that fired in
        ``codes``."""
        fires = self.model.fired(codes)
        self.since_fired = torch.where(fires > 0, 0, self.since_fired + rows)

    def initial_decoder(self) -> torch.Tensor | None:
        if self.W_init is None and self.stepper.initial is not None:
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


class PassStepper(Protocol):
    """Steps every run of a pass on one batch.

    The trainer's loop owns the data, the schedule, the log and the resume state; a pass
    stepper owns how the runs' steps are launched. ``EachRun`` steps each run's own
    stepper in turn; a stepper for a whole group (one batched model for several runs)
    would take its place (isae.training.trainer.pass_stepper).
    """

    def step(self, x: torch.Tensor, lr_scale: float, deads: list[torch.Tensor]
             ) -> list[dict | None]:
        """One step of every run on ``x`` [B, D] (normalised) at ``lr_scale`` times its
        learning rate, ``deads[i]`` [N] marking run i's dead latents. Returns each run's
        metrics (``loss``, ``fvu``, ``auxk``: scalars, ``codes``: Codes), None for a run
        that has stopped (diverged); each run's ``since_fired`` counters are updated."""
        ...


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


class EachRun:
    """The pass stepper that steps each run's own stepper in turn.

    With several replayed models, their dead counts are read in one host sync per step
    (one per model would idle the GPU after each model's step while the host waits).
    ``seed_streams``: each such model steps on a CUDA stream of its own, so one model's
    small kernels can overlap another's.
    """

    def __init__(self, runs: list[Run], device: torch.device, seed_streams: bool = False) -> None:
        self.runs = runs
        self.device = device
        self.one_sync = len(runs) > 1 and all(getattr(r.stepper, "graphs", None) is not None
                                              for r in runs)
        self.streams = ([torch.cuda.Stream(device) for _ in runs] if self.one_sync and seed_streams
                        else [None] * len(runs))

    def step(self, x: torch.Tensor, lr_scale: float, deads: list[torch.Tensor]
             ) -> list[dict | None]:
        n_deads = (torch.stack([d.sum() for d in deads]).tolist() if self.one_sync
                   else [None] * len(self.runs))
        out: list[dict | None] = []
        for run, dead, n_dead, stream in zip(self.runs, deads, n_deads, self.streams):
            if run.diverged:
                out.append(None)
                continue
            with _on_stream(stream, x, dead):
                m = (run.stepper.step(x, lr_scale, dead) if n_dead is None
                     else run.stepper.step(x, lr_scale, dead, n_dead))
                run.note_fired(m["codes"], x.shape[0])
            out.append(m)
        for stream in self.streams:  # the next step's dead counts read every model's counters
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
        return out
