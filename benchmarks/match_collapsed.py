"""The certified matcher on dictionaries whose dead atoms collapsed onto a few shared
directions (as isae-iter's did at 32 x d on MiniLM), under the old bounds of the sparse
path (8 rounds, 64 (n + N) edges) and today's defaults, one command:

    python benchmarks/match_collapsed.py --n 12288 --d 384 --frac 0.2 --dirs 60

Two dictionaries of n unit atoms: noisy copies of one shared set (features every seed
learns), except a fraction ``frac`` placed, with a little noise, on ``dirs`` directions
shared by both (collapsed dead atoms). Prints, per setting, how the matching was solved
(sparse and certified, or the dense fallback and why), the rounds, the graph's edges and the
wall time, as a table last. The findings are in benchmarks/RESULTS.md (tenth GPU session).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from isae.analysis.assignment import assign_abs_cos


def collapsed(n: int, d: int, frac: float, dirs: int, seed: int) -> torch.Tensor:
    shared = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    centres = torch.randn(dirs, d, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(seed)
    X = shared + 0.9 * torch.randn(n, d, generator=g)
    dead = int(frac * n)
    X[:dead] = centres[torch.randint(0, dirs, (dead,), generator=g)] + 0.05 * torch.randn(dead, d, generator=g)
    return torch.nn.functional.normalize(X, dim=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12288)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--frac", type=float, default=0.2)
    p.add_argument("--dirs", type=int, default=60)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.ERROR)
    A = collapsed(a.n, a.d, a.frac, a.dirs, 10).to(a.device)
    B = collapsed(a.n, a.d, a.frac, a.dirs, 11).to(a.device)
    rows = []
    for name, kw in (("old bounds: 8 rounds, 64 (n + N) edges",
                      dict(max_rounds=8, max_edges=64 * 2 * a.n)),
                     ("defaults", {})):
        t = time.perf_counter()
        cert = assign_abs_cos(A, B, **kw).certificate
        rows.append((name, cert.method, cert.rounds, cert.edges, time.perf_counter() - t,
                     cert.reason or "certified exact"))
    print(f"n {a.n}, d {a.d}, {100 * a.frac:g} % of atoms on {a.dirs} shared directions, "
          f"{a.device}, {a.threads} thread(s)")
    print("| bounds | solved by | rounds | edges | wall s | note |\n|---|---|---:|---:|---:|---|")
    for name, method, rounds, edges, s, note in rows:
        print(f"| {name} | {method} | {rounds} | {edges:,} | {s:.1f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
