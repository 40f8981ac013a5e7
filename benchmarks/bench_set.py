"""What the training benchmarks share: the synthetic float16 set they write themselves, peak
device memory per run, a batch source patched to serve batches already in memory, the
thresholding steps' top-k tally, and the JSON results file that benchmarks/session_table.py
reads."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from isae.data.activations import ActivationSet, ActivationWriter, heldout_mask
from isae.training import trainer


@contextlib.contextmanager
def hint_tally(device: str):
    """isae.gpu.kernel_trace.hint_tally (how often the thresholding steps' top-k took its
    bound's short way) on a GPU, with an isae that has it; else None."""
    if device != "cuda":
        yield None
        return
    from isae.gpu import kernel_trace

    if not hasattr(kernel_trace, "hint_tally"):  # an older src (kernels_ab.sh's baseline)
        yield None
        return
    with kernel_trace.hint_tally(device) as tally:
        yield tally


def ensure_set(path: Path, rows: int, d: int, atoms: int, batch: int, device: str) -> ActivationSet:
    """A float16 set of ``rows`` rows (2 % held out, by groups of 128 rows) of signed
    16-sparse combinations of a random dictionary, in 65 536-row shards; reused when
    ``path`` already holds one (benchmarks of one session share it)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        t0 = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(0)
        dic = torch.randn(atoms, d, device=device, generator=g)
        dic /= dic.norm(dim=1, keepdim=True)
        with ActivationWriter(path, d, dtype="float16", rows_per_shard=65536, source="bench") as w:
            for n in range(0, rows, batch):
                m = min(batch, rows - n)
                idx = torch.randint(0, atoms, (m, 16), device=device, generator=g)
                val = torch.randn(m, 16, device=device, generator=g)
                x = torch.einsum("bk,bkd->bd", val, dic[idx])
                x += 0.05 * torch.randn(m, d, device=device, generator=g)
                w.add(x.cpu().numpy(), heldout_mask(np.arange(n, n + m) // 128, 0.02))
        print(f"wrote {rows} rows x {d} float16 to {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return ActivationSet(path)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def per_step(fn, device: str | torch.device, warmup: int, reps: int) -> float:
    """Milliseconds per call of fn() called back to back, by the wall clock between two
    device syncs (launches and host syncs count, as in a training loop)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


class Peak:
    """Peak device memory of what runs inside (CUDA; None elsewhere), from a reset."""

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.gb: float | None = None

    def __enter__(self) -> Peak:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.gb = torch.cuda.max_memory_allocated() / 1e9


@contextlib.contextmanager
def batches_from_memory(mem: torch.Tensor, batch: int):
    """While active, the trainer's batches cycle through ``mem`` (already on the device, float32)
    instead of coming from the activation set: the loop's cost without any reader."""
    real = trainer.training_batches
    n = len(mem) // batch

    def from_memory(acts, tcfg, device, start_step=0, saved=None):
        def gen():
            i = start_step
            while True:
                yield mem[(i % n) * batch : (i % n + 1) * batch]
                i += 1
        return gen(), "memory"

    trainer.training_batches = from_memory
    try:
        yield
    finally:
        trainer.training_batches = real


class Results:
    """Rows of one benchmark run, printed as they come and kept in a JSON file (rewritten
    after every row, so a run cut short keeps what it measured)."""

    def __init__(self, path: str | None, meta: dict) -> None:
        self.path = Path(path) if path else None
        self.meta = meta
        self.rows: list[dict] = []

    def add(self, key: str, what: str, *, tok_s: float | None = None, peak_gb: float | None = None,
            wall_s: float | None = None, note: str = "", **extra) -> None:
        r = {"key": key, "what": what, "tok_s": tok_s, "peak_gb": peak_gb, "wall_s": wall_s,
             "note": note, **extra}
        self.rows.append(r)
        parts = [f"{tok_s / 1e6:.3g} M tok/s" if tok_s is not None else "",
                 f"{wall_s:.2f} s" if wall_s is not None else "",
                 f"peak {peak_gb:.2f} GB" if peak_gb is not None else "", note]
        print(f"  {what}: " + "; ".join(p for p in parts if p), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1))

    def table(self) -> str:
        lines = ["| what | M tok/s | s | peak GB | note |", "|---|---|---|---|---|"]
        for r in self.rows:
            rate = "" if r["tok_s"] is None else f"{r['tok_s'] / 1e6:.3g}"
            wall = "" if r["wall_s"] is None else f"{r['wall_s']:.2f}"
            peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
            lines.append(f"| {r['what']} | {rate} | {wall} | {peak} | {r['note']} |")
        return "\n".join(lines)


def sections(record: Callable[[str, BaseException], None]):
    """A ``@section(name)`` decorator for a benchmark script's sections: each prints its name,
    runs, and on an exception prints the traceback and records it with ``record(name, e)``
    (the script's own FAILED row), so that one broken section does not hide the others."""
    def section(name: str):
        def wrap(fn):
            @functools.wraps(fn)
            def run(*a, **kw):
                print(f"== {name}", flush=True)
                try:
                    return fn(*a, **kw)
                except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
                    traceback.print_exc()
                    record(name, e)
            return run
        return wrap
    return section


def guarded(results: Results, key: str, what: str, fn) -> None:
    """Run one measurement; a failure is printed and recorded, and the next one runs."""
    print(f"== {what}", flush=True)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one broken measurement must not hide the others
        traceback.print_exc()
        results.add(key, what, note=f"FAILED: {type(e).__name__}: {e}"[:300])
