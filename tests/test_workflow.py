"""The Snakemake workflow: config validation, dry runs, and the quoting of config values.

Each Snakemake test starts it in a subprocess in a scratch copy of the workflow files
(Snakefile, workflow/, config/, scripts/, tests/smoke/), so that a study running in the
checkout at the same time (its lock, its incomplete outputs) cannot disturb the test and
the test cannot disturb it. Those tests are marked slow (seconds each); the schema tests
are not.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from isae.study import plan

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "config" / "schema.yaml"

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake missing")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    shutil.copy(ROOT / "Snakefile", work / "Snakefile")
    for folder in ("workflow", "config", "scripts", "tests/smoke"):
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


def test_the_configs_satisfy_the_schema():
    for name in ("config.yaml", "gpu.yaml", "paper.yaml"):
        validate(yaml.safe_load((ROOT / "config" / name).read_text()))
    smoke = plan.load_config([ROOT / "config" / "config.yaml", ROOT / "tests" / "smoke" / "config.yaml"],
                             SCHEMA)  # fmt: skip
    assert smoke["seeds"] == [0, 1]


@pytest.mark.parametrize("key, value, ok", [
    ("hook", "blocks.3.hook_resid_post", True),
    ("hook", "$(touch /tmp/x)blocks.3.hook_resid_post", False),
    ("hook", "blocks.3.hook_resid_post; rm -rf ~", False),
    ("hook", "blocks.3.hook_resid_post\n", False),
    ("text", "/data/my corpus/it's here.txt", True),
    ("text", "wikitext:wikitext-2-raw-v1:train", True),
    ("text", "$(touch /tmp/x)", False),
    ("text", "a `b` c", False),
    ("text", "--force", False),
    ("text", "docs\nmore", False),
    ("model", "EleutherAI/pythia-160m", True),
    ("model", "/models/my model", True),
    ("model", "${HOME}/m", False),
])
def test_schema_patterns_of_paths_and_hooks(key, value, ok):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"]["minilm"]["extract"][key] = value
    if ok:
        validate(cfg)
    else:
        with pytest.raises(jsonschema.ValidationError, match="does not match"):
            validate(cfg)
    vision = {"model": value if key == "model" else "facebook/dinov2-base",
              "images": value if key == "text" else "skimage"}
    cfg["datasets"] = {"v": {"source": "vision", "extract": vision,
                             "train": {"k": 4, "width": 16, "rows": 100}}}
    if ok or key == "hook":
        validate(cfg)
    else:
        with pytest.raises(jsonschema.ValidationError, match="does not match"):
            validate(cfg)


@pytest.mark.parametrize(
    "path",
    [("tokns",), ("datasets", "minilm", "tokns"), ("datasets", "synthetic", "extract", "nois"),
     ("datasets", "synthetic", "train", "rowz"), ("resources", "train", "thread"),
     ("ablation", "seed"), ("lr_sweep", "factor"), ("convergence", "treshold")],
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


@pytest.mark.slow
def test_misspelt_key_stops_snakemake_fast_naming_it(workdir):
    proc, wall, cpu = snakemake(workdir, "--config", "datasets={minilm: {tokns: 5000}}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "'tokns' was unexpected" in out
    assert "Building DAG" not in out  # stopped before any job was planned
    # The acceptance bound is 5 s of wall time on an idle machine; CPU time is that bound
    # made independent of other load (wall is reported for the record).
    assert cpu < 5.0, f"validation used {cpu:.1f} s of CPU ({wall:.1f} s wall)"


@pytest.mark.slow
def test_semantic_check_names_the_key(workdir):
    proc, *_ = snakemake(workdir, "--config", "ablation={datasets: [nosuch]}")
    assert proc.returncode != 0
    assert "ablation.datasets names 'nosuch'" in proc.stdout + proc.stderr
    proc, *_ = snakemake(workdir, "--config", "archs=[topk, topk+bogus]")
    assert proc.returncode != 0
    assert "unknown switch 'bogus'" in proc.stdout + proc.stderr
    proc, *_ = snakemake(workdir, "--config", "iter={bases: [isae-iter]}")
    assert proc.returncode != 0
    assert "iter.bases: 'isae-iter' already has thresholding steps" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- dry runs


@pytest.mark.slow
def test_default_dry_run_and_overrides_are_typed(workdir):
    proc, *_ = snakemake(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = job_counts(proc.stdout)
    # A shrunk run through --config: nested values arrive as strings from Snakemake's parser
    # and must still validate as numbers (common.smk re-types them).
    proc, *_ = snakemake(workdir, "--config", "seeds=[0, 1]", "archs=[topk, isae]",
                        "sweep={archs: [topk], seeds: [0]}", "ablation={datasets: []}",
                        "budgets={archs: []}", "iter={datasets: []}", "width_study={datasets: []}",
                        "datasets={minilm: {train: {rows: 2000, ks: [8, 16]}, archs: null}}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    small = job_counts(proc.stdout)
    # 3 datasets; per dataset one group at the main k (both archs x both seeds, trained in
    # one job and measured in one) and one per other k of the sweep; minilm: ks 8 and 16
    # -> 2 groups, synthetic 3 (ks 4, 8, 16), wellposed 3.
    assert small["train"] == small["measure"] == 8
    assert small["lr_sweep"] == small["chance"] == small["activations"] == 3
    # The sweep's topk at k 8 and 16 (seed 0), and the main grid's topk and isae at k 16
    # with both seeds (F6's spread), topk seed 0 among both.
    assert small["fidelity"] == 5
    assert small["train"] < full["train"]
    for rule in ("table_t1", "table_t2", "table_lr", "f1_stability", "f2_truth_recovery", "f3_ric",
                 "f4_ablation", "f5_fvu_l0", "f6_fidelity", "f7_budget", "f8_iter"):
        assert small[rule] == 1
    # Every group trains its archs x seeds in one pass, with the chosen learning rates.
    assert "--arch topk,isae --seeds 0,1 --data-seed 0" in proc.stdout
    assert "--lr-from results/lr/minilm/lr.json" in proc.stdout
    proc, *_ = snakemake(workdir, "--config", "lr_sweep={factors: []}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lr_sweep" not in job_counts(proc.stdout) and "--lr-from" not in proc.stdout


@pytest.mark.slow
def test_paper_dry_run_needs_no_weights(workdir):
    proc, *_ = snakemake(workdir, "--configfile", "config/paper.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["activations"] == 3  # synthetic, pythia, dinov2: config.yaml is replaced
    assert "EleutherAI/pythia-160m" in proc.stdout
    assert "minilm" not in proc.stdout
    assert counts["fidelity"] > 0 and counts["train"] > 20 and counts["lr_sweep"] == 3


@pytest.mark.slow
def test_synthetic_k_not_below_atoms_fails_at_plan_time(workdir):
    # Each row draws k distinct atoms: k >= atoms would fail only inside the extract job.
    proc, *_ = snakemake(workdir, "--config", "datasets={synthetic: {extract: {k: 256}}}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "datasets.synthetic.extract: k=256 must be smaller than atoms=256" in out
    assert "Building DAG" not in out


@pytest.mark.slow
@pytest.mark.parametrize("configs", [["config/config.yaml"],
                                     ["config/config.yaml", "tests/smoke/config.yaml"],
                                     ["config/gpu.yaml"], ["config/paper.yaml"]])
def test_the_library_plans_the_dry_run_jobs(workdir, configs):
    """isae.study.plan.jobs (the compute plan's source) is the DAG of `snakemake -n`: the
    same jobs, wildcards and GPU requests."""
    proc, *_ = snakemake(workdir, "--configfile", *configs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dag = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", proc.stdout, re.M):
        rule, body = m.groups()
        wc = re.search(r"^    wildcards: (.*)$", body, re.M)
        wc = dict(item.split("=", 1) for item in wc.group(1).split(", ")) if wc else {}
        gpu = re.search(r"^    resources: .*\bgpu=(\d+)", body, re.M)
        dag.append((rule, sorted(wc.items()), int(gpu.group(1)) if gpu else 0))
    cfg = plan.load_config([workdir / c for c in configs], SCHEMA)
    lib = [(j.rule, sorted(j.wildcards.items()), j.gpus) for j in plan.jobs(cfg)]
    assert sorted(lib) == sorted(dag)
    # The train jobs' SAEs are those of their commands.
    for j in plan.jobs(cfg):
        if j.rule == "train":
            out = f"results/checkpoints/{j.wildcards['dataset']}/{j.wildcards['group']}/"
            cmd = next(line for line in proc.stdout.splitlines()
                       if " train --activations " in line and f"--out '{out}" in line)
            args = shlex.split(cmd.removeprefix("Shell command: "))
            assert args[args.index("--arch") + 1].split(",") == [t.arch for t in j.trained]
            seeds = args[args.index("--seeds") + 1].split(",")
            assert all(t.saes == len(seeds) for t in j.trained)


def fake_isae(folder: Path) -> Path:
    """An `isae` executable that records its arguments (one JSON line per call, in
    $ISAE_ARGV) and makes the folder named by --out, instead of doing any work."""
    folder.mkdir()
    exe = folder / "isae"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import json, os, sys
        args = sys.argv[1:]
        with open(os.environ["ISAE_ARGV"], "a") as f:
            f.write(json.dumps(args) + "\\n")
        os.makedirs(args[args.index("--out") + 1])
    """))
    exe.chmod(0o755)
    return folder


