"""The compute plan of a study config: jobs, GPU-hours and disk, as Markdown tables.

    python tests/slurm/compute_plan.py [--config config/paper.yaml] [--benchmarks DIR]

Nothing here is guessed:

* the jobs are the workflow's, read from the study's grid (``isae.study.plan.jobs``, which
  a test holds equal to the jobs of `snakemake -n`);
* disk is arithmetic on the config: activation rows x d x bytes of the stored dtype (and
  the trained references' derived sets: a Gaussian copy, two halves), and
  per checkpoint W_enc + W_dec (d x width each) + b_enc + b_dec in float32, the layout of
  sae.safetensors; d comes from the config (synthetic), from an extracted set's meta.json
  under --results, or from the known hidden size of the named model;
* time is measured: the `s` and `max_rss` columns of the rules' benchmark files
  (results/benchmarks/<rule>/<wildcards>.tsv, written by every job). A job of the plan
  without its own benchmark file takes the mean of the measured jobs of the same rule
  and (dataset, width); a rule with none measured shows "n/a" until a run of that config
  has produced them. Benchmark paths do not name the config, so --benchmarks must hold
  the files of a run of *this* config (for the paper config: a GPU/SLURM run of it, even
  a partial one); training benchmarks of jobs outside the plan are reported as a sign of
  a mix-up.

docs/slurm.md holds this script's output.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from isae.study import plan as study_plan

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "config" / "schema.yaml"
# Hidden sizes of the models the configs name (model cards), used when no extracted set
# is at hand to read `d` from.
MODEL_D = {
    "EleutherAI/pythia-160m": 768,
    "facebook/dinov2-base": 768,
    "all-MiniLM-L6-v2": 384,
}
DTYPE_BYTES = {"float32": 4, "float16": 2}


def dataset_d(name: str, ds: dict, results: Path) -> int | None:
    if ds["source"] == "synthetic":
        return int(ds["extract"]["d"])
    if ds["extract"].get("model") in MODEL_D:
        return MODEL_D[ds["extract"]["model"]]
    meta = results / "activations" / name / "meta.json"
    return int(json.loads(meta.read_text())["d"]) if meta.is_file() else None


def activation_rows(name: str, ds: dict, results: Path) -> int | None:
    ex = ds["extract"]
    if ds["source"] == "synthetic":
        return int(ex["rows"])
    if ds["source"] == "lm" and ex.get("max_tokens"):
        return int(ex["max_tokens"])
    if ds["source"] == "vision" and ex.get("max_images"):
        # ViT-B/14 at 224 px: 16 x 16 = 256 patch tokens per image (DINOv2-base).
        return int(ex["max_images"]) * 256
    # No cap in the config (the whole text): only an extracted set knows its size.
    meta = results / "activations" / name / "meta.json"
    return int(json.loads(meta.read_text())["rows"]) if meta.is_file() else None


def read_benchmarks(root: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(rule, wildcard path) -> {"s", "max_rss"} for every benchmark file under root."""
    out = {}
    for tsv in root.glob("**/*.tsv"):
        rel = tsv.relative_to(root)
        with tsv.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            rss = rows[-1].get("max_rss", "NA")
            out[(rel.parts[0], str(rel.with_suffix(""))[len(rel.parts[0]) + 1 :])] = {
                "s": float(rows[-1]["s"]),
                "max_rss": float(rss) if rss not in ("NA", "-", "") else float("nan"),
            }
    return out


def bench_key(rule: str, wc: dict[str, str]) -> str:
    """The wildcard part of a job's benchmark path (as in the rules' `benchmark:`)."""
    if not wc:
        return "all"
    if "seed" in wc:
        return f"{wc['dataset']}/{wc['group']}/{wc['arch']}/seed{wc['seed']}"
    if "group" in wc:
        return f"{wc['dataset']}/{wc['group']}"
    return wc.get("dataset", "all")


def job_width(wc: dict[str, str]) -> str | None:
    """The SAE width of a job's group (k8-w256-r1000000 -> "256")."""
    m = re.search(r"-w(\d+)-", wc.get("group", ""))
    return m.group(1) if m else None


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB"


