"""What one resume-state save costs: the state of M SAEs of width N on d inputs (weights,
Adam's two moments, the dead-latent counters; the layout `isae train` writes), saved with
isae.training.resume.save_state into a temporary folder, a few times. With the number of
saves a run makes (its steps / checkpoint_every, when checkpoint_seconds is 0) it says how
much of a run went to writing states.

    python benchmarks/resume_save_bench.py [--shapes 9x384x1536,9x384x12288] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from isae.training.resume import save_state


def state_of(M: int, d: int, N: int) -> dict:
    """A resume state shaped as M runs' (model, Adam, since_fired) of width N on d inputs."""
    shapes = [(d, N), (N, d), (N,), (d,)]
    runs = []
    for _ in range(M):
        model = dict(zip(("W_enc", "W_dec", "b_enc", "b_dec"), (torch.randn(*s) for s in shapes)))
        opt = {"state": {i: {"step": torch.tensor(200.0), "exp_avg": torch.randn(*s),
                             "exp_avg_sq": torch.rand(*s)} for i, s in enumerate(shapes)},
               "param_groups": [{"lr": 1e-3, "params": [0, 1, 2, 3]}]}
        runs.append({"stepper": {"model": model, "opt": opt},
                     "since_fired": torch.zeros(N, dtype=torch.long)})
    return {"runs": runs, "step": 200, "wall": 1.0}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="9x384x1536,9x384x12288", help="MxDxN,...")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: the system's temp)")
    p.add_argument("--out", default=None, help="JSON rows")
    a = p.parse_args(argv)
    rows = []
    for shape in a.shapes.split(","):
        M, d, N = (int(v) for v in shape.split("x"))
        state = state_of(M, d, N)
        with tempfile.TemporaryDirectory(dir=a.dir) as td:
            path = os.path.join(td, "state.safetensors")
            secs = []
            for _ in range(a.reps):
                t = time.perf_counter()
                save_state(path, state)
                secs.append(time.perf_counter() - t)
            size = os.path.getsize(path)
        rows.append({"M": M, "d": d, "N": N, "mb": size / 1e6, "s_min": min(secs),
                     "s_max": max(secs)})
    print("| SAEs | d | width | state MB | save s (min-max) |\n|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['M']} | {r['d']} | {r['N']} | {r['mb']:.0f} | "
              f"{r['s_min']:.3f}-{r['s_max']:.3f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
