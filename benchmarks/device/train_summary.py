"""What the training of a device run says on its own, from the checkpoints' cfg.json and
train_log.parquet that collect_run.py brings back (no weights): one row per run with its
final training FVU, the convergence control and the learning rate.

Where a cfg.json lacks the convergence control (the learning-rate sweep's runs did not write
it before), it is computed from the run's log as `isae train` computes it.
A run cut short before its measurements still leaves this: it shows whether the SAEs had
converged at that budget, which is what a config for the next run needs to know.

    python3 benchmarks/device/train_summary.py RESULTS_DIR --out DIR

writes DIR/train_runs.parquet and DIR/train_runs.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from isae.analysis.convergence import run_convergence
from isae.models.config import TrainConfig


def summarise(results: Path) -> pd.DataFrame:
    rows = []
    for cfg_path in sorted((results / "checkpoints").rglob("cfg.json")):
        run = cfg_path.parent
        cfg = json.loads(cfg_path.read_text())
        dataset, group = run.relative_to(results / "checkpoints").parts[:2]
        log = pd.read_parquet(run / "train_log.parquet") if (run / "train_log.parquet").is_file() else None
        train = cfg.get("train", {})
        conv = {k: cfg.get(k) for k in ("fvu_trend", "converged")}
        if conv["converged"] is None and log is not None:
            # A run that training did not stamp (the lr sweep's, before it did): the same
            # control, from its own log and settings.
            tcfg = TrainConfig.from_dict(train)
            conv = run_convergence(log, tcfg, tcfg.total_steps())
        rows.append({
            "dataset": dataset, "group": group, "arch": cfg["arch"], "seed": cfg["seed"],
            "k": cfg["k"], "width": cfg["d_sae"], "tokens": cfg.get("tokens_seen"),
            "batch_size": train.get("batch_size"), "lr": cfg.get("lr"),
            "steps": None if log is None else int(log["step"].iloc[-1]) + 1,
            "train_fvu": None if log is None else float(log["fvu"].iloc[-1]),
            "fvu_trend": conv["fvu_trend"], "converged": conv["converged"],
            "wall_s": None if log is None else float(log["wall_s"].iloc[-1]),
        })
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """Mean and spread over seeds per dataset, group and arch, with how many converged."""
    g = df.groupby(["dataset", "group", "arch"], sort=True)
    out = ["| dataset | group | arch | seeds | tokens | steps | lr | train FVU (mean ± sd) "
           "| FVU trend (max abs) | converged |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for (dataset, group, arch), r in g:
        sd = r["train_fvu"].std(ddof=1) if len(r) > 1 else float("nan")
        fvu = f"{r['train_fvu'].mean():.4f}" + ("" if len(r) == 1 else f" ± {sd:.4f}")
        out.append(
            f"| {dataset} | {group} | {arch} | {len(r)} | {int(r['tokens'].iloc[0]):,} | "
            f"{int(r['steps'].iloc[0]):,} | {r['lr'].iloc[0]:.2e} | {fvu} | "
            f"{r['fvu_trend'].abs().max():.3f} | {int(r['converged'].sum())}/{len(r)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="the run's results folder (as collected)")
    p.add_argument("--out", type=Path, required=True, help="folder for train_runs.{parquet,md}")
    a = p.parse_args()
    df = summarise(a.results)
    if df.empty:
        raise SystemExit(f"train_summary.py: error: no checkpoints/**/cfg.json under {a.results}")
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(a.out / "train_runs.parquet", index=False)
    (a.out / "train_runs.md").write_text(markdown(df))
    print(f"{len(df)} runs -> {a.out}/train_runs.{{parquet,md}}")


if __name__ == "__main__":
    main()
