"""Which code a step ran: each call of a kernel wrapper of kernels.py, with the Triton
kernels (or the cuSPARSE product) it launched.

Every wrapper computes its result with stock torch ops where its kernel cannot run (a CPU
tensor outside Triton's interpreter, an unexpected dtype or layout, k above MAX_K): the
same numbers, much slower, and silent. ``trace`` records the calls and launches inside a
block, so a test can assert that a configuration runs on the fast path (``fallbacks()`` is
empty) and a benchmark can print which kernels each switch combination launched.

    with kernel_trace.trace() as t:
        stepper.step(x, 1.0, dead)
    assert not t.fallbacks(), t.fallbacks()
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from isae.gpu import kernels

#: The wrappers of kernels.py, each backed by one or more Triton kernels.
WRAPPERS = ("topk_rows", "topk_rows_hinted", "topk_mask_rows", "gather_decode", "gather_dot",
            "project_rows_", "normalize_rows_", "fvu_parts", "scale", "sub_cast", "keep_where",
            "adam_rows_", "iht_eta", "iht_update")
#: Segments' products (cuSPARSE, not Triton): their launch is the CSR product.
SEGMENT_METHODS = ("reduce", "reduce_into")
#: What a Segments product launches (recorded as a kernel name).
CSR = "cusparse_spmm"


@dataclass
class Trace:
    """The wrapper calls of a traced block, in order: (wrapper, kernels it launched)."""

    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def fallbacks(self) -> list[str]:
        """The wrappers that launched no kernel: they computed with stock torch ops."""
        return [name for name, launched in self.calls if not launched]

    def kernels(self) -> Counter:
        """Launches per kernel name."""
        return Counter(k for _, launched in self.calls for k in launched)


class _Launcher:
    """Stands in for a Triton kernel object: ``kernel[grid](...)`` is recorded, then run."""

    def __init__(self, name: str, real, stack: list) -> None:
        self.name, self.real, self.stack = name, real, stack

    def __getitem__(self, grid):
        launch = self.real[grid]

        def run(*args, **kwargs):
            if self.stack:
                self.stack[-1].append(self.name)
            return launch(*args, **kwargs)
        return run


@contextlib.contextmanager
def trace() -> Iterator[Trace]:
    """Record the kernel wrappers' calls inside the block (kernels.py's module attributes
    are swapped for recording ones, and put back after)."""
    t = Trace()
    stack: list[list[str]] = []
    saved: list[tuple[object, str, object]] = []

    def wrap(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def recorded(*args, **kwargs):
            stack.append([])
            try:
                return real(*args, **kwargs)
            finally:
                t.calls.append((label, tuple(stack.pop())))
        saved.append((owner, name, real))
        setattr(owner, name, recorded)

    try:
        for name in WRAPPERS:
            wrap(kernels, name, name)
        for name in SEGMENT_METHODS:
            wrap(kernels.Segments, name, f"Segments.{name}")
        real_csr = kernels.Segments._csr

        def csr(self, *args, **kwargs):
            if stack:
                stack[-1].append(CSR)
            return real_csr(self, *args, **kwargs)
        saved.append((kernels.Segments, "_csr", real_csr))
        kernels.Segments._csr = csr
        if kernels.AVAILABLE:
            for name in dir(kernels):
                obj = getattr(kernels, name)
                if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "__getitem__"):
                    saved.append((kernels, name, obj))
                    setattr(kernels, name, _Launcher(name, obj, stack))
        yield t
    finally:
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)


@contextlib.contextmanager
def hint_tally(device: torch.device | str) -> Iterator[torch.Tensor]:
    """An int64 [2] tensor on ``device`` that counts, for the thresholding steps' top-k
    inside the block (kernels.topk_rows_hinted), the rows selected and those where the
    previous support's bound did not serve (more than HINT_CAP x k columns reached it), so a
    benchmark can say how often the short way ran in real training. The counts grow on the
    device, also inside replayed CUDA graphs; read them after the block. Nothing is counted
    while the hint is off (kernels.HINT_CAP 0, the default)."""
    tally = torch.zeros(2, dtype=torch.int64, device=device)
    real = kernels.topk_rows_hinted

    @functools.wraps(real)
    def counted(pre, k, signed, hint, _tally=None):
        return real(pre, k, signed, hint, tally)
    kernels.topk_rows_hinted = counted
    try:
        yield tally
    finally:
        kernels.topk_rows_hinted = real
