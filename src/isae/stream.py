"""Batches of training rows streamed from an activation set through a shuffle buffer.

Memory is bounded by the buffer plus one shard, whatever the size of the set. The order is a
pure function of the seed (permutations come from a NumPy generator on the host), so a
resumed run replays the stream up to its step and continues exactly where an uninterrupted
run would be, and the CPU and GPU see the same rows in the same order. The buffer lives on
the training device; a set that fits in the buffer is read from disk once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from .actset import ActivationSet

#: Shards decoded ahead of the one being consumed, each by its own thread (more on hosts
#: with many cores: one shard takes a core for ~0.1-0.3 s).
PREFETCH = max(2, min(4, (os.cpu_count() or 2) // 4))


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
    rng = np.random.default_rng(seed)
    cap = max(buffer_rows, 2 * batch_size)
    train_rows = int(acts.meta.get("train_rows", acts.rows))
    cache: dict[int, torch.Tensor] | None = {} if train_rows <= cap else None

    def read(i: int) -> torch.Tensor:
        """Decode one shard's training rows on the host (runs in a prefetch thread), in the
        stored dtype: a float16 set crosses to the device at half the bytes."""
        parts = [torch.from_numpy(p["x"])
                 for p in acts.iter_shards("train", shards=[acts.shards[i]], native=True)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, acts.d)

    buf = torch.empty(0, acts.d, device=device)
    # Threads decode the next shards (in parallel: Arrow and NumPy release the GIL) while
    # the caller trains on this one. Only file reading moves there; every random draw stays
    # on this thread, in the same order, so the batches are the same with or without them.
    with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="isae-shards") as pool:
        while True:
            order = [int(s) for s in rng.permutation(len(acts.shards))]
            todo = [s for s in order if cache is None or s not in cache]
            pending = {s: pool.submit(read, s) for s in todo[:PREFETCH]}
            nxt = PREFETCH
            for i, s in enumerate(order):
                if cache is not None and s in cache:
                    new = cache[s]
                else:
                    new = pending.pop(s).result().to(device).float()
                    if nxt < len(todo):
                        pending[todo[nxt]] = pool.submit(read, todo[nxt])
                        nxt += 1
                    if cache is not None:
                        cache[s] = new
                buf = torch.cat([buf, new]) if len(buf) else new
                last = i == len(order) - 1
                if len(buf) >= cap or last:
                    perm = torch.from_numpy(rng.permutation(len(buf))).to(device)
                    buf = buf[perm]
                    keep = 0 if last else cap // 2
                    n_out = (len(buf) - keep) // batch_size
                    for b in range(n_out):
                        yield buf[b * batch_size : (b + 1) * batch_size]
                    buf = buf[n_out * batch_size :]
