"""How long the training loop waits on shard reads (CPU or GPU host).

    PYTHONPATH=src python benchmarks/reader_bench.py [--device cuda] [--epochs 5] [--step-ms 3.5]

Writes a float16 activation set of 4 shards x 65 536 rows x d 768 to a temporary folder,
streams 8 192-row batches through a 65 536-row shuffle buffer (the seeds benchmark's
shapes: the buffer holds one shard, so every epoch is read from disk again), sleeps
--step-ms per batch in place of a training step, and reports rows per second and the time
spent waiting for shard decodes (``Future.result``). Prints a table last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from read_waits import ReadWaits

from isae.data import stream
from isae.data.activations import ActivationSet, ActivationWriter, heldout_mask

D, SHARD, SHARDS, BATCH, BUFFER = 768, 65536, 4, 8192, 65536


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=3.5)
    ap.add_argument("--prefetch", type=int, default=None, help="reader threads (isae.data.stream.PREFETCH)")
    ap.add_argument("--pin", choices=["on", "off"], default=None,
                    help="decode into pinned memory (default: isae.data.stream.PIN_MEMORY)")
    a = ap.parse_args()
    if a.prefetch:
        stream.PREFETCH = a.prefetch
    if a.pin:
        stream.PIN_MEMORY = a.pin == "on"
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    with ActivationWriter(tmp / "acts", D, dtype="float16", rows_per_shard=SHARD, source="bench") as w:
        for n in range(0, SHARD * SHARDS, BATCH):
            w.add(rng.standard_normal((BATCH, D), dtype=np.float32),
                  heldout_mask(np.arange(n, n + BATCH) // 128, 0.02))
    acts = ActivationSet(tmp / "acts")
    rows = []
    for seed in range(2):
        it = stream.shuffled_batches(acts, BATCH, BUFFER, seed, a.device)
        next(it)
        steps = a.epochs * acts.meta.get("train_rows", acts.rows) // BATCH
        t0 = time.perf_counter()
        with ReadWaits() as waits:
            for _ in range(steps):
                next(it)
                time.sleep(a.step_ms / 1e3)
        if a.device != "cpu":
            import torch

            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append((seed, steps * BATCH / dt / 1e6, dt, waits.seconds))
    print("\n| run | M rows/s | seconds | waiting on reads (s) |\n|---|---|---|---|")
    for seed, rate, dt, w in rows:
        pin = ", pinned" if stream.PIN_MEMORY and a.device != "cpu" else ""
        print(f"| seed {seed}, PREFETCH {stream.PREFETCH}, {a.device}{pin}, {a.step_ms} ms steps "
              f"| {rate:.3f} | {dt:.2f} | {w:.2f} |")


if __name__ == "__main__":
    main()
