"""The IHT row kernels (kernels.iht_eta, iht_update_kept, iht_grad) timed over their warps
per row, at the study's shapes, on one GPU, and on rows too wide for the row kernels
(their chunked forms; iht_grad's stock-op form, which no training step calls there: the op
sets take the unfused step on such rows). A table last.

A thresholding step runs the first two forward (both archs with steps) and the third
backward (the differentiated ``isae-iter``); ``kernels._iht_warps`` picks the forward
kernels' warps from the row's [K, D] tile, ``kernels._iht_grad_warps`` the backward's. Each setting is checked against the default's results
before it is timed.

    python benchmarks/iht_rows_bench.py --out iht_rows.json

``--device cpu`` with ``TRITON_INTERPRET=1`` runs it at toy sizes in Triton's interpreter
(tests/test_iht_rows_bench.py): a check of the script, not a timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_set import per_step  # noqa: E402

from isae.gpu import kernels  # noqa: E402

ROWS: list[dict] = []


def inputs(B: int, N: int, D: int, K: int, dev: str) -> dict:
    """A step's inputs: unit-norm bfloat16 table, supports, values, their decode."""
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(N, D, device=dev, generator=g)
    W = (W / W.norm(dim=1, keepdim=True)).bfloat16()
    idx = torch.stack([torch.randperm(N, device=dev, generator=g)[:K] for _ in range(B)])
    new = torch.cat([idx[:, : K // 2], torch.randint(0, N, (B, K - K // 2), device=dev,
                                                     generator=g)], 1)
    val = torch.rand(B, K, device=dev, generator=g)
    x = torch.randn(B, D, device=dev, generator=g)
    return dict(x=x, xh=kernels.gather_decode(val, idx, W), val=val, idx=idx, new=new, W=W,
                gv=torch.randn(B, K, device=dev, generator=g),
                gx=torch.randn(B, D, device=dev, generator=g))


def calls(a: dict) -> dict:
    """The three kernels' calls on one step's inputs (the step size from the first)."""
    step, _ = kernels.iht_eta(a["x"], a["xh"], a["idx"], a["W"], 1.0)
    kept = kernels.iht_update_kept(a["x"], a["xh"], a["val"], a["idx"], a["new"], step, a["W"],
                                   None, False)[3]
    return {
        "iht_eta": lambda: kernels.iht_eta(a["x"], a["xh"], a["idx"], a["W"], 1.0),
        "iht_update_kept": lambda: kernels.iht_update_kept(a["x"], a["xh"], a["val"], a["idx"],
                                                           a["new"], step, a["W"], None, False),
        "iht_grad": lambda: kernels.iht_grad(a["x"], a["xh"], a["val"], a["idx"], a["new"], step,
                                             kept, a["W"], 1.0, False, a["gv"], a["gx"]),
    }


def close(got, want) -> bool:
    """Equal to float rounding: another warp count sums in another order, and a bfloat16
    result (iht_eta's scaled residual) may then round one unit (2^-8) the other way."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return all(torch.allclose(u.float(), v.float(), rtol=2.0**-7 if v.dtype == torch.bfloat16 else 1e-3,
                              atol=1e-3 * (1 + float(v.float().abs().max())))
               for u, v in zip(got, want))


def warps_part(shapes, warps, B: int, reps: int, dev: str) -> None:
    real = kernels._iht_warps, kernels._iht_grad_warps
    for N, D, K in shapes:
        a = inputs(B, N, D, K, dev)
        fns = calls(a)
        want = {name: fn() for name, fn in fns.items()}
        for w in warps:
            kernels._iht_warps = kernels._iht_grad_warps = lambda D, K, w=w: w
            try:
                for name, fn in fns.items():
                    ok = close(fn(), want[name])
                    ms = per_step(fn, dev, 1, reps)
                    ROWS.append(dict(part="warps", kernel=name, N=N, D=D, K=K, rows=B, warps=w,
                                     row_kernel=kernels.iht_row_fits(D, K), ms=ms, same=ok))
                    print(ROWS[-1], flush=True)
            finally:
                kernels._iht_warps, kernels._iht_grad_warps = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", default="1536x384x16,12288x384x16,24576x768x32",
                    help="N x D x K, comma separated")
    ap.add_argument("--warps", default="1,2,4,8")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    warps = [int(w) for w in args.warps.split(",")]
    dev = args.device
    if dev == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    warps_part(shapes, warps, args.batch, args.reps, dev)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(ROWS, f, indent=1)
    print("\n| kernel | N | D | K | row kernel | warps | ms | same results |")
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for r in ROWS:
        print(f"| {r['kernel']} | {r['N']} | {r['D']} | {r['K']} | {r['row_kernel']} | "
              f"{r['warps']} | {r['ms']:.4f} | {r['same']} |")


if __name__ == "__main__":
    main()
