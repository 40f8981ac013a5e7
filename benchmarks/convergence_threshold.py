"""Calibrate the convergence control: what fall of the training FVU does a run show once it
has converged?

The default schedule decays the learning rate linearly to zero over the last 20 % of the
steps, which lowers the FVU by itself, so even a converged run shows a fall over those
steps. This script trains the embedded default's synthetic SAEs at its main budget and at
``--longer`` times it (one seed, the same data order, isae train's default learning rate,
4x Gao et al.'s, which the study's sweep chose for most of them), and prints for each the relative fall of the
smoothed training FVU over the last 20 % of the steps and over the 20 % before the decay
(isae.analysis.convergence.run_convergence, the control isae train and the study use), held-out FVU, truth
recovery and how far the atoms moved from their initialisation. A threshold above the long
runs' falls says "still learning" where the FVU still moves.

    python benchmarks/convergence_threshold.py --out /tmp/conv      # ~15 CPU-minutes

Runs on the CPU, one thread (OMP_NUM_THREADS=1 for a result independent of the machine's
load); prints one table and writes OUT/calibration.parquet.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from isae.analysis.convergence import fvu_trend, init_abs_cos, run_convergence
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import reconstruction_metrics
from isae.data.activations import ActivationSet
from isae.data.checkpoints import INIT_FILE, TRAIN_LOG, load, load_decoder
from isae.data.sources import synthetic
from isae.models.config import SAEConfig, TrainConfig, parse_arch
from isae.training.trainer import train_many

#: The embedded default's two synthetic regimes (config/config.yaml).
REGIMES = {
    "coherent": dict(d=64, atoms=256, k=8),
    "wellposed": dict(d=128, atoms=512, k=4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=1_000_000, help="the main budget (training rows)")
    p.add_argument("--longer", type=int, default=10, help="the long runs' budget, x --rows")
    p.add_argument("--archs", default="topk,isae,isae-iter")
    p.add_argument("--lr-factor", type=float, default=1.0,
                   help="x isae train's default learning rate, 8e-4 / sqrt(width / 16384) (4x "
                        "Gao et al.'s, what the study's sweep chose for most of these SAEs)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--regimes", default=",".join(REGIMES))
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for regime in args.regimes.split(","):
        shape = REGIMES[regime]
        acts_path = out / "sets" / regime
        if not (acts_path / "meta.json").is_file():
            synthetic.extract(out=str(acts_path), rows=100_000, noise=0.05, zipf=1.0, seed=0,
                              **shape)
        acts = ActivationSet(acts_path)
        truth = load_decoder(acts_path / "truth")
        archs = args.archs.split(",")
        for budget in (args.rows, args.longer * args.rows):
            width, k = shape["atoms"], shape["k"]
            tcfg = TrainConfig(tokens=budget, batch_size=args.batch_size, seed=0,
                               log_every=max(1, budget // args.batch_size // 200))
            lr = args.lr_factor * tcfg.learning_rate(width)
            cfgs = [SAEConfig(d_in=shape["d"], d_sae=width, k=k, arch=a, seed=0, **parse_arch(a).fields)
                    for a in archs]
            outs = [out / "ckpt" / regime / str(budget) / a for a in archs]
            t0 = time.process_time()
            if not all((o / "cfg.json").is_file() for o in outs):
                train_many(acts_path, cfgs, tcfg, outs, lrs=[lr] * len(archs), resume=False)
            cpu = time.process_time() - t0
            for a, o in zip(archs, outs):
                ck = load(o)
                log = pd.read_parquet(o / TRAIN_LOG)
                W0 = load_file(str(o / INIT_FILE))["W_dec"]
                rows.append({
                    "regime": regime, "arch": a, "rows": budget, "steps": tcfg.total_steps(),
                    # over the last 20 % of the steps (the decay included) ...
                    "fall_last20": fvu_trend(log),
                    # ... and over the 20 % before the decay: the study's control
                    "fall_before_decay": run_convergence(log, tcfg, tcfg.total_steps())["fvu_trend"],
                    "heldout_fvu": reconstruction_metrics(ck, acts)["fvu"],
                    "truth_abs_cos": match_dictionaries(ck.W_dec, truth).summary()["mean_abs_cos"],
                    "init_abs_cos": float(init_abs_cos(ck.W_dec.numpy(), W0.numpy()).mean()),
                    "cpu_s": cpu / len(archs),
                })
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_parquet(out / "calibration.parquet", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    print(f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")


if __name__ == "__main__":
    main()
