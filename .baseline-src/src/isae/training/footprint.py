"""The memory a training run cannot do without, from its shapes, checked against the
machine before a model is built (isae.limits): a width, batch or shuffle buffer that cannot
fit is one line naming the flags, not an allocator traceback or the kernel's OOM killer.

Each term is a lower bound of what the trainer allocates (float32 throughout):

* per model, its parameters with their gradients and Adam's two moments (one matrix
  [d_sae, d_in] when tied, two otherwise) and the saved initial decoder; for dictionary
  learning, the decoder and the update's statistics A [d_sae, d_sae] and B [d_sae, d_in];
* per step, the dense pre-activations [batch, d_sae] of the largest model (the models of a
  shared pass step one after the other);
* the batch source: the shuffle buffer, at least max(shuffle_buffer, 2 x batch) rows of d
  floats (isae.data.stream), or the training split held on the device (isae.data.resident).
"""

from __future__ import annotations

import torch

from isae.data import resident
from isae.data.activations import ActivationSet
from isae.limits import check_memory
from isae.models.config import SAEConfig, TrainConfig
from isae.training.batches import DEVICE, choose_source

FLOAT = 4


def model_bytes(cfg: SAEConfig) -> int:
    """One model's parameters, optimiser state and initial-decoder copy."""
    mat = cfg.d_in * cfg.d_sae
    if cfg.kind == "dl":
        return FLOAT * (2 * mat + cfg.d_sae**2)
    matrices = 1 if cfg.tied else 2
    return FLOAT * (4 * matrices * mat + mat)


def step_bytes(cfg: SAEConfig, batch_size: int) -> int:
    """The dense pre-activations [batch, d_sae] of one step."""
    return FLOAT * batch_size * cfg.d_sae


def buffer_bytes(d: int, tcfg: TrainConfig) -> int:
    """The shuffle buffer of the streamed source."""
    return FLOAT * max(tcfg.shuffle_buffer, 2 * tcfg.batch_size) * d


def check_training_fits(acts: ActivationSet, cfgs: list[SAEConfig], tcfg: TrainConfig,
                        device: torch.device) -> None:
    """UserError when the models, one step and the batch source cannot fit in ``device``'s
    available memory (the host's for the CPU)."""
    parts = {
        f"{len(cfgs)} model{'s' if len(cfgs) > 1 else ''} with optimiser state":
            sum(model_bytes(c) for c in cfgs),
        "a batch's pre-activations": max(step_bytes(c, tcfg.batch_size) for c in cfgs),
    }
    if choose_source(tcfg, device, acts) == DEVICE:
        parts["the training split on the device"] = resident.resident_bytes(acts)
        hint = "lower --width or --batch-size, or pass --data-on-device never"
    else:
        parts["the shuffle buffer"] = buffer_bytes(acts.d, tcfg)
        hint = "lower --width, --batch-size or --shuffle-buffer"
    check_memory(parts, device, hint)
