"""CUDA graphs for the training step: one recorded launch instead of ~150 from Python.

On an H200 a TopK step's kernels took ~4 ms while the step took ~6 ms: the rest was Python
launching ~150 small kernels one after another (benchmarks/RESULTS.md). A CUDA graph
records the whole step once (forward, backward, Adam, the decoder constraint) and replays
it with one launch.

A graph needs fixed shapes and no host syncs. AuxK's number of dead latents changes from
step to step, so on the fast path AuxK reads a fixed number of columns, the dead ones first
(``fast.aux_columns``), and that number is rounded up to a coarse grid (``aux_bucket``):
each width on the grid gets its own graph. A width's first step runs eagerly (it compiles
the Triton kernels and creates Adam's state), its second is recorded and then replayed.
The one host sync left per step is the dead count that picks the graph.

The graphs of one stepper share a memory pool. That is safe because they never run at the
same time and the caller reads a step's outputs before the next step replays any graph.

Graph replay is an option of the fast op set (``FastOps.cuda_graphs``), which hands the
trainer a ``StepGraphs`` (``FastOps.step_graphs``); ISAE_CUDA_GRAPHS=0 in the environment
switches it off (isae.models.compute.select_ops).
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
from torch import Tensor

from isae.errors import UserError


def aux_bucket(n_dead: int, n: int) -> int:
    """The AuxK width for ``n_dead`` dead latents out of ``n``: 0 if none, else n_dead
    rounded up to a multiple of max(512, ~n_dead / 8), at most n. So a run sees few distinct
    widths (few graphs) and AuxK reads at most ~1/8 more columns than it needs."""
    if n_dead <= 0:
        return 0
    step = max(512, 1 << max(n_dead.bit_length() - 4, 0))
    return min(n, -(-n_dead // step) * step)


class StepGraphs:
    """Replays ``body(x, dead, width) -> dict of tensors`` as one CUDA graph per width.

    ``prepare`` runs before and after each recording: it drops gradients (the recording
    allocates its own) and makes cached tensors that the step reads current. ``reset`` forgets the graphs: needed whenever a
    tensor the step reads is replaced rather than updated in place (e.g. loading optimiser
    state).
    """

    def __init__(self, body: Callable[[Tensor, Tensor, int], dict],
                 prepare: Callable[[], None]) -> None:
        self.body = body
        self.prepare = prepare
        self.reset()

    def replay(self, x: Tensor, dead: Tensor, n_dead: int) -> dict:
        """The step on a batch with ``n_dead`` dead latents: AuxK reads ``aux_bucket`` columns
        (isae.models.compute.StepReplay)."""
        return self(x, dead, aux_bucket(n_dead, dead.numel()))

    def reset(self) -> None:
        self.graphs: dict[int, tuple] = {}
        self.seen: set[int] = set()
        self.pool = None
        self.stream = None

    def __call__(self, x: Tensor, dead: Tensor, width: int) -> dict:
        entry = self.graphs.get(width)
        if entry is None:
            if width not in self.seen:
                self.seen.add(width)
                return self._eager(x, dead, width)
            entry = self._record(x, dead, width)
        graph, sx, sd, out = entry
        sx.copy_(x)
        sd.copy_(dead)
        graph.replay()
        return out

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        # One side stream per stepper, for the eager first steps and the recordings alike
        # (torch's CUDA-graph notes ask for warm-up off the default stream).
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        return self.stream

    def _eager(self, x: Tensor, dead: Tensor, width: int) -> dict:
        side = self._side(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            out = self.body(x, dead, width)
        # Once per width: a sync keeps the caching allocator's stream bookkeeping simple.
        torch.cuda.synchronize(x.device)
        return out

    def _record(self, x: Tensor, dead: Tensor, width: int) -> tuple:
        sx, sd = x.clone(), dead.clone()
        torch.cuda.synchronize(x.device)
        self.prepare()
        graph = torch.cuda.CUDAGraph()
        # Python's cycle collector stays off inside a recording: an earlier stepper (a cycle
        # through its bound method here) freed mid-recording would destroy its graphs while
        # a stream records. The suspect of an intermittent failure (benchmarks/RESULTS.md),
        # not a proven cause. Collect now instead.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # "relaxed": a call that CUDA deems unsafe while recording but that touches no
            # stream (a library loading a kernel, say) does not void the recording. The
            # step itself has no host syncs (the GPU tests compare replays with eager steps).
            with torch.cuda.graph(graph, pool=self.pool, stream=self._side(x.device),
                                  capture_error_mode="relaxed"):
                out = self.body(sx, sd, width)
        except RuntimeError as e:  # torch's CUDA errors are RuntimeErrors
            raise UserError(
                f"recording the training step as a CUDA graph failed ({str(e).splitlines()[0]}); "
                "rerun with ISAE_CUDA_GRAPHS=0 to train without graphs (the run resumes from "
                "its last saved state)"
            ) from e
        finally:
            if collecting:
                gc.enable()
        self.pool = graph.pool()
        self.prepare()
        entry = self.graphs[width] = (graph, sx, sd, out)
        return entry
