"""Two study runs' Snakemake benchmark files side by side, job by job, for the rules given
(by default the training rules: ``train`` and ``lr_sweep``): #26's study-time target reads
the summed ``train`` seconds of a run against those of an earlier one.

    python benchmarks/device/study_time.py BEFORE AFTER [--rules train,lr_sweep]

BEFORE and AFTER are each a folder holding ``<rule>/<dataset>/<job>.tsv`` (a run's
``results/benchmarks``, or the ``benchmarks/`` of a published results-gpu folder) or
``COMMIT:PATH`` for such a folder as committed. Prints one Markdown table per rule (seconds
before, after, and their ratio per job; jobs only one run has are marked) and the sums.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect_run import last_row  # noqa: E402


def _seconds(text: str) -> float:
    """The ``s`` column of a Snakemake benchmark file's row that counts (collect_run.last_row)."""
    row = last_row(text)
    if row is None:
        raise ValueError("a benchmark file with no data row")
    return float(row["s"])


def read_times(where: str, rule: str) -> dict[str, float]:
    """Job ("dataset/job") -> seconds, for one rule of one run (see the module docstring)."""
    if ":" in where and not Path(where).exists():
        commit, path = where.split(":", 1)
        root = f"{path.rstrip('/')}/{rule}"
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", commit, root],
                               capture_output=True, text=True, check=True).stdout.split()
        return {n[len(root) + 1:-4]: _seconds(subprocess.run(
                    ["git", "show", f"{commit}:{n}"], capture_output=True, text=True,
                    check=True).stdout)
                for n in names if n.endswith(".tsv")}
    base = Path(where) / rule
    return {str(p.relative_to(base))[:-4]: _seconds(p.read_text())
            for p in sorted(base.rglob("*.tsv"))}


def compare(before: dict[str, float], after: dict[str, float], rule: str) -> list[str]:
    """A Markdown table of one rule's jobs and a line with the sums over the jobs both have."""
    lines = [f"| {rule} job | before s | after s | before / after |", "|---|---:|---:|---:|"]
    for job in sorted(set(before) | set(after)):
        b, a = before.get(job), after.get(job)
        ratio = f"{b / a:.2f}" if b and a else "only in one run"
        lines.append(f"| {job} | {'' if b is None else f'{b:.1f}'} | "
                     f"{'' if a is None else f'{a:.1f}'} | {ratio} |")
    both = set(before) & set(after)
    sb, sa = sum(before[j] for j in both), sum(after[j] for j in both)
    lines.append(f"| **sum over the {len(both)} jobs both runs have** | {sb:.1f} | {sa:.1f} | "
                 f"{sb / sa if sa else float('nan'):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rules", default="train,lr_sweep")
    a = p.parse_args(argv)
    for rule in a.rules.split(","):
        try:
            before, after = read_times(a.before, rule), read_times(a.after, rule)
        except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
            print(f"study_time.py: error: {rule}: {e}", file=sys.stderr)
            return 2
        if not before and not after:
            print(f"study_time.py: error: no {rule} benchmark files in either run",
                  file=sys.stderr)
            return 2
        print("\n".join(compare(before, after, rule)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
