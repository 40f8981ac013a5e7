"""Batches of training rows streamed from an activation set through a shuffle buffer.

Memory is bounded by the buffer plus one shard, whatever the size of the set. The order is a
pure function of the seed (permutations come from a NumPy generator on the host), so a
resumed run replays the stream up to its step and continues exactly where an uninterrupted
run would be, and the CPU and GPU see the same rows in the same order. The buffer lives on
the training device; a set that fits in the buffer is read from disk once.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .actset import ActivationSet


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

    def shard(i: int) -> torch.Tensor:
        if cache is not None and i in cache:
            return cache[i]
        parts = [torch.from_numpy(p["x"]) for p in acts.iter_shards("train", shards=[acts.shards[i]])]
        x = torch.cat(parts).to(device) if parts else torch.empty(0, acts.d, device=device)
        if cache is not None:
            cache[i] = x
        return x

    buf = torch.empty(0, acts.d, device=device)
    while True:
        order = rng.permutation(len(acts.shards))
        for i, s in enumerate(order):
            new = shard(int(s))
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
