"""Where a single seed's training loop loses time against its bare step (GPU host).

    PYTHONPATH=src python benchmarks/loop_bench.py [--rows 524288] [--tokens 6000000]
    PYTHONPATH=src python benchmarks/loop_bench.py --device cpu --width 3072 --rows 131072 --tokens 400000

The `topk` step alone runs at ~3.2 M tok/s on an H200, but `train` on an on-disk set ran at
~1.2 M tok/s (benchmarks/RESULTS.md, fourth session). This script takes the loop apart, one
piece at a time, on the same float16 set (d 768, width 24 576, k 32, batch 8 192):

- the step alone, called back to back on one batch;
- the reader alone (``shuffled_batches`` onto the GPU, nothing else);
- ``train`` fed from batches already on the GPU (the loop's own bookkeeping, no reader);
- the same without the per-step host sync (AuxK width fixed at its first value; CUDA only);
- ``train`` from disk, with the time its thread spent waiting on shard decodes;

and, for each run of ``train``, how many new AuxK widths it met and the host time their
first steps and graph recordings took (a suspect for short runs: dead latents come and go,
and each new width costs an eager step and a recording).

Prints a table last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from read_waits import ReadWaits

from isae.data import stream
from isae.data.activations import ActivationSet, ActivationWriter, heldout_mask
from isae.gpu import cuda_graphs as graphs
from isae.models.config import SAEConfig, TrainConfig
from isae.training import trainer

D, K, B = 768, 32, 8192
ROWS: list[tuple[str, float, str]] = []


def report(what: str, tok_per_s: float, note: str = "") -> None:
    ROWS.append((what, tok_per_s, note))
    print(f"  {what}: {tok_per_s / 1e6:.3g} M tok/s {note}", flush=True)


def write_set(path: Path, rows: int, atoms: int, device: str) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    dic = torch.randn(atoms, D, device=device, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    with ActivationWriter(path, D, dtype="float16", rows_per_shard=65536, source="bench") as w:
        for n in range(0, rows, B):
            idx = torch.randint(0, atoms, (B, 16), device=device, generator=g)
            val = torch.randn(B, 16, device=device, generator=g)
            x = torch.einsum("bk,bkd->bd", val, dic[idx]) + 0.05 * torch.randn(B, D, device=device, generator=g)
            w.add(x.cpu().numpy(), heldout_mask(np.arange(n, n + B) // 128, 0.02))


#: Host time the graphs spend on new AuxK widths: each new width's eager first step and
#: its recording (synchronising, collecting garbage, capturing, instantiating). A short
#: run that sees many widths pays this often; a long one amortises it.
NEW_WIDTHS = {"n": 0, "s": 0.0}


def _timed(fn):
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            NEW_WIDTHS["n"] += 1
            NEW_WIDTHS["s"] += time.perf_counter() - t
    return wrapper


graphs.StepGraphs._eager = _timed(graphs.StepGraphs._eager)
graphs.StepGraphs._record = _timed(graphs.StepGraphs._record)


def widths_note() -> str:
    note = f"{NEW_WIDTHS['n']} first steps/recordings of new AuxK widths, {NEW_WIDTHS['s']:.2f} s"
    NEW_WIDTHS.update(n=0, s=0.0)
    return note


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=24576)
    ap.add_argument("--rows", type=int, default=524288)
    ap.add_argument("--tokens", type=int, default=6_000_000)
    ap.add_argument("--buffer", type=int, default=131072)
    ap.add_argument("--prefetch", type=int, default=None)
    ap.add_argument("--pin", choices=["on", "off"], default=None)
    a = ap.parse_args()
    if a.prefetch:
        stream.PREFETCH = a.prefetch
    if a.pin:
        stream.PIN_MEMORY = a.pin == "on"
    torch.backends.cuda.matmul.allow_tf32 = False
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    dev, N = a.device, a.width
    write_set(tmp / "acts", a.rows, 4 * N, dev)
    print(f"wrote {a.rows} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    acts = ActivationSet(tmp / "acts")
    cfg = SAEConfig.from_arch("topk", d_in=D, d_sae=N, k=K, seed=0)
    tcfg = TrainConfig(tokens=a.tokens, batch_size=B, device=dev, shuffle_buffer=a.buffer,
                       checkpoint_every=10**9, log_every=50)
    steps = a.tokens // B
    # Warm-up: compile the kernels, record the graphs.
    warm = TrainConfig(tokens=20 * B, batch_size=B, device=dev, shuffle_buffer=a.buffer,
                       checkpoint_every=10**9, log_every=50)
    trainer.train(tmp / "acts", cfg, warm, tmp / "warm", resume=False)

    # 1. the step alone
    from isae.models.compute import select_ops
    from isae.models.sparse_coder import SparseCoder

    model = SparseCoder(cfg, device=dev, ops=select_ops(dev))
    st = trainer.SAEStepper(model, tcfg)
    x = torch.randn(B, D, device=dev)
    dead = torch.zeros(N, dtype=torch.bool, device=dev)
    reps = 200 if dev == "cuda" else 10
    for _ in range(5):
        st.step(x, 1.0, dead)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        st.step(x, 1.0, dead)
    sync(dev)
    report("step alone (one batch, back to back)", reps * B / (time.perf_counter() - t0))

    # 2. the reader alone
    it = stream.shuffled_batches(acts, B, a.buffer, 0, dev)
    next(it)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    sync(dev)
    report(f"reader alone onto the {dev} (PREFETCH {stream.PREFETCH}, pin {stream.PIN_MEMORY})",
           steps * B / (time.perf_counter() - t0))
    del it

    # 3. the loop from batches already on the GPU
    mem = torch.randn(16 * B, D, device=dev)

    def from_memory(acts, batch_size, buffer_rows, seed, device):
        i = 0
        while True:
            yield mem[i * batch_size : (i + 1) * batch_size]
            i = (i + 1) % 16

    real_batches = trainer.shuffled_batches
    trainer.shuffled_batches = from_memory
    widths_note()
    s = trainer.train(tmp / "acts", cfg, tcfg, tmp / "mem", resume=False)
    report(f"train, batches already on the {dev}", s["tokens_per_s"], widths_note())

    # 4. the same without the per-step host sync (the AuxK width read once)
    real_step = trainer.SAEStepper.step
    widths: dict[int, int] = {}

    def no_sync(self, x, lr_scale, dead):
        for g in self.opt.param_groups:
            g["lr"].fill_(self.base_lr * lr_scale)
        if id(self) not in widths:
            widths[id(self)] = graphs.aux_bucket(int(dead.sum()), self.model.cfg.d_sae)
        return self.graphs(x, dead, widths[id(self)])

    if st.graphs is not None:  # elsewhere there is no per-step sync to remove
        trainer.SAEStepper.step = no_sync
        s = trainer.train(tmp / "acts", cfg, tcfg, tmp / "mem2", resume=False)
        report("train, batches on the GPU, no per-step host sync (one AuxK width)", s["tokens_per_s"],
               widths_note())
        trainer.SAEStepper.step = real_step
    trainer.shuffled_batches = real_batches

    # 5. from disk, timing the waits on shard decodes
    widths_note()
    t0 = time.perf_counter()
    with ReadWaits() as waits:
        s = trainer.train(tmp / "acts", cfg, tcfg, tmp / "disk", resume=False)
    wall = time.perf_counter() - t0
    report("train from disk", s["tokens_per_s"],
           f"waited {waits.seconds:.2f} s of {wall:.2f} s on shard decodes; {widths_note()}")

    print("\n| piece | M tok/s | note |\n|---|---|---|")
    for what, rate, note in ROWS:
        print(f"| {what} | {rate / 1e6:.3g} | {note} |")


if __name__ == "__main__":
    main()
