"""The run-to-run spread of training on one device: the same SAE (arch, seed, data order,
settings) trained twice, and how far apart the two results land.

A difference between architectures is a verdict only when it is outside the seed spread
*and* this spread: on a GPU, atomics and the order of parallel reductions make two runs of
one configuration differ (on the CPU with a fixed thread count they are bitwise equal). For
each arch the script trains ``--repeats`` identical runs, evaluates each on the held-out
rows, matches every pair of repeats, and, for scale, also trains seed 1 once and matches
it with seed 0.

    PYTHONPATH=src python benchmarks/rerun_spread.py --device cuda            # synthetic set
    PYTHONPATH=src python benchmarks/rerun_spread.py --device cuda \\
        --activations results/activations/minilm --k 16 --width 1536 --tokens 10000000

Without ``--activations`` it makes the well-posed synthetic set of config/gpu.yaml (d 128,
512 atoms, k 4) in a scratch folder. ISAE_GROUPED follows the environment (on CUDA the
seeds of one call form a group; the repeats are separate calls, so they never share one).
The table printed last: per arch, the held-out FVU of each repeat, their largest
difference, the repeats' matched |cos| (1 = the same dictionary) and, beside it, the seed
pair's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--activations", help="activation set (default: a synthetic one is made)")
    ap.add_argument("--archs", default="topk,isae,isae-iter")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", help="write the table as JSON here too")
    args = ap.parse_args(argv)

    from isae.analysis.matching import match_dictionaries
    from isae.analysis.reconstruction import reconstruction_metrics
    from isae.data.activations import ActivationSet
    from isae.data.checkpoints import load
    from isae.data.sources import synthetic
    from isae.models.config import SAEConfig, TrainConfig
    from isae.training.trainer import train_many

    work = Path(args.work or tempfile.mkdtemp(prefix="rerun-spread-"))
    work.mkdir(parents=True, exist_ok=True)
    acts_path = Path(args.activations) if args.activations else work / "set"
    if not args.activations and not (acts_path / "meta.json").exists():
        synthetic.extract(str(acts_path), seed=0, d=128, atoms=512, k=4, rows=400_000,
                          noise=0.05)
    acts = ActivationSet(acts_path)
    archs = args.archs.split(",")
    tcfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, device=args.device, seed=0)

    def trained(tag: str, seed: int) -> dict[str, Path]:
        outs = {a: work / tag / a for a in archs}
        cfgs = [SAEConfig.from_arch(a, d_in=acts.d, d_sae=args.width, k=args.k, seed=seed)
                for a in archs]
        t0 = time.perf_counter()
        train_many(acts_path, cfgs, tcfg, list(outs.values()), resume=False, force=True)
        print(f"[{tag}] trained {len(archs)} SAEs in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        return outs

    reps = [trained(f"rep{r}", seed=0) for r in range(args.repeats)]
    other = trained("seed1", seed=1)
    rows = []
    for a in archs:
        ckpts = [load(rep[a], device=args.device) for rep in reps]
        fvus = [reconstruction_metrics(c, acts)["fvu"] for c in ckpts]
        same = [match_dictionaries(x.model.W_dec.detach(), y.model.W_dec.detach(),
                                   device=args.device).summary()
                for x, y in itertools.combinations(ckpts, 2)]
        seed1 = load(other[a], device=args.device)
        seed_pair = match_dictionaries(ckpts[0].model.W_dec.detach(), seed1.model.W_dec.detach(),
                                       device=args.device).summary()
        rows.append({
            "arch": a,
            **{f"fvu_rep{i}": f for i, f in enumerate(fvus)},
            "fvu_max_diff": max(fvus) - min(fvus),
            "fvu_seed1": reconstruction_metrics(seed1, acts)["fvu"],
            "rerun_abs_cos": min(s["mean_abs_cos"] for s in same),
            "rerun_frac_gt_0.9": min(s["frac_gt_0.9"] for s in same),
            "seed_abs_cos": seed_pair["mean_abs_cos"],
        })
    table = pd.DataFrame(rows)
    meta = {"device": args.device, "activations": str(acts_path), "k": args.k,
            "width": args.width, "tokens": args.tokens, "batch_size": args.batch_size,
            "repeats": args.repeats}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
