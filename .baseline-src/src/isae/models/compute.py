"""The compute path of the SAE family, chosen once: which op set a model's maths runs on.

An op set holds the operations of ``SparseCoder`` whose fast versions differ from the
plain maths in code but not in result: the encoder's top-k, the sparse decode, an IHT step,
the FVU, AuxK and the decoder's row constraint. Two exist:

* the reference (``isae.models.reference.ReferenceOps``): plain torch on any device, float32
  throughout; the CPU trains with it and every test compares against it;
* the fast path (``isae.gpu.ops.FastOps``): Triton kernels, bfloat16 products and
  hand-written backward passes for CUDA tensors, and a training step replayed as a CUDA
  graph (``step_graphs``).

Besides the maths, an op set says how a training step may run: ``step_graphs`` hands the
trainer a replayer of its step (or None: eager steps), and ``refresh_copies`` brings the
op set's cached copies of a parameter up to date before a step is recorded. So the trainer
runs on the op set it is given and never imports the GPU code itself.

``select_ops(device)`` is the one place that chooses; whoever creates a model (the trainer,
checkpoint loading, the benchmarks) calls it once and hands the result to ``SparseCoder``:

* any device but CUDA: the reference;
* CUDA: the fast path, unless the environment sets ``ISAE_REFERENCE_OPS=1`` (the reference
  on the GPU, e.g. to check a surprising number);
* ``ISAE_CUDA_GRAPHS=0``: the fast path without CUDA-graph replay (each step launched
  eagerly; the way out if a recording ever fails).

``grouped_training(device)`` says whether the TopK-family runs of one pass train as one
stacked model (isae.training.group): on the fast path by default; ``ISAE_GROUPED=0`` trains
them one by one there, ``ISAE_GROUPED=1`` groups them on any device (the CPU's grouped
path runs the stacked reference maths; CPU training stays one by one unless asked).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from isae.errors import UserError
from isae.models.reference import REFERENCE, AuxLatents, Codes, Weights

REFERENCE_ENV = "ISAE_REFERENCE_OPS"
GRAPHS_ENV = "ISAE_CUDA_GRAPHS"
GROUPED_ENV = "ISAE_GROUPED"


class StepReplay(Protocol):
    """A training step recorded once and replayed (isae.gpu.cuda_graphs.StepGraphs)."""

    def replay(self, x: Tensor, dead: Tensor, n_dead: int) -> dict:
        """The step ``body(x, dead, width)`` on a batch, ``n_dead`` of whose ``dead`` latents
        are dead (it picks AuxK's fixed width, and so the recording)."""
        ...

    def reset(self) -> None:
        """Forget the recordings: a tensor the step reads was replaced, not updated in place."""
        ...


#: A training step: (x [B, D], dead [N] bool, AuxK's width or None) -> tensors.
StepBody = Callable[[Tensor, Tensor | None, int | None], dict]


class Ops(Protocol):
    """What SparseCoder asks of an op set (see isae.models.reference.ReferenceOps for what
    each operation computes)."""

    name: str
    cuda_graphs: bool

    def weights(self, W_dec: Tensor, W_enc: Tensor | None, b_dec: Tensor, b_enc: Tensor
                ) -> Weights: ...

    def aux_latents(self, dead: Tensor, width: int | None) -> AuxLatents | None: ...

    def topk_encode(self, x: Tensor, w: Weights, k: int, signed: bool,
                    aux: AuxLatents | None, k_aux: int) -> tuple[Codes, Tensor, Tensor | None]: ...

    def decode(self, codes: Codes, w: Weights) -> Tensor: ...

    def iht_step(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                 scale: float) -> tuple[Codes, Tensor | None]: ...

    def iht_final(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int, signed: bool,
                  scale: float, steps: int) -> tuple[Codes, Tensor | None]: ...

    def fvu(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]: ...

    def auxk_loss(self, err: Tensor, pre: Tensor, aux_codes: Tensor | None, aux: AuxLatents,
                  w: Weights, signed: bool, k_aux: int, fit: bool = False) -> Tensor: ...

    def project_rows_(self, G: Tensor, W: Tensor) -> None: ...

    def normalize_rows_(self, W: Tensor) -> None: ...

    def step_graphs(self, body: StepBody, prepare: Callable[[], None],
                    device: torch.device) -> StepReplay | None: ...

    def refresh_copies(self, W: Tensor) -> None: ...


def _flag(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip() or default
    if value not in ("0", "1"):
        raise UserError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"


def select_ops(device: str | torch.device) -> Ops:
    """The op set for models on ``device`` (see the module docstring for the rules)."""
    if torch.device(device).type != "cuda" or _flag(REFERENCE_ENV, "0"):
        return REFERENCE
    from isae.gpu.ops import FastOps

    return FastOps(cuda_graphs=_flag(GRAPHS_ENV, "1"))


def grouped_training(device: str | torch.device) -> bool:
    """Whether the runs of one pass on ``device`` train as one stacked model (see the
    module docstring for the rules)."""
    value = os.environ.get(GROUPED_ENV, "").strip()
    if value:
        return _flag(GROUPED_ENV, "0")
    return select_ops(device).name == "fast"
