"""Training rows held in device memory: loaded once, shuffled and gathered where they live.

Streaming from Parquet (stream.py) decodes every shard again each epoch and copies it to the
device; on an H200 that held a single seed's training to ~40 % of its step's speed
(benchmarks/RESULTS.md). When the training split fits on the device, it is read once, in
its stored dtype (a float16 set takes half the bytes of float32), and each batch is one
``index_select`` on the device followed by a conversion to float32.

The order, defined here once (tests/test_resident.py checks it against a plain NumPy
reference):

* the rows are the training rows of the set in shard order (sorted file names), each
  shard's rows in file order, held-out rows left out: row r of that sequence is row r of
  the device copy;
* epoch e (from 0) visits them in the order ``numpy.random.default_rng([seed, e])
  .permutation(rows)``, cut into ``rows // batch_size`` whole batches; the last
  ``rows % batch_size`` rows of that permutation sit the epoch out (other rows each epoch,
  since the permutations are independent), so every batch is full and a batch never mixes
  two epochs;
* step s is batch ``s % (rows // batch_size)`` of epoch ``s // (rows // batch_size)``, so a
  resumed run starts at its step directly, with no replay.

Permutations are drawn on the host with NumPy (a thread draws the next epoch's while this
one is served; NumPy releases the GIL), so the batches depend on the seed only, not on the
device or on timing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from isae.data.activations import ActivationSet
from isae.errors import UserError

log = logging.getLogger(__name__)

#: Threads decoding shards during the one-off load (Arrow and NumPy release the GIL).
LOAD_WORKERS = max(2, min(8, (os.cpu_count() or 2) // 2))
#: Stage decoded shards in pinned host memory on their way to a CUDA device (an
#: asynchronous copy). Off: on an H200 host, loading a 1.62 GB split took 2.82 s through
#: pinned staging and 0.93 s through pageable memory, one run each, pinned first
#: (benchmarks/RESULTS.md, fifth GPU session): pinning cost more than the asynchronous
#: copy saved.
PIN_MEMORY = False

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def training_rows(acts: ActivationSet) -> int:
    """Rows of the training split: ``train_rows`` from meta.json, else counted from the
    shards' ``heldout`` columns (sets written before the key existed)."""
    if "train_rows" in acts.meta:
        return int(acts.meta["train_rows"])
    held = sum(int(pq.read_table(s, columns=["heldout"]).column("heldout").to_numpy(
        zero_copy_only=False).astype(bool).sum()) for s in acts.shards)
    return acts.rows - held


def stored_itemsize(acts: ActivationSet) -> int:
    """Bytes per value of column x as stored (2 for float16 sets, 4 for float32)."""
    dtype = acts.meta.get("dtype")
    if dtype not in _TORCH_DTYPES:
        value_type = pq.read_schema(acts.shards[0]).field("x").type.value_type
        dtype = str(value_type.to_pandas_dtype().__name__)
    return 2 if dtype == "float16" else 4


def resident_bytes(acts: ActivationSet) -> int:
    """Device bytes the training split takes when held in its stored dtype."""
    return training_rows(acts) * acts.d * stored_itemsize(acts)


def load_training_rows(acts: ActivationSet, device: str | torch.device = "cpu",
                       workers: int | None = None) -> torch.Tensor:
    """The training split as one [rows, d] tensor on ``device``, in the stored dtype.

    Shards are decoded by ``workers`` threads, at most ``workers + 2`` ahead of the one
    being copied (host memory stays bounded by that window, not by the set), and copied
    into the preallocated tensor in shard order.
    """
    device = torch.device(device)
    workers = workers or LOAD_WORKERS
    n = training_rows(acts)
    pin = PIN_MEMORY and device.type == "cuda"
    t0 = time.perf_counter()

    def read(path) -> torch.Tensor:
        parts = [torch.from_numpy(p["x"])
                 for p in acts.iter_shards("train", shards=[path], native=True)]
        rows = parts[0] if len(parts) == 1 else (torch.cat(parts) if parts else None)
        if rows is None:
            return torch.empty(0, acts.d)
        return rows.pin_memory() if pin else rows

    out: torch.Tensor | None = None
    pos = 0
    pending: deque[Future] = deque()
    shards = iter(acts.shards)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isae-load") as pool:
        def top_up() -> None:
            while len(pending) < workers + 2:
                path = next(shards, None)
                if path is None:
                    return
                pending.append(pool.submit(read, path))

        top_up()
        while pending:
            rows = pending.popleft().result()
            top_up()
            if not len(rows):
                continue
            if out is None:
                out = _allocate(n, acts, rows.dtype, device)
            if pos + len(rows) > n:
                raise UserError(f"activation set {acts.path} holds more training rows than "
                                f"its meta.json's train_rows ({n})")
            out[pos : pos + len(rows)].copy_(rows, non_blocking=pin)
            pos += len(rows)
    if pos != n or out is None:
        raise UserError(f"activation set {acts.path} holds {pos} training rows, but its "
                        f"meta.json says train_rows = {n}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    log.info("training split on %s: %d rows x %d %s (%.2f GB) loaded in %.2f s", device, n,
             acts.d, str(out.dtype).removeprefix("torch."), out.numel() * out.element_size() / 1e9, dt)
    return out


def _allocate(n: int, acts: ActivationSet, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    try:
        return torch.empty(n, acts.d, dtype=dtype, device=device)
    except RuntimeError:  # torch.OutOfMemoryError on CUDA, a plain RuntimeError on the CPU
        gb = n * acts.d * torch.finfo(dtype).bits / 8 / 1e9
        raise UserError(f"the training split of {acts.path} ({gb:.2f} GB) does not fit in "
                        f"{device}'s memory; train with --data-on-device auto or never") from None


def epoch_permutation(seed: int, epoch: int, rows: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``rows`` resident rows."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def batches_per_epoch(rows: int, batch_size: int) -> int:
    if rows < batch_size:
        raise UserError(f"the training split has {rows} rows, fewer than one batch "
                        f"({batch_size}); lower --batch-size or stream the data")
    return rows // batch_size


def resident_batches(rows: torch.Tensor, batch_size: int, seed: int,
                     start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless float32 batches [batch_size, d] gathered from ``rows`` [R, d] (any float
    dtype, on any device), in the module's order, from step ``start_step`` on."""
    per_epoch = batches_per_epoch(len(rows), batch_size)
    epoch, b = divmod(start_step, per_epoch)
    pin = rows.is_cuda

    def draw(e: int) -> torch.Tensor:
        p = torch.from_numpy(epoch_permutation(seed, e, len(rows)))
        return p.pin_memory() if pin else p

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isae-perm")
    try:
        upcoming = pool.submit(draw, epoch)
        while True:
            perm = upcoming.result().to(rows.device, non_blocking=pin)
            upcoming = pool.submit(draw, epoch + 1)
            for i in range(b, per_epoch):
                yield rows.index_select(0, perm[i * batch_size : (i + 1) * batch_size]).float()
            epoch, b = epoch + 1, 0
    finally:  # a finished run does not wait for the next epoch's permutation
        pool.shutdown(wait=False, cancel_futures=True)
