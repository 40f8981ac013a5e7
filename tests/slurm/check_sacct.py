"""Check a Snakemake run on Slurm against Slurm's own accounting (sacct).

    python tests/slurm/check_sacct.py --run-log run.log --dry-run dry.log \
        --account isae-test --partition debug --gpu none

The two references are independent of each other: the dry run says which jobs the DAG
needs (rule -> count), the run log says which Slurm job ids the executor submitted, and
sacct (slurmdbd's database) says what Slurm actually ran. It checks that every job of the
DAG except `--local` rules was submitted as exactly one Slurm job, that each of those
jobs is in sacct as COMPLETED with exit code 0:0 under the expected account, partition
and rule (the executor writes the rule into the job's comment), and that the jobs that
must hold a GPU (gres/gpu in AllocTRES) are exactly those of `--gpu` rules.

Prints one line per failed check and a closing line; exits 1 if any check failed.
Standard library only (no pytest), so it runs wherever the test does.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

SUBMIT_RE = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: \S*/rule_([^/\s]+)/")
LOCAL_RE = re.compile(r"^localrule (\w+):", re.M)
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Account", "Partition", "AllocTRES", "Comment")


def dry_run_counts(text: str) -> Counter:
    """Rule -> job count from the 'Job stats' table of `snakemake -n`."""
    counts: Counter = Counter()
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    except StopIteration:
        raise SystemExit("check_sacct: no 'Job stats:' table in the dry-run log") from None
    for line in lines[start + 3 :]:  # header, "job count", dashes
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] += int(parts[1])
    return counts


def submitted_jobs(text: str) -> list[tuple[str, str]]:
    """(rule, Slurm job id) for each submission in a Snakemake run log."""
    return [(rule, jobid) for jobid, rule in SUBMIT_RE.findall(text)]


def sacct_rows(jobids: list[str]) -> dict[str, dict[str, str]]:
    """JobID -> sacct fields for the allocations (-X) of the given jobs."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(jobids), "-o", ",".join(SACCT_FIELDS)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = {}
    for line in out.splitlines():
        # The comment is last and could contain '|': split only as often as needed.
        values = line.split("|", len(SACCT_FIELDS) - 1)
        if len(values) == len(SACCT_FIELDS):
            rows[values[0]] = dict(zip(SACCT_FIELDS, values))
    return rows


def check(
    run_log: str,
    dry_log: str,
    account: str | None,
    partition: str | None,
    gpu_rules: set[str],
    local_rules: set[str],
    sacct=sacct_rows,
) -> list[str]:
    """All failures (empty list = pass)."""
    failures = []
    expected = dry_run_counts(dry_log)
    submitted = submitted_jobs(run_log)
    if not submitted:
        return ["the run log names no Slurm submission"]
    remote_expected = Counter({r: n for r, n in expected.items() if r not in local_rules})
    remote_seen = Counter(rule for rule, _ in submitted)
    if remote_seen != remote_expected:
        failures.append(
            f"Slurm submissions per rule {dict(remote_seen)} != jobs of the DAG "
            f"{dict(remote_expected)} (local rules {sorted(local_rules)})"
        )
    ran_locally = set(LOCAL_RE.findall(run_log)) - local_rules
    if ran_locally:
        failures.append(f"rules run outside Slurm: {sorted(ran_locally)}")
    ids = [jobid for _, jobid in submitted]
    if len(set(ids)) != len(ids):
        failures.append(f"a Slurm job id was reported twice: {ids}")
    rows = sacct(ids)
    for rule, jobid in submitted:
        row = rows.get(jobid)
        if row is None:
            failures.append(f"rule {rule}: Slurm job {jobid} is not in sacct")
            continue
        where = f"rule {rule} (Slurm job {jobid})"
        if row["State"] != "COMPLETED" or row["ExitCode"] != "0:0":
            failures.append(f"{where}: {row['State']} exit {row['ExitCode']}")
        comment = row["Comment"]
        if comment != f"rule_{rule}" and not comment.startswith(f"rule_{rule}_wildcards_"):
            failures.append(f"{where}: job comment {row['Comment']!r} names another rule")
        if account and row["Account"] != account:
            failures.append(f"{where}: account {row['Account']!r}, expected {account!r}")
        if partition and row["Partition"] != partition:
            failures.append(f"{where}: partition {row['Partition']!r}, expected {partition!r}")
        has_gpu = "gres/gpu=" in row["AllocTRES"]
        if has_gpu != (rule in gpu_rules):
            failures.append(
                f"{where}: AllocTRES {row['AllocTRES']!r} {'holds' if has_gpu else 'lacks'} a GPU"
            )
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-log", type=Path, required=True, help="stdout+stderr of the run")
    p.add_argument("--dry-run", type=Path, required=True, help="output of `snakemake -n`")
    p.add_argument("--account", help="account every job must have run under")
    p.add_argument("--partition", help="partition every job must have run in")
    p.add_argument("--gpu", default="none", help="comma-separated rules that hold a GPU")
    p.add_argument("--local", default="all", help="comma-separated rules run locally")
    args = p.parse_args(argv)
    split = lambda s: {x for x in s.split(",") if x and x != "none"}  # noqa: E731
    run_log = args.run_log.read_text()
    failures = check(
        run_log,
        args.dry_run.read_text(),
        args.account,
        args.partition,
        split(args.gpu),
        split(args.local),
    )
    for f in failures:
        print(f"check_sacct: FAIL {f}")
    n = len(submitted_jobs(run_log))
    print(f"check_sacct: {n} Slurm jobs checked, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
