"""Where the trainer's batches come from: the training split held on the device, or streamed.

``TrainConfig.data_on_device`` chooses: ``never`` streams through the shuffle buffer
(data/stream.py); ``always`` holds the split in the training device's memory
(data/resident.py), on the CPU too; ``auto`` holds it on a CUDA device when it fits in
``data_memory_fraction`` of the device's free memory and streams otherwise, so CPU runs
keep the streaming order (and their checkpoints) unchanged.

The two sources order the rows differently, so a resumed run keeps the source it started
with (the resume state records it).
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from isae.data import resident
from isae.data.activations import ActivationSet
from isae.data.stream import shuffled_batches
from isae.errors import UserError
from isae.models.config import TrainConfig

log = logging.getLogger(__name__)

#: The resolved sources, as recorded in summaries and resume states.
DEVICE, STREAM = "device", "stream"


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, in bytes (tests replace this)."""
    return torch.cuda.mem_get_info(device)[0]


def choose_source(tcfg: TrainConfig, device: str | torch.device, acts: ActivationSet,
                  saved: str | None = None) -> str:
    """DEVICE or STREAM for this run. ``saved``: the source a resume state recorded, which
    a resumed run must keep (``auto`` follows it; an explicit mode that contradicts it is
    an error)."""
    device = torch.device(device)
    mode = tcfg.data_on_device
    if saved is not None:
        if mode == "auto" or {mode, saved} in ({"always", DEVICE}, {"never", STREAM}):
            return saved
        raise UserError(
            f"the resume state was trained on batches from {'the device' if saved == DEVICE else 'the stream'}, "
            f"which --data-on-device {mode} rules out; rerun with --data-on-device auto, or delete "
            "the resume state to start afresh"
        )
    if mode == "never":
        return STREAM
    if mode == "always":
        return DEVICE
    if device.type != "cuda":
        return STREAM
    rows = resident.training_rows(acts)
    if rows < tcfg.batch_size:
        return STREAM
    need = rows * acts.d * resident.stored_itemsize(acts)
    budget = tcfg.data_memory_fraction * free_device_bytes(device)
    if need > budget:
        log.info("training split (%.2f GB) exceeds %.0f %% of %s's free memory (%.2f GB): streaming",
                 need / 1e9, 100 * tcfg.data_memory_fraction, device, budget / 1e9)
        return STREAM
    return DEVICE


def training_batches(acts: ActivationSet, tcfg: TrainConfig, device: str | torch.device,
                     start_step: int = 0, saved: str | None = None
                     ) -> tuple[Iterator[torch.Tensor], str]:
    """(endless float32 batches [batch_size, d] from step ``start_step`` on, the source).

    The device copy is loaded here, before the first batch is asked for, so a load that
    fails does so before training starts.
    """
    source = choose_source(tcfg, device, acts, saved)
    if source == DEVICE:
        resident.batches_per_epoch(resident.training_rows(acts), tcfg.batch_size)  # fail early
        rows = resident.load_training_rows(acts, device)
        return resident.resident_batches(rows, tcfg.batch_size, tcfg.seed, start_step), source
    batches = shuffled_batches(acts, tcfg.batch_size, tcfg.shuffle_buffer, tcfg.seed, device)
    for _ in range(start_step):  # replay the stream: same order as an uninterrupted run
        next(batches)
    return batches, source
