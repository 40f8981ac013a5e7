"""The thresholding steps' top-k with and without the previous support's bound, on one GPU.

``kernels.topk_rows_hinted`` finds an IHT step's top-k from the bound that the support the
step starts from gives (one pass over the row collects the columns that reach it); the
unhinted ``kernels.topk_rows`` finds a bound from the maxima of 64-column groups first. Part
1 times both on bfloat16 scores moved a little, some and much from those that chose the
hint, over the hinted kernel's settings (candidate cap, chunk, warps), and says how many
rows the hint served. Part 2 times whole training steps of the archs with thresholding
steps, unhinted (HINT_CAP 0) and with the fastest setting of part 1, each step recorded
anew. A table last.

    python benchmarks/hint_bench.py --out hint.json

``--device cpu`` with ``TRITON_INTERPRET=1`` runs it at toy sizes in Triton's interpreter
(tests/test_hint_bench.py): a check of the script, not a timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from isae.gpu import kernels  # noqa: E402
from isae.models.compute import select_ops  # noqa: E402
from isae.models.config import SAEConfig, TrainConfig  # noqa: E402
from isae.models.sparse_coder import SparseCoder  # noqa: E402
from isae.training.trainer import SAEStepper  # noqa: E402

ROWS: list[dict] = []
DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def ms_per_call(fn, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / reps


def settings(s: tuple[int, int, int] | None) -> None:
    kernels.HINT_CAP, kernels.HINT_CHUNK, kernels.HINT_WARPS = s if s else (0, 512, 2)


def select_part(a) -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)
    grid = list(itertools.product((16,), (256, 512, 2048), (1, 2, 4)))  # a compile each
    total = {s: 0.0 for s in grid}
    for n in (a.width, a.wide):
        pre = torch.randn(a.batch, n, device=DEV, generator=g).bfloat16()
        prev = kernels.topk_rows(pre, a.k, True)[1]
        for noise in (0.05, 0.3, 1.0):
            moved = (pre.float() + noise * torch.randn(pre.shape, device=DEV, generator=g)
                     ).bfloat16()
            base = ms_per_call(lambda moved=moved: kernels.topk_rows(moved, a.k, True), a.reps)
            ROWS.append(dict(part="select", n=n, noise=noise, setting="topk_rows", ms=base))
            for s in grid:
                settings(s)
                tally = torch.zeros(2, dtype=torch.int64, device=DEV)
                kernels.topk_rows_hinted(moved, a.k, True, prev, tally)
                served = 1 - int(tally[1]) / int(tally[0])
                ms = ms_per_call(lambda moved=moved, prev=prev: kernels.topk_rows_hinted(
                    moved, a.k, True, prev), a.reps)
                total[s] += ms / base
                ROWS.append(dict(part="select", n=n, noise=noise, setting=str(s), ms=ms,
                                 served=served, vs_unhinted=ms / base))
            print(f"n {n} noise {noise}: topk_rows {base:.3f} ms; best hinted "
                  f"{min(r['ms'] for r in ROWS[-len(grid):]):.3f} ms", flush=True)
    best = min(total, key=total.get)
    print(f"fastest setting over the six cases (cap, chunk, warps): {best}", flush=True)
    return best


def steps_part(a, best) -> None:
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(a.batch, a.d, device=DEV, generator=g)
    for width in (a.width, a.wide):
        dead = torch.rand(width, device=DEV, generator=g) < 0.05
        for arch in a.archs.split(","):
            for s in (None, best):
                settings(s)
                m = SparseCoder(SAEConfig.from_arch(arch, d_in=a.d, d_sae=width, k=a.k, seed=0),
                                device=DEV, ops=select_ops(DEV))
                st = SAEStepper(m, TrainConfig(lr=2e-4))
                for _ in range(3):  # eager, recorded, replayed
                    st.step(x, 1.0, dead)
                ms = ms_per_call(lambda st=st, dead=dead: st.step(x, 1.0, dead), a.step_reps)
                ROWS.append(dict(part="steps", arch=arch, width=width,
                                 setting="unhinted" if s is None else str(s), ms=ms))
                print(f"{arch} at {width}, {'unhinted' if s is None else s}: {ms:.3f} ms",
                      flush=True)
                del m, st
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    settings(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--wide", type=int, default=12288)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--step-reps", type=int, default=30)
    ap.add_argument("--archs", default="topk,isae-iter,isae-iter+sg,topk+iter")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(name, torch.__version__, flush=True)
    default = (kernels.HINT_CAP, kernels.HINT_CHUNK, kernels.HINT_WARPS)
    best = select_part(a)
    steps_part(a, best)
    if a.out:
        Path(a.out).write_text(json.dumps({"script": "hint_bench", "device": name,
                                           "default": default, "best": best, "rows": ROWS},
                                          indent=1))
    print("\n| part | case | setting | ms | served | vs unhinted |\n|---|---|---|---:|---:|---:|")
    for r in ROWS:
        if r["part"] == "select" and r["setting"] not in ("topk_rows", str(best), str(default)):
            continue
        case = (f"[{a.batch}, {r['n']}] noise {r['noise']}" if r["part"] == "select"
                else f"{r['arch']} step at width {r['width']}")
        served = f"{100 * r['served']:.0f} %" if "served" in r else ""
        vs = f"{r['vs_unhinted']:.2f}" if "vs_unhinted" in r else ""
        print(f"| {r['part']} | {case} | {r['setting']} | {r['ms']:.3f} | {served} | {vs} |")


if __name__ == "__main__":
    main()
