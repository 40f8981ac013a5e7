"""Batches of training rows streamed from an activation set through a shuffle buffer.

Memory is bounded by the buffer plus the shards being read ahead (PREFETCH), whatever the
size of the set. The order is a pure function of the seed (permutations come from NumPy
generators on the host), so a resumed run replays the stream up to its step and continues
exactly where an uninterrupted run would be, and the CPU and GPU see the same rows in the
same order. The buffer lives on the training device; a set that fits in the buffer is read
from disk once.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from isae.data.activations import ActivationSet
from isae.errors import UserError

#: Shards decoded ahead of the one being consumed, each by its own thread (more on hosts
#: with many cores: one shard takes a core for ~0.1-0.3 s).
PREFETCH = max(2, min(4, (os.cpu_count() or 2) // 4))
#: Decode shards bound for a GPU into pinned host memory, so their copy to the device is an
#: asynchronous DMA (benchmarks/reader_bench.py --pin measures what it buys).
PIN_MEMORY = False


def _shard_sequence(rng: np.random.Generator, n: int) -> Iterator[tuple[int, bool]]:
    """Endless (shard, last of its epoch): each epoch a fresh permutation of the n shards."""
    while True:
        order = rng.permutation(n)
        for i, s in enumerate(order):
            yield int(s), i == n - 1


def shuffled_batches(
    acts: ActivationSet,
    batch_size: int,
    buffer_rows: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """Endless float32 batches [batch_size, d] of *training* rows, epoch after epoch.

    Each epoch visits the shards in a fresh random order; rows collect in a buffer that is
    shuffled whenever it fills (and at the end of every epoch), and batches are taken from
    it down to half its capacity, so rows from different shards mix.
    """
    # Two generators from the seed: shard orders, drawn ahead so reads run across epoch
    # boundaries, and the buffer's permutations, drawn as batches are made.
    order_seed, perm_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(perm_seed)
    cap = max(buffer_rows, 2 * batch_size)
    train_rows = int(acts.meta.get("train_rows", acts.rows))
    if train_rows == 0:
        raise UserError(f"activation set {acts.path} has no training rows (all held out, or none)")
    cache: dict[int, torch.Tensor] | None = {} if train_rows <= cap else None

    pin = PIN_MEMORY and torch.device(device).type == "cuda"

    def read(i: int) -> torch.Tensor:
        """Decode one shard's training rows on the host (runs in a prefetch thread), in the
        stored dtype: a float16 set crosses to the device at half the bytes; with
        PIN_MEMORY, in pinned memory."""
        parts = [torch.from_numpy(p["x"])
                 for p in acts.iter_shards("train", shards=[acts.shards[i]], native=True)]
        if len(parts) == 1:
            rows = parts[0]
        else:
            rows = torch.cat(parts) if parts else torch.empty(0, acts.d)
        return rows.pin_memory() if pin else rows

    # The buffer is one float32 tensor, filled in place: a shard is converted as it is
    # copied in, batches are gathered through the permutation as they are served, and only
    # the rows kept for the next round are moved to its front. Two copies of the shard's
    # rows per round, where concatenating and then permuting the whole buffer made four.
    buf = torch.empty(0, acts.d, device=device)
    n = 0  # rows in the buffer
    upcoming = _shard_sequence(np.random.default_rng(order_seed), len(acts.shards))
    queue: deque[tuple[int, bool, Future | None]] = deque()
    requested: set[int] = set()  # with a cache, each shard is read once
    # Threads decode the next PREFETCH shards of the sequence, this epoch's or the next's
    # (in parallel: Arrow and NumPy release the GIL), while the caller trains. Only file
    # reading moves there; every random draw stays on this thread, so the batches are the
    # same with or without them.
    with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="isae-shards") as pool:

        def top_up() -> None:
            while len(queue) < PREFETCH:
                s, last = next(upcoming)
                fut = None
                if cache is None or s not in requested:
                    fut = pool.submit(read, s)
                    requested.add(s)
                queue.append((s, last, fut))

        top_up()
        epoch_rows = 0  # an epoch without a training row would otherwise loop for ever
        while True:
            s, last, fut = queue.popleft()
            top_up()  # the next read starts before this one is waited for
            if fut is None:
                new = cache[s]
            else:
                new = fut.result().to(device, non_blocking=True)
                if cache is not None:
                    cache[s] = new
            if n + len(new) > len(buf):
                grown = torch.empty(max(n + len(new), cap + len(new)), acts.d, device=device)
                grown[:n] = buf[:n]
                buf = grown
            buf[n : n + len(new)] = new  # converts float16 to float32
            n += len(new)
            epoch_rows += len(new)
            if last:
                if epoch_rows == 0:
                    raise UserError(f"activation set {acts.path} has no training rows "
                                    "(every row is held out)")
                epoch_rows = 0
            if n >= cap or last:
                # index_select, not buf[perm]: on the CPU the latter's advanced indexing is
                # ~5x slower for the same rows.
                perm = torch.from_numpy(rng.permutation(n)).to(device)
                keep = 0 if last else cap // 2
                n_out = (n - keep) // batch_size
                for b in range(n_out):
                    yield buf.index_select(0, perm[b * batch_size : (b + 1) * batch_size])
                rest = buf.index_select(0, perm[n_out * batch_size :])
                n = len(rest)
                buf[:n] = rest
