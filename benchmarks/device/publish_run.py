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

--borrow-budget OTHER ARCH... draws figures/F7-combined.png: this run's budget axis with the
budget axis of ARCH taken from OTHER, an already published run (its runs/ tables), at the
widths where OTHER has it, so two sessions that each ran part of one axis show as one
figure. Only this run's own rows of those archs at those widths are replaced; the caller's
RUN.md header names both runs. The run's own F7 stays as it was drawn.

--borrow-widths OTHER draws figures/F9-combined.png the same way: this run's width axis
with the widths it did not train taken from OTHER.
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


def run_commit(published: Path) -> str:
    """The commit a published run's RUN.md names ("- commit: <sha>; ...")."""
    for line in (published / "RUN.md").read_text().splitlines():
        if line.startswith("- commit:"):
            return line.split(":", 1)[1].strip().split(";")[0].split()[0]
    raise SystemExit(f"publish_run.py: error: {published}/RUN.md names no commit")


def borrow_budget(runs: pd.DataFrame, pairs: pd.DataFrame, other_runs: pd.DataFrame,
                  other_pairs: pd.DataFrame, archs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """This run's runs and pairs tables, restricted to the widths where `other` has a budget
    axis for `archs`, with those archs' rows there taken from `other` (budget rows only)."""
    theirs = other_runs[other_runs["arch"].isin(archs) & other_runs["budget"].astype(bool)]
    if theirs.empty:
        raise SystemExit(f"publish_run.py: error: the other run has no budget axis for {', '.join(archs)}")
    widths = set(theirs["width"])

    def merged(own: pd.DataFrame, other: pd.DataFrame, arch_col: str) -> pd.DataFrame:
        mine = own[own["width"].isin(widths) & ~own[arch_col].isin(archs)]
        other = other[other["width"].isin(widths) & other[arch_col].isin(archs)
                      & other["budget"].astype(bool)]
        return pd.concat([mine, other], ignore_index=True)

    return merged(runs, theirs, "arch"), merged(pairs, other_pairs, "arch_a")


def borrow_widths(tables: dict[str, pd.DataFrame], other: dict[str, pd.DataFrame]
                  ) -> dict[str, pd.DataFrame]:
    """This run's runs, pairs and chance tables with the other run's width-axis rows (and
    chance draws) at the widths of a dataset's width axis this run did not train."""
    mine = tables["runs"][tables["runs"]["width_axis"].astype(bool)]
    have = set(zip(mine["dataset"], mine["width"]))
    out = {}
    for name, df in tables.items():
        theirs = other[name]
        if "width_axis" in theirs.columns:
            theirs = theirs[theirs["width_axis"].astype(bool)]
        keys = zip(theirs["dataset"], theirs["width"])
        theirs = theirs[[k not in have for k in keys]]
        out[name] = pd.concat([df, theirs], ignore_index=True)
    if len(out["runs"]) == len(tables["runs"]):
        raise SystemExit("publish_run.py: error: the other run has no width this run lacks")
    return out


def publish(src: Path, dest: Path, redraw: list[str],
            borrow: tuple[Path, list[str]] | None = None,
            borrow_from: Path | None = None) -> list[Path]:
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
    if borrow is not None:
        written.append(draw_combined(dest, *borrow))
    if borrow_from is not None:
        written.append(draw_combined_widths(dest, borrow_from))
    return written


def _published(run: Path) -> dict[str, pd.DataFrame]:
    """A published run's runs, pairs and chance tables."""
    return {n: pd.read_parquet(run / "runs" / f"{n}.parquet") for n in ("runs", "pairs", "chance")}


def _save_combined(fig, dest: Path, other: Path, name: str, borrowed: str) -> Path:
    """figures/NAME-combined.png of `dest`; the figure's title gains both runs' commits
    (suptitle() again replaces the title the figure function gave it)."""
    from isae.study import figures
    fig.suptitle(f"{fig.get_suptitle()}\n({borrowed}: the run of commit {run_commit(other)[:7]}; "
                 f"the others: the run of commit {run_commit(dest)[:7]})", fontsize=11)
    out = dest / "figures" / f"{name}-combined.png"
    figures.save_figure(fig, [out])
    return out


def draw_combined_widths(dest: Path, other: Path) -> Path:
    """figures/F9-combined.png of the published run `dest`, with the widths of its width
    axis that it lacks taken from the published run `other` (borrow_widths)."""
    from isae.study import figures
    mine = _published(dest)
    tables = borrow_widths(mine, _published(other))
    borrowed = sorted(set(tables["runs"]["width"]) - set(mine["runs"]["width"]))
    return _save_combined(figures.f9_width(**tables), dest, other, "F9",
                          f"widths {', '.join(map(str, borrowed))}")


def draw_combined(dest: Path, other: Path, archs: list[str]) -> Path:
    """figures/F7-combined.png of the published run `dest`, with the budget axis of `archs`
    from the published run `other` (borrow_budget)."""
    from isae.study import figures
    mine, theirs = _published(dest), _published(other)
    runs, pairs = borrow_budget(mine["runs"], mine["pairs"], theirs["runs"], theirs["pairs"], archs)
    return _save_combined(figures.f7_budget(runs, pairs, mine["chance"]), dest, other, "F7",
                          ", ".join(archs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("collected", type=Path, help="the unpacked results.tar.gz of a device run")
    p.add_argument("dest", type=Path, help="the folder to keep, e.g. results-gpu")
    p.add_argument("--redraw", nargs="*", default=[], help="figures to draw again (F7, F9)")
    p.add_argument("--borrow-budget", nargs="+", metavar=("OTHER", "ARCH"),
                   help="a published run and the archs whose budget axis F7-combined.png takes from it")
    p.add_argument("--borrow-widths", type=Path, metavar="OTHER",
                   help="a published run whose widths F9-combined.png adds where this run has none")
    a = p.parse_args()
    borrow = None
    if a.borrow_budget:
        if len(a.borrow_budget) < 2:
            p.error("--borrow-budget needs a published run and at least one arch")
        borrow = (Path(a.borrow_budget[0]), a.borrow_budget[1:])
    written = publish(a.collected, a.dest, a.redraw, borrow, a.borrow_widths)
    print(f"{len(written)} files -> {a.dest}")


if __name__ == "__main__":
    main()