def run_job(cwd: Path, bin_dir: Path, argv_log: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               ISAE_ARGV=str(argv_log))
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_config_values_reach_the_shell_as_one_argument_each(tmp_path):
    """A text path with spaces, a quote and a `;` arrives whole at `isae extract`, and
    nothing in it runs; a hook with shell syntax is refused before any job."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Snakefile", "environment.yml"):  # a finished job records its environment
        shutil.copy(ROOT / name, work / name)
    for folder in ("workflow", "config", "scripts"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = fake_isae(tmp_path / "bin")
    argv_log = tmp_path / "argv.jsonl"
    corpus = tmp_path / "it's my corpus; touch pwned"
    corpus.mkdir()
    proc = run_job(work, bin_dir, argv_log, "results/activations/minilm", "--config",
                   f'datasets={{minilm: {{extract: {{text: "{corpus}"}}}}}}')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (args,) = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert args[:4] == ["--threads", "2", "extract", "lm"]
    assert args[args.index("--text") + 1] == str(corpus)
    assert args[args.index("--hook") + 1] == "blocks.3.hook_resid_post"
    assert not list(tmp_path.rglob("pwned"))  # the `touch pwned` in the path never ran

    marker = tmp_path / "injected"
    argv_log.unlink()
    proc = run_job(work, bin_dir, argv_log, "--forceall", "results/activations/minilm", "--config",
                   f'datasets={{minilm: {{extract: {{hook: "$(touch {marker})blocks.3.hook_resid_post"}}}}}}')
    assert proc.returncode != 0
    assert "does not match" in proc.stdout + proc.stderr and "hook" in proc.stdout + proc.stderr
    assert not marker.exists() and not argv_log.exists()  # no job ran
