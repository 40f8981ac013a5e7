"""The Snakemake workflow: config validation and dry runs (no job is executed).

Each test starts Snakemake in a subprocess with ``-n`` (dry run) in a scratch copy of the
workflow files (Snakefile, workflow/, config/, scripts/), so that a study running in the
checkout at the same time (its lock, its incomplete outputs) cannot disturb the test and
the test cannot disturb it.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "config" / "schema.yaml"

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake missing")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    shutil.copy(ROOT / "Snakefile", work / "Snakefile")
    for folder in ("workflow", "config", "scripts"):
        shutil.copytree(ROOT / folder, work / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return work


def snakemake(cwd: Path, *args: str, timeout: float = 120
              ) -> tuple[subprocess.CompletedProcess, float, float]:
    """-> (the finished process, its wall seconds, its CPU seconds).

    CPU seconds (user + sys of the child) measure the work Snakemake did independently of
    how busy the machine is; wall seconds on a loaded 2-core machine do not."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def job_counts(stdout: str) -> dict[str, int]:
    """The 'Job stats' block of a dry run -> {rule: count}."""
    block = stdout.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def validate(cfg: dict) -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(cfg)


# ----------------------------------------------------------------------------- schema


def test_both_configs_satisfy_the_schema():
    for name in ("config.yaml", "paper.yaml"):
        validate(yaml.safe_load((ROOT / "config" / name).read_text()))


@pytest.mark.parametrize(
    "path",
    [("tokns",), ("datasets", "minilm", "tokns"), ("datasets", "synthetic", "extract", "nois"),
     ("resources", "train", "thread"), ("ablation", "seed")],
)
def test_schema_rejects_misspelt_keys_anywhere(path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    with pytest.raises(jsonschema.ValidationError, match=repr(path[-1])):
        validate(cfg)


def test_schema_rejects_wrong_types_and_the_wrong_extract_block():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["seeds"] = "0,1"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'array'"):
        validate(cfg)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"]["minilm"]["extract"]["atoms"] = 10  # a synthetic flag on an lm set
    with pytest.raises(jsonschema.ValidationError, match="'atoms'"):
        validate(cfg)


def test_misspelt_key_stops_snakemake_fast_naming_it(workdir):
    proc, wall, cpu = snakemake(workdir, "--config", "datasets={minilm: {tokns: 5000}}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "'tokns' was unexpected" in out
    assert "Building DAG" not in out  # stopped before any job was planned
    # The acceptance bound is 5 s of wall time on an idle machine; CPU time is that bound
    # made independent of other load (wall is reported for the record).
    assert cpu < 5.0, f"validation used {cpu:.1f} s of CPU ({wall:.1f} s wall)"


def test_semantic_check_names_the_key(workdir):
    proc, *_ = snakemake(workdir, "--config", "ablation={datasets: [nosuch]}")
    assert proc.returncode != 0
    assert "ablation.datasets names 'nosuch'" in proc.stdout + proc.stderr
    proc, *_ = snakemake(workdir, "--config", "archs=[topk, topk+bogus]")
    assert proc.returncode != 0
    assert "unknown switch 'bogus'" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- dry runs


def test_default_dry_run_and_overrides_are_typed(workdir):
    proc, *_ = snakemake(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = job_counts(proc.stdout)
    # A shrunk run through --config: nested values arrive as strings from Snakemake's parser
    # and must still validate as numbers (common.smk re-types them).
    proc, *_ = snakemake(workdir, "--config", "seeds=[0, 1]", "archs=[topk, isae]",
                        "sweep={archs: []}", "ablation={datasets: []}",
                        "datasets={minilm: {tokens: 2000, archs: null}}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    small = job_counts(proc.stdout)
    # 2 datasets x 2 archs x 2 seeds; one seed pair each; truth only on synthetic.
    assert small["train"] == 8 and small["eval"] == 8 and small["ric"] == 8
    assert small["match_pair"] == 4 and small["match_truth"] == 4 and small["fidelity"] == 4
    assert small["train"] < full["train"]
    for rule in ("table_t1", "table_t2", "f1_stability", "f2_truth_recovery", "f3_ric",
                 "f4_ablation", "f5_fvu_l0", "f6_fidelity"):
        assert small[rule] == 1


def test_paper_dry_run_needs_no_weights(workdir):
    proc, *_ = snakemake(workdir, "--configfile", "config/paper.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["activations"] == 3  # synthetic, pythia, dinov2: config.yaml is replaced
    assert "EleutherAI/pythia-160m" in proc.stdout
    assert "minilm" not in proc.stdout
    assert counts["fidelity"] > 0 and counts["train"] > 100


def test_synthetic_k_not_below_atoms_fails_at_plan_time(workdir):
    # Each row draws k distinct atoms: k >= atoms would fail only inside the extract job.
    proc, *_ = snakemake(workdir, "--config", "datasets={synthetic: {extract: {k: 256}}}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "datasets.synthetic.extract: k=256 must be smaller than atoms=256" in out
    assert "Building DAG" not in out
