"""Where a single seed's training loop loses time against its bare step (GPU host).

    PYTHONPATH=src python benchmarks/loop_bench.py [--data-on-device auto|always|never] [--set DIR] [--json FILE]
    PYTHONPATH=src python benchmarks/loop_bench.py --device cpu --d 64 --width 512 --k 8 --batch 256 --rows 40000 --tokens 100000

On a float16 set the script writes itself (default 1 081 344 rows, d 768; 2 % held out),
at width 24 576, k 32, batch 8 192, it takes the loop apart, one piece at a time:

- the step alone, called back to back on one batch;
- the one-off load of the training split onto the device (``data/resident.py``), with and
  without pinned staging, unless the batches are streamed;
- the batch source alone (device-resident gathers, or ``shuffled_batches`` from disk);
- ``train`` fed from batches already on the device (the loop's own bookkeeping, no reader);
- the same without the per-step host sync (AuxK width fixed at its first value; CUDA only);
- ``train`` from disk through ``--data-on-device`` (``never`` is the streaming path that
  ``train`` used before the device-resident one), its loop rate and its rate end to end
  (loading, graph recordings and the checkpoint included), and the time its thread waited
  on shard decodes;

each ``train`` with its peak device memory (reset per run), the new AuxK widths it met and
the host time their first steps and graph recordings took. Prints a table last; ``--json``
keeps the rows for benchmarks/session_table.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_set import Peak, Results, batches_from_memory, ensure_set, guarded, sync
from read_waits import ReadWaits

from isae.data import resident, stream
from isae.gpu import cuda_graphs as graphs
from isae.models.compute import select_ops
from isae.models.config import SAEConfig, TrainConfig
from isae.models.sparse_coder import SparseCoder
from isae.training import trainer
from isae.training.batches import training_batches

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--width", type=int, default=24576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=1_081_344, help="rows of the set (2 %% held out)")
    ap.add_argument("--tokens", type=int, default=8_000_000, help="tokens of each timed train")
    ap.add_argument("--buffer", type=int, default=131072, help="shuffle buffer of the stream")
    ap.add_argument("--data-on-device", default="auto", choices=["auto", "always", "never"])
    ap.add_argument("--set", default=None, help="activation set folder: reused if there, else written")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--label", default=None, help="names this run in the JSON (default: the mode)")
    ap.add_argument("--only", default=None, help="comma list of: step,load,source,memory,nosync,disk")
    ap.add_argument("--prefetch", type=int, default=None, help="reader threads (isae.data.stream.PREFETCH)")
    ap.add_argument("--pin", choices=["on", "off"], default=None, help="isae.data.stream.PIN_MEMORY")
    a = ap.parse_args()
    if a.prefetch:
        stream.PREFETCH = a.prefetch
    if a.pin:
        stream.PIN_MEMORY = a.pin == "on"
    torch.backends.cuda.matmul.allow_tf32 = False
    dev, D, N, K, B, mode = a.device, a.d, a.width, a.k, a.batch, a.data_on_device
    res = Results(a.json, {"script": "loop_bench", "label": a.label or mode, "mode": mode,
                           "device": torch.cuda.get_device_name() if dev == "cuda" else dev,
                           "shape": {"d": D, "width": N, "k": K, "batch": B, "rows": a.rows,
                                     "tokens": a.tokens}})
    tmp = Path(tempfile.mkdtemp())
    acts = ensure_set(Path(a.set) if a.set else tmp / "acts", a.rows, D, 4 * N, B, dev)
    cfg = SAEConfig.from_arch("topk", d_in=D, d_sae=N, k=K, seed=0)

    def tcfg(tokens: int = a.tokens, **kw) -> TrainConfig:
        return TrainConfig(tokens=tokens, batch_size=B, device=dev, shuffle_buffer=a.buffer,
                           checkpoint_every=10**9, log_every=50, data_on_device=mode, **kw)

    steps = a.tokens // B
    mem = torch.randn(16 * B, D, device=dev)
    # Warm-up: compile the kernels, record the first graphs, outside every timing.
    with batches_from_memory(mem, B):
        trainer.train(acts.path, cfg, tcfg(20 * B), tmp / "warm", resume=False)
    widths_note()

    def step_alone():
        model = SparseCoder(cfg, device=dev, ops=select_ops(dev))
        st = trainer.SAEStepper(model, tcfg())
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
        res.add("step", "topk step alone (one batch, back to back)", tok_s=reps * B / (time.perf_counter() - t0))

    def load():
        gb = resident.resident_bytes(acts) / 1e9
        rows = resident.training_rows(acts)
        default_pin = resident.PIN_MEMORY
        for pin in (True, False) if dev == "cuda" else (False,):
            resident.PIN_MEMORY = pin
            try:
                with Peak(dev) as p:
                    t0 = time.perf_counter()
                    x = resident.load_training_rows(acts, dev)
                    sync(dev)
                    dt = time.perf_counter() - t0
                del x
            finally:
                resident.PIN_MEMORY = default_pin
            res.add(f"load_{'pinned' if pin else 'pageable'}",
                    f"load the training split onto the {dev} ({'pinned' if pin else 'pageable'} "
                    f"staging, {resident.LOAD_WORKERS} threads)", wall_s=dt, peak_gb=p.gb,
                    note=f"{rows / dt / 1e6:.2f} M rows/s, {gb / dt:.2f} GB/s ({gb:.2f} GB)")

    def source_alone():
        t0 = time.perf_counter()
        it, src = training_batches(acts, tcfg(), dev)
        next(it)
        sync(dev)
        t1 = time.perf_counter()
        for _ in range(steps):
            next(it)
        sync(dev)
        rate = steps * B / (time.perf_counter() - t1)
        it.close()
        res.add("source", f"batch source alone ({src}; stream: PREFETCH {stream.PREFETCH}, pin "
                f"{stream.PIN_MEMORY})", tok_s=rate, note=f"first batch after {t1 - t0:.2f} s")

    def from_memory():
        with batches_from_memory(mem, B), Peak(dev) as p:
            s = trainer.train(acts.path, cfg, tcfg(), tmp / "mem", resume=False)
        res.add("memory", f"train, batches already on the {dev}", tok_s=s["tokens_per_s"],
                peak_gb=p.gb, note=widths_note())

    def no_sync():
        real_step = trainer.SAEStepper.step
        widths: dict[int, int] = {}

        def step(self, x, lr_scale, dead, n_dead=None):
            for g in self.opt.param_groups:
                g["lr"].fill_(self.base_lr * lr_scale)
            if id(self) not in widths:
                widths[id(self)] = graphs.aux_bucket(int(dead.sum()), self.model.cfg.d_sae)
            return self.graphs(x, dead, widths[id(self)])

        trainer.SAEStepper.step = step
        try:
            with batches_from_memory(mem, B), Peak(dev) as p:
                s = trainer.train(acts.path, cfg, tcfg(), tmp / "mem2", resume=False)
        finally:
            trainer.SAEStepper.step = real_step
        res.add("nosync", "train, batches on the GPU, no per-step host sync (one AuxK width)",
                tok_s=s["tokens_per_s"], peak_gb=p.gb, note=widths_note())

    def from_disk():
        widths_note()
        t0 = time.perf_counter()
        with ReadWaits() as waits, Peak(dev) as p:
            s = trainer.train(acts.path, cfg, tcfg(), tmp / "disk", resume=False)
        wall = time.perf_counter() - t0
        res.add("disk", f"train from disk, data on device: {mode} (batches from the {s['batches']})",
                tok_s=s["tokens_per_s"], peak_gb=p.gb, wall_s=wall, batches=s["batches"],
                end_to_end_tok_s=a.tokens // B * B / wall,
                note=f"end to end {a.tokens // B * B / wall / 1e6:.3g} M tok/s; waited {waits.seconds:.2f} s "
                     f"on reads; {widths_note()}")

    pieces = {"step": step_alone, "load": load, "source": source_alone, "memory": from_memory,
              "nosync": no_sync, "disk": from_disk}
    only = a.only.split(",") if a.only else list(pieces)
    if mode == "never":
        only = [p for p in only if p != "load"]
    if not select_ops(dev).cuda_graphs:  # elsewhere there is no per-step sync to remove
        only = [p for p in only if p != "nosync"]
    for name in only:
        guarded(res, name, name, pieces[name])
    print()
    print(res.table())


if __name__ == "__main__":
    main()
