"""A collected device run (the unpacked results.tar.gz of collect_run.py) into the folder
that the repository keeps, e.g. results-gpu/: the tables (Markdown, Parquet, LaTeX), the
figures as PNG, the per-run tables they are made from, the learning-rate sweeps, the
feature-browser pages, the activation sets' provenance, Snakemake's benchmark files, the
logs and tables of the benchmarks run around the study (device/), RUN.md
(as the device wrote it: the caller adds what it learnt), and the training summary of train_summary.py. Weights never travel back, so none are kept.

    python3 benchmarks/device/publish_run.py COLLECTED DEST [--redraw F7 ...]

COLLECTED holds results/ (with its benchmarks/) and RUN.md as collect_run.py packed them.
--redraw draws a figure again from the run's own tables with this checkout's plotting code
(a plotting fix made after the run); RUN.md's commit stays the run's, and the caller says so.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
from train_summary import markdown, summarise

# runs/ holds every group's measurements (measure/**) and chance draws, collected.
KEEP = ["tables/*", "figures/*.png", "runs/*.parquet", "lr/*/sweep.parquet",
        "browser/**/*.html", "activations/*/meta.json", "activations/*/text_files.json"]

# Figure -> (function name in isae.study.figures, the tables it reads from results/runs).
REDRAW = {"F7": ("f7_budget", {"runs": "runs", "pairs": "pairs", "chance": "chance"}),
          "F9": ("f9_width", {"runs": "runs", "pairs": "pairs", "chance": "chance"})}


def publish(src: Path, dest: Path, redraw: list[str]) -> list[Path]:
    results = src / "results"
    if not (results.is_dir() and (src / "RUN.md").is_file()):
        raise SystemExit(f"publish_run.py: error: no results/ and RUN.md under {src}: not a collected run")
    written: list[Path] = []

    def keep(f: Path, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
        written.append(out)

    keep(src / "RUN.md", dest / "RUN.md")
    patterns = list(KEEP)
    if not (results / "runs" / "runs.parquet").is_file():
        # A run of single targets (no collect rules): its groups' own measurements.
        patterns.append("measure/**/*.parquet")
    for pat in patterns:
        for f in sorted(results.glob(pat)):
            if f.is_file():
                keep(f, dest / f.relative_to(results))
    # What the session measured around the study (session.sh's BEFORE and AFTER).
    for f in sorted((src / "device").rglob("*")):
        if f.is_file():
            keep(f, dest / "device" / f.relative_to(src / "device"))
    rules = results / "benchmarks"
    for f in sorted(rules.rglob("*.tsv")):
        keep(f, dest / "benchmarks" / f.relative_to(rules))
    df = summarise(results) if (results / "checkpoints").is_dir() else pd.DataFrame()
    if not df.empty:
        df.to_parquet(dest / "train_runs.parquet", index=False)
        (dest / "train_runs.md").write_text(markdown(df))
        written += [dest / "train_runs.parquet", dest / "train_runs.md"]
    for name in redraw:
        if name not in REDRAW:
            raise SystemExit(f"publish_run.py: error: cannot redraw {name}; known: {', '.join(REDRAW)}")
        from isae.study import figures
        fn, inputs = REDRAW[name]
        tables = {arg: pd.read_parquet(results / "runs" / f"{t}.parquet") for arg, t in inputs.items()}
        fig = getattr(figures, fn)(**tables)
        out = dest / "figures" / f"{name}.png"
        figures.save_figure(fig, [out])
        written.append(out)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("collected", type=Path, help="the unpacked results.tar.gz of a device run")
    p.add_argument("dest", type=Path, help="the folder to keep, e.g. results-gpu")
    p.add_argument("--redraw", nargs="*", default=[], help="figures to draw again (F7, F9)")
    a = p.parse_args()
    written = publish(a.collected, a.dest, a.redraw)
    print(f"{len(written)} files -> {a.dest}")


if __name__ == "__main__":
    main()