def plan(config: Path, bench_root: Path, results: Path) -> str:
    cfg = study_plan.load_config([config], SCHEMA)
    datasets = cfg["datasets"]
    jobs = [(j.rule, j.wildcards, j.gpus, j.trained) for j in study_plan.jobs(cfg)]
    bench = read_benchmarks(bench_root) if bench_root.is_dir() else {}
    planned = {(rule, bench_key(rule, wc)) for rule, wc, *_ in jobs}
    foreign = sorted(k for k in bench if k[0] == "train" and k not in planned)
    lines = [f"Plan for `{config.relative_to(REPO) if config.is_relative_to(REPO) else config}`"
             f" (device: {cfg.get('device', 'cpu')}); benchmark files read: {len(bench)}.", ""]  # fmt: skip
    if foreign:
        lines[-1:] = [f"WARNING: {len(foreign)} training benchmarks are of jobs outside this plan"
                      f" (e.g. {foreign[0][1]}): {bench_root} is from another config;"
                      " none of its files is used.", ""]  # fmt: skip
        bench = {}

    # ---- time per rule: measured where a benchmark of that very job exists
    by_group = defaultdict(list)  # (rule, dataset, width) -> measured seconds
    for rule, wc, *_ in jobs:
        b = bench.get((rule, bench_key(rule, wc)))
        if b:
            by_group[(rule, wc.get("dataset"), job_width(wc))].append(b["s"])
    rows = defaultdict(
        lambda: {"jobs": 0, "gpu_jobs": 0, "measured": 0, "s": 0.0, "gpu_s": 0.0,
                 "known": True, "gpu_known": True, "rss": 0.0}
    )  # fmt: skip
    for rule, wc, gpus, _ in jobs:
        if rule == "all":
            continue
        r = rows[rule]
        r["jobs"] += 1
        r["gpu_jobs"] += gpus > 0
        b = bench.get((rule, bench_key(rule, wc)))
        group = by_group.get((rule, wc.get("dataset"), job_width(wc)))
        seconds = b["s"] if b else statistics.mean(group) if group else None
        if b:
            r["measured"] += 1
            r["rss"] = max(r["rss"], b["max_rss"])
        if seconds is None:
            r["known"] = False
            r["gpu_known"] &= gpus == 0
        else:
            r["s"] += seconds
            r["gpu_s"] += seconds * gpus
    lines += [
        "| rule | jobs | measured | jobs with a GPU | hours (sum of jobs) | max RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    total_gpu = 0.0
    gpu_known = True
    for rule, r in rows.items():
        hours = f"{r['s'] / 3600:,.2f}" if r["known"] else "n/a"
        total_gpu += r["gpu_s"] / 3600
        gpu_known &= r["gpu_known"]
        rss = f"{r['rss']:,.0f}" if r["measured"] else "n/a"
        lines.append(
            f"| {rule} | {r['jobs']} | {r['measured']} | {r['gpu_jobs']} | {hours} | {rss} |"
        )
    lines += ["", f"GPU-hours (device jobs): {f'{total_gpu:,.0f}' if gpu_known else 'n/a (not yet measured)'}", ""]  # fmt: skip

    # ---- training volume and disk per dataset
    train = defaultdict(list)  # dataset -> (SAEs, width, rows) per arch of a training job
    for _rule, wc, _, trained in jobs:
        train[wc.get("dataset")] += [(t.saes, t.width, t.rows) for t in trained]
    lines += [
        "| dataset | d | activation rows | activations on disk | SAEs trained | training tokens"
        " | checkpoints on disk |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total_disk = 0.0
    disk_known = True
    for name, ds in datasets.items():
        d = dataset_d(name, ds, results)
        n_rows = activation_rows(name, ds, results)
        nbytes = DTYPE_BYTES[ds["extract"].get("dtype", "float32")]
        groups = train.get(name, [])
        n_saes = sum(n for n, _, _ in groups)
        tokens = sum(n * rows for n, _, rows in groups)
        # The trained references' sets beside the dataset's own: the Gaussian one as many
        # rows, each half of the split half the training rows and every held-out row.
        held = ds["extract"].get("heldout_fraction", 0.1)
        copies = 1.0 + sum(1.0 if rule == "null_activations" else (1.0 + held) / 2
                           for rule, wc, _, _ in jobs
                           if rule in ("null_activations", "split_activations")
                           and wc.get("dataset") == name)
        if d is None or n_rows is None:
            acts = "n/a"
            disk_known = False
        else:
            total_disk += copies * n_rows * d * nbytes
            acts = fmt_gb(copies * n_rows * d * nbytes)
        if d is None:
            ckpt = "n/a"
        else:
            ckpt_bytes = sum(n * 4 * (2 * d * w + w + d) for n, w, _ in groups)
            total_disk += ckpt_bytes
            ckpt = fmt_gb(ckpt_bytes)
        lines.append(
            f"| {name} | {d or 'n/a'} | {'n/a' if n_rows is None else f'{n_rows:,}'} | {acts} "
            f"| {n_saes} | {tokens:,} | {ckpt} |"
        )
    lines += ["", f"Disk for activations + checkpoints: {fmt_gb(total_disk)}"
              + ("" if disk_known else " (plus the sets whose size is n/a)")]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "config" / "paper.yaml")
    p.add_argument("--benchmarks", type=Path, default=REPO / "results" / "benchmarks")
    p.add_argument("--results", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    print(plan(args.config.resolve(), args.benchmarks, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
