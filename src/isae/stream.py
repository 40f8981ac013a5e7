"""Batches of training rows streamed from an activation set through a shuffle buffer.

Memory is bounded by the buffer plus one shard, whatever the size of the set. The order is a
pure function of the seed, so a resumed run replays the stream up to its step and continues
exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .actset import ActivationSet


def shuffled_batches(
    acts: ActivationSet, batch_size: int, buffer_rows: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless float32 batches [batch_size, d] of *training* rows, epoch after epoch.

    Each epoch visits the shards in a fresh random order; rows collect in a buffer that is
    shuffled whenever it fills (and at the end of every epoch), and batches are taken from
    it down to half its capacity, so rows from different shards mix.
    """
    rng = np.random.default_rng(seed)
    cap = max(buffer_rows, 2 * batch_size)
    buf = np.empty((0, acts.d), np.float32)
    while True:
        order = rng.permutation(len(acts.shards))
        for i, s in enumerate(order):
            for part in acts.iter_shards("train", shards=[acts.shards[s]]):
                buf = np.concatenate([buf, part["x"]]) if len(buf) else part["x"]
            last = i == len(order) - 1
            if len(buf) >= cap or last:
                buf = buf[rng.permutation(len(buf))]
                keep = 0 if last else cap // 2
                n_out = (len(buf) - keep) // batch_size
                for b in range(n_out):
                    yield buf[b * batch_size : (b + 1) * batch_size]
                buf = buf[n_out * batch_size :]
