"""Dictionary matching at width: the certified sparse matcher against scipy's dense Hungarian
solver, on the same matrices, in one command.

    # the 2-core CPU target (8 192 x 8 192, isae match end to end against scipy's assignment);
    # MATCH_BENCH_THREADS sets torch's threads in every measurement (isae --threads)
    MATCH_BENCH_THREADS=1 PYTHONPATH=src python benchmarks/match_bench.py --device cpu \
        --sizes 2048,8192 --cli
    # the GPU target (24 576 x 24 576 on one H100 / H200)
    PYTHONPATH=src python benchmarks/match_bench.py --device cuda --sizes 24576 --d 768 \\
        --kinds trained,random --cli --scipy-timeout 420
    # real checkpoints as well (any two folders isae can load)
    ... --pair CKPT_A CKPT_B

For each size and kind two dictionaries are drawn on the device (seeded) and written as
checkpoints into a temporary folder, then each measurement runs in its own process, so that
its peak memory is its own:

* ``ours``: ``isae.analysis.matching.match_dictionaries`` on the device (cosines, sparse
  solve, certificate; the dictionaries already loaded), its wall time, the certificate, the
  process's peak host RSS and peak device memory;
* ``cli`` (``--cli``): ``isae match A B --device D --out ...`` as a user runs it, start-up,
  loading and the chance level (a second matching, of two random dictionaries of the same
  shape) included, wall time;
* ``scipy``: the same float32 |cos| matrix as float64 (built blockwise on the device), then
  ``scipy.optimize.linear_sum_assignment`` alone, timed; killed after ``--scipy-timeout`` s
  (the table then says "> T"). Its total |cos| and ours are both summed over the same float32
  matrix: ``Δ total`` is ours minus scipy's (0 or float64 rounding when both are optimal).

Kinds: ``trained`` is shaped like two trained SAE dictionaries of different seeds: atoms
drawn with a decaying spectrum (not isotropic), a fifth of them near-duplicates of another
atom (cos 0.7-0.99: feature splitting, and the near-ties Hungarian is slow on), each atom's
partner in the other dictionary from close (cos 0.9-1) through middling to unrelated, random
signs, a random permutation. ``random``: two isotropic Gaussian dictionaries (the chance
level's matching). The table is printed last; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- dictionaries


@torch.no_grad()
def trained_like(n: int, d: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n, d] float32 unit-row dictionaries shaped like trained SAEs of two seeds."""
    g = torch.Generator(device=device).manual_seed(seed)

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    spectrum = torch.arange(1, d + 1, device=device, dtype=torch.float32) ** -0.5

    def draw(k):
        return unit(torch.randn(k, d, generator=g, device=device) * spectrum)

    A = draw(n)
    # Near-duplicates: a fifth of the atoms are perturbed copies of another atom.
    kids = torch.randperm(n, generator=g, device=device)[: n // 5]
    parents = torch.randint(0, n, (len(kids),), generator=g, device=device)
    spread = 0.15 + 0.85 * torch.rand(len(kids), 1, generator=g, device=device)
    A[kids] = unit(A[parents] + spread * draw(len(kids)))
    # Each atom's partner: 40 % close (cos 0.9-1), 30 % middling (0.3-0.9), 30 % unrelated.
    u = torch.rand(n, generator=g, device=device)
    close = 0.9 + 0.1 * torch.rand(n, generator=g, device=device)
    mid = 0.3 + 0.6 * torch.rand(n, generator=g, device=device)
    rho = torch.where(u < 0.4, close, torch.where(u < 0.7, mid, torch.zeros_like(u)))[:, None]
    e = draw(n)
    e = unit(e - (e * A).sum(1, keepdim=True) * A)
    B = rho * A + (1 - rho**2).sqrt() * e
    sign = torch.randint(0, 2, (n, 1), generator=g, device=device) * 2 - 1
    B = B * sign
    return A, B[torch.randperm(n, generator=g, device=device)]


@torch.no_grad()
def random_pair(n: int, d: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    A, B = (torch.randn(n, d, generator=g, device=device) for _ in range(2))
    return A / A.norm(dim=1, keepdim=True), B / B.norm(dim=1, keepdim=True)


KINDS = {"trained": trained_like, "random": random_pair}


def save_ckpt(W: torch.Tensor, out: Path, seed: int) -> Path:
    from isae.data import checkpoints
    from isae.data.activations import Normalizer
    from isae.models.config import SAEConfig
    from isae.models.sparse_coder import SparseCoder

    n, d = W.shape
    model = SparseCoder(SAEConfig.from_arch("topk", d_in=d, d_sae=n, k=min(32, n), seed=seed))
    with torch.no_grad():
        model.W_dec.copy_(W.cpu())
    return checkpoints.save(model, out, Normalizer(mean=np.zeros(d, np.float32), scale=1.0),
                            extra={"arch": "topk", "seed": seed})


# ----------------------------------------------------------------------------- workers


def _peaks(device: str) -> dict:
    out = {"host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_ours(a: str, b: str, device: str, out: str) -> dict:
    import logging

    from isae.analysis.matching import match_dictionaries
    from isae.data.checkpoints import load_decoder

    steps: list[str] = []  # the solver's own account of its rounds, with their times
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda rec: steps.append(rec.getMessage())
    lg = logging.getLogger("isae.analysis.assignment")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(handler)

    A, B = load_decoder(a).to(device), load_decoder(b).to(device)
    if device.startswith("cuda"):
        torch.zeros(1, device=device) @ torch.zeros(1, device=device)  # context, cuBLAS
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    m = match_dictionaries(A, B, device=device)
    _sync(device)
    secs = time.perf_counter() - t
    np.save(out, np.stack([m.a, m.b]))
    c = m.certificate
    return {"secs": secs, "method": c.method, "gap": c.gap, "rounds": c.rounds,
            "solves": c.solves, "edges": c.edges, "reason": c.reason, "steps": steps,
            **_peaks(device)}


def worker_scipy(a: str, b: str, device: str, ours: str) -> dict:
    from scipy.optimize import linear_sum_assignment

    from isae.analysis.matching import abs_cos_cost
    from isae.data.checkpoints import load_decoder

    A, B = load_decoder(a).to(device), load_decoder(b).to(device)
    cost, _, _ = abs_cos_cost(A, B, device=device)
    del A, B
    t = time.perf_counter()
    r, c = linear_sum_assignment(cost)
    secs = time.perf_counter() - t
    oa, ob = np.load(ours)
    return {"secs": secs, "total": float(-cost[r, c].sum()), "ours_total": float(-cost[oa, ob].sum()),
            "same_pairs": bool(np.array_equal(oa, r) and np.array_equal(ob, c)), **_peaks(device)}


def run_worker(kind: str, args: list[str], timeout: float | None) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_cli(a: Path, b: Path, device: str, tmp: Path) -> dict:
    out = tmp / "cli_table.parquet"
    # python -m isae is the isae console script, without needing it on PATH.
    cmd = [sys.executable, "-m", "isae", "-q", "match", str(a), str(b), "--device", device,
           "--out", str(out)]
    if os.environ.get("MATCH_BENCH_THREADS"):
        cmd[3:3] = ["--threads", os.environ["MATCH_BENCH_THREADS"]]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"isae match failed:\n{p.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return {"secs": secs, **json.loads(p.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------- the table


def measure(name: str, a: Path, b: Path, n: str, args, tmp: Path) -> dict:
    ours_file = str(tmp / "ours.npy")
    row = {"case": name, "shape": n, "device": args.device}
    ours = run_worker("ours", [str(a), str(b), args.device, ours_file], None)
    row.update({f"ours_{k}": v for k, v in ours.items()})
    print(f"  ours: {ours['secs']:.2f} s, {ours['method']}, gap {ours['gap']:.3g}, "
          f"{ours['rounds']} rounds", file=sys.stderr, flush=True)
    for line in ours["steps"]:
        print(f"    {line}", file=sys.stderr, flush=True)
    if args.cli:
        cli = run_cli(a, b, args.device, tmp)
        row.update({"cli_secs": cli["secs"], "cli_method": cli.get("assignment_method"),
                    "cli_gap": cli.get("assignment_gap")})
        print(f"  isae match: {cli['secs']:.2f} s", file=sys.stderr, flush=True)
    sc = run_worker("scipy", [str(a), str(b), args.device, ours_file], args.scipy_timeout)
    if sc is None:
        row["scipy_secs"] = None
        print(f"  scipy: > {args.scipy_timeout} s", file=sys.stderr, flush=True)
    else:
        row.update({f"scipy_{k}": v for k, v in sc.items()})
        row["delta_total"] = sc["ours_total"] - sc["total"]
        print(f"  scipy: {sc['secs']:.2f} s, Δ total {row['delta_total']:.3g}",
              file=sys.stderr, flush=True)
    return row


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict], timeout: float | None) -> str:
    head = ("| case | shape | device | ours s | certificate | isae match s | scipy s "
            "| ours / scipy | match / scipy | Δ total | host MB ours / scipy | device MB |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        sc = r.get("scipy_secs")
        sc_txt = f"> {timeout:g}" if sc is None and "scipy_secs" in r else _fmt(sc)
        cert = (f"{r['ours_method']}, gap {r['ours_gap']:.3g}, {r['ours_rounds']} rounds, "
                f"{r['ours_solves']} solves")
        ratio = _fmt(r["ours_secs"] / sc, ".3f") if sc else "-"
        cli = r.get("cli_secs")
        cli_ratio = _fmt(cli / sc, ".3f") if (sc and cli) else "-"
        delta = r.get("delta_total")
        out.append(
            f"| {r['case']} | {r['shape']} | {r['device']} | {r['ours_secs']:.2f} | {cert} | "
            f"{_fmt(cli)} | {sc_txt} | {ratio} | {cli_ratio} | "
            f"{'-' if delta is None else format(delta, '.2g')} | "
            f"{r['ours_host_peak_mb']:.0f} / {_fmt(r.get('scipy_host_peak_mb'), '.0f')} | "
            f"{_fmt(r.get('ours_device_peak_mb'), '.0f')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="2048", help="comma-separated widths (square pairs)")
    p.add_argument("--d", type=int, default=384, help="dimension of the atoms")
    p.add_argument("--kinds", default="trained,random", help=f"of {', '.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("CKPT_A", "CKPT_B"),
                   help="also match two real checkpoints (repeatable)")
    p.add_argument("--cli", action="store_true", help="also time isae match end to end")
    p.add_argument("--scipy-timeout", type=float, default=None,
                   help="give up on scipy's assignment after this many seconds")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        torch.set_num_threads(int(os.environ.get("MATCH_BENCH_THREADS", torch.get_num_threads())))
        res = worker_ours(*rest) if kind == "ours" else worker_scipy(*rest)
        print(json.dumps(res))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="match_bench_") as t:
        tmp = Path(t)
        for size in [int(s) for s in args.sizes.split(",") if s]:
            for kind in [k for k in args.kinds.split(",") if k]:
                A, B = KINDS[kind](size, args.d, args.seed, args.device)
                a = save_ckpt(A, tmp / f"{kind}{size}_a", args.seed)
                b = save_ckpt(B, tmp / f"{kind}{size}_b", args.seed + 1)
                del A, B
                print(f"{kind} {size} x {size}, d {args.d}:", file=sys.stderr, flush=True)
                rows.append(measure(kind, a, b, f"{size}x{size}", args, tmp))
        for a, b in args.pair:
            print(f"pair {a} {b}:", file=sys.stderr, flush=True)
            from isae.data.checkpoints import load_decoder

            na, nb = load_decoder(a).shape[0], load_decoder(b).shape[0]
            rows.append(measure(f"{Path(a).name} ~ {Path(b).name}", Path(a), Path(b),
                                f"{na}x{nb}", args, tmp))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    load = os.getloadavg()
    threads = os.environ.get("MATCH_BENCH_THREADS", torch.get_num_threads())
    print(f"\n{dev or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {threads} threads, load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(table(rows, args.scipy_timeout))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
