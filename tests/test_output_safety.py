"""Never touch what is not ours: an output never replaces a folder holding files isae did
not write (a home folder, even with --force), never overlaps an input, a table never goes
inside one, isae's own leftovers are found and removed; sizes that cannot fit are refused
before anything is allocated; and the other one-line refusals (deeply nested JSON, a
corrupt train log, a read-only folder, two trains on one --out, wrong shapes in the API, a
resume state of other settings, --threads far beyond the cores).

Every case is built in a scratch folder under pytest's tmp_path, with a fake HOME there,
and the trees that must not change are hashed before and after. Most cases run the
command line in-process (``main``); the ones whose point is the process itself (exit code,
one stderr line, its CPU time and peak memory) run it in a subprocess under an address-
space limit, so that a check that regressed fails the test instead of the machine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from isae.cli.main import main
from isae.data import atomic
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.data.ownership import RESUME_FILES, first_foreign, output_kind
from isae.data.sources import synthetic
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig
from isae.models.sparse_coder import SparseCoder

D, ATOMS, K = 8, 24, 2
#: The address-space limit of every subprocess: far above what isae needs to start (torch
#: included), far below what the refused sizes would take.
ADDRESS_SPACE = 8 << 30


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small synthetic set and a checkpoint of it; never modified (cases copy them)."""
    root = tmp_path_factory.mktemp("base")
    synthetic.extract(out=str(root / "set"), d=D, atoms=ATOMS, k=K, rows=1200,
                      rows_per_shard=400, seed=0)
    norm = ActivationSet(root / "set").normalizer()
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=D, d_sae=ATOMS, k=K, seed=1))
    checkpoint.save(m, root / "ck", norm, extra={"activations": {"hook": "blocks.0.hook_resid_post"}})
    return root


def fake_home(tmp: Path) -> Path:
    """A home folder as a user has one: dotfiles, a Python installation, documents."""
    home = tmp / "home" / "user"
    for rel, text in {".bashrc": "export PATH=$HOME/.local/bin:$PATH\n",
                      ".ssh/config": "Host *\n",
                      ".local/lib/python3.11/site-packages/pkg/__init__.py": "x = 1\n",
                      "Documents/notes.txt": "mine\n"}.items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(text)
    return home


def tree(path: Path) -> dict:
    """Every entry under ``path`` -> sha256 of a file, "dir" for a folder: equal trees hold
    the same names and bytes."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy(base: Path, name: str, tmp: Path, as_name: str | None = None) -> Path:
    dest = tmp / (as_name or name)
    shutil.copytree(base / name, dest)
    return dest


def refuse(capsys, argv: list[str], expect: str) -> str:
    """``isae -q ARGV`` in-process: exit 2, one stderr line containing ``expect``, no stdout."""
    capsys.readouterr()
    rc = main(["-q", *map(str, argv)])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isae") and expect in lines[0], cap.err
    assert cap.out == ""
    return lines[0]


def ok(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    rc = main(["-q", *map(str, argv)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


def train_args(acts, out, *more) -> list[str]:
    return ["train", "--activations", str(acts), "--arch", "topk", "--k", str(K), "--width",
            str(ATOMS), "--tokens", "2000", "--batch-size", "200", *map(str, more), "--out", str(out)]


def extract_args(out, *more) -> list[str]:
    return ["extract", "synthetic", "--d", "4", "--atoms", "8", "--k", "2", "--rows", "200",
            *map(str, more), "--out", str(out)]


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    """User plus system CPU time of the process itself."""
    max_rss: int
    """Peak resident memory, bytes."""


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_isae(*args, env: dict | None = None, cwd: Path | None = None) -> Proc:
    """``python -m isae -q ARGS`` in a subprocess under ADDRESS_SPACE, with its own CPU
    time and peak memory (os.wait4: this child's, not every child's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "isae", "-q", *map(str, args)], stdout=out,
                             stderr=err, env=env, cwd=cwd, preexec_fn=_limit_address_space)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Proc(p.returncode, out.read().decode(), err.read().decode(), wall,
                    usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def one_line_refusal(proc: Proc, expect: str) -> str:
    """Exit 2, one stderr line naming the problem, nothing on stdout, and cheap: under 10 s
    of the process's own CPU time (its wall clock on a shared machine depends on the other
    jobs) and under 1 GiB of peak memory (starting isae with torch takes ~0.4 GiB; each
    refused size needs tens of GB)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
    assert proc.stdout == ""
    assert proc.cpu_s < 10, proc.cpu_s
    assert proc.max_rss < 1 << 30, proc.max_rss
    return lines[0]


# ----------------------------------------------------------------------------- item 1: --force


def test_train_force_at_home_is_refused_and_home_unchanged(base, tmp_path):
    """The case that deleted a real home folder: ``isae train ... --out "$HOME" --force``."""
    home = fake_home(tmp_path)
    before = tree(home.parent)
    proc = run_isae(*train_args(base / "set", home, "--force"), env={"HOME": str(home)},
                    cwd=tmp_path)
    line = one_line_refusal(proc, "which isae did not write")
    assert f"--out {home} holds .bashrc" in line and "not even with --force" in line
    assert tree(home.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no lock, no leftovers


def _import_src(base: Path, tmp: Path) -> Path:
    from isae.data.export import export_saelens

    return export_saelens(checkpoint.load(base / "ck"), tmp / "saelens")


FOLDER_COMMANDS = {
    "extract": lambda b, t, out: extract_args(out, "--force"),
    "train": lambda b, t, out: train_args(b / "set", out, "--force"),
    "export": lambda b, t, out: ["export", b / "ck", "--format", "saelens", "--out", out, "--force"],
    "import": lambda b, t, out: ["import", _import_src(b, t), "--out", out],
    "measure": lambda b, t, out: ["measure", b / "ck", "--activations", b / "set", "--out", out],
    "lr-sweep": lambda b, t, out: ["lr-sweep", "--activations", b / "set", "--arch", "topk",
                                   "--k", K, "--width", ATOMS, "--tokens", 400, "--out", out],
}


@pytest.mark.parametrize("cmd", FOLDER_COMMANDS)
def test_no_folder_output_replaces_a_home_folder(cmd, base, tmp_path, capsys):
    home = fake_home(tmp_path)
    args = FOLDER_COMMANDS[cmd](base, tmp_path, home)
    before = tree(home.parent)
    line = refuse(capsys, args, "which isae did not write")
    assert "holds .bashrc" in line
    assert tree(home.parent) == before
    assert not list(home.parent.glob(".*"))  # no lock or temporary folder beside it


@pytest.mark.parametrize("cmd", ["extract", "train", "export"])
def test_a_file_of_the_user_inside_an_isae_output_is_named(cmd, base, tmp_path, capsys):
    """An output of the same kind is replaced, unless the user added a file to it: then
    the refusal names that file, with or without --force."""
    out = {"extract": lambda: copy(base, "set", tmp_path, "out"),
           "train": lambda: copy(base, "ck", tmp_path, "out"),
           "export": lambda: _import_src(base, tmp_path).rename(tmp_path / "out")}[cmd]()
    if cmd == "extract":
        (out / "truth" / "README").write_text("my notes\n")
    else:
        (out / "README").write_text("my notes\n")
    args = FOLDER_COMMANDS[cmd](base, tmp_path, out)
    before = tree(out)
    line = refuse(capsys, args, "which isae did not write")
    assert ("truth/README" if cmd == "extract" else "holds README") in line
    assert tree(out) == before


@pytest.mark.parametrize("kind,cmd", [("ck", "extract"), ("set", "train"), ("ck", "export")])
def test_force_replaces_an_isae_output_of_another_kind(kind, cmd, base, tmp_path, capsys):
    out = copy(base, kind, tmp_path, "out")
    args = [a for a in FOLDER_COMMANDS[cmd](base, tmp_path, out) if a != "--force"]
    what = {"ck": "a checkpoint", "set": "an activation set"}[kind]
    refuse(capsys, args, f"already exists and is {what}")
    ok(capsys, [*args, "--force"])
    assert output_kind(out) == {"extract": "activations", "train": "checkpoint",
                                "export": "saelens"}[cmd]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


def test_an_empty_folder_is_replaced_and_a_file_or_link_never(base, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(capsys, extract_args(empty))
    assert output_kind(empty) == "activations"
    f = tmp_path / "file"
    f.write_text("mine\n")
    refuse(capsys, extract_args(f, "--force"), "is a file, which isae never replaces")
    link = tmp_path / "link"
    link.symlink_to(empty)
    refuse(capsys, extract_args(link, "--force"), "is a symbolic link")
    assert f.read_text() == "mine\n" and link.is_symlink() and output_kind(empty) == "activations"


def test_resume_folder_of_user_files_is_never_deleted(base, tmp_path, capsys):
    rdir = tmp_path / "out.resume"
    rdir.mkdir()
    (rdir / "notes.txt").write_text("mine\n")
    (rdir / "state.safetensors").write_bytes(b"not a state")
    before = tree(rdir)
    line = refuse(capsys, train_args(base / "set", tmp_path / "out", "--force", "--no-resume"),
                  "holds notes.txt, which isae did not write")
    assert "resume state" in line
    assert tree(rdir) == before and not (tmp_path / "out").exists()
    # A resume folder isae made is removed when training ends.
    (rdir / "notes.txt").unlink()
    ok(capsys, train_args(base / "set", tmp_path / "out", "--no-resume"))
    assert not rdir.exists() and output_kind(tmp_path / "out") == "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_are_recognised_by_their_own_files(base, tmp_path, capsys):
    """Each writer's output is its kind; a file added anywhere in it is named."""
    from isae.data.export import export_saelens, export_sparsify

    ck = checkpoint.load(base / "ck")
    sl, sp = export_saelens(ck, tmp_path / "sl"), export_sparsify(ck, tmp_path / "sp")
    ok(capsys, ["measure", base / "ck", "--activations", base / "set", "--out", tmp_path / "m"])
    ok(capsys, FOLDER_COMMANDS["lr-sweep"](base, tmp_path, tmp_path / "lr"))
    seeds = tmp_path / "seeds"
    for s in ("topk/seed0", "topk/seed1"):
        shutil.copytree(base / "ck", seeds / s)
    kinds = {base / "set": "activations", base / "ck": "checkpoint", sl: "saelens",
             sp: "sparsify", tmp_path / "m": "measure", tmp_path / "lr": "lr-sweep",
             seeds: "checkpoints"}
    for path, kind in kinds.items():
        assert output_kind(path) == kind, path
        assert first_foreign(path) is None
    for path, inside in ((tmp_path / "lr", "ckpt/topk/x1/extra.bin"), (sp, "blocks.0.hook_resid_post/x"),
                         (seeds, "topk/seed1/x"), (tmp_path / "m", "x")):
        (path / inside).write_bytes(b"")
        assert output_kind(path) is None and first_foreign(path) == path / inside
    # A SAELens folder isae did not write (no isae_export record) is not isae's.
    cfg = json.loads((sl / "cfg.json").read_text())
    del cfg["isae_export"]
    (sl / "cfg.json").write_text(json.dumps(cfg))
    assert output_kind(sl) is None and first_foreign(sl) == sl / "cfg.json"
    # The resume state's file names are the trainer's.
    from isae.training.resume import LEGACY_FILE, STATE_FILE

    assert RESUME_FILES == {STATE_FILE, LEGACY_FILE}


# ----------------------------------------------------------------------------- item 2: overlap


def _lr_dir(tmp: Path) -> Path:
    d = tmp / "D"
    d.mkdir()
    (d / "lr.json").write_text(json.dumps({"lr": {"topk": 1e-3}}))
    (d / "notes.md").write_text("my notes\n")
    return d


OVERLAPS = {
    "export-activations": lambda b, t: ["export", b / "ck", "--format", "saelens", "--activations",
                                        copy(b, "set", t), "--out", t / "set", "--force"],
    "import-src": lambda b, t: ["import", _import_src(b, t), "--out", t / "saelens"],
    "import-parent": lambda b, t: ["import", _import_src(b, t), "--out", t],
    "train-lr-from": lambda b, t: train_args(b / "set", t / "D", "--lr-from", _lr_dir(t) / "lr.json",
                                             "--force"),
    "train-reuse": lambda b, t: train_args(b / "set", t / "R" / "topk", "--reuse",
                                           copy(b, "ck", t, "R"), "--force"),
    "train-reuse-holds": lambda b, t: train_args(b / "set", t / "R", "--reuse", _reused(b, t),
                                                 "--force"),
}


def _reused(base: Path, tmp: Path) -> Path:
    """R/x: a checkpoint inside the folder R that --out names."""
    (tmp / "R").mkdir()
    return copy(base, "ck", tmp / "R", "x")


@pytest.mark.parametrize("case", OVERLAPS)
def test_outputs_overlapping_an_input_are_refused(case, base, tmp_path, capsys):
    args = OVERLAPS[case](base, tmp_path)
    before = tree(tmp_path)
    refuse(capsys, args, "overlaps the input")
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- item 3: tables


TABLES_INSIDE = {
    "chance-shard": (lambda b, t: ["chance", "--activations", t / "set", "--width", 4,
                                   "--out", t / "set" / "part-00001.parquet"], "go inside it"),
    "eval-shard": (lambda b, t: ["eval", b / "ck", "--activations", t / "set",
                                 "--out", t / "set" / "part-00007.parquet"], "go inside it"),
    "match-summary": (lambda b, t: ["match", t / "ck", b / "ck", "--summary", t / "ck" / "s.parquet"],
                      "go inside it"),
    "measure-set": (lambda b, t: ["measure", b / "ck", "--activations", t / "set", "--out", t / "set"],
                    "overlaps the input"),
    "measure-ckpt": (lambda b, t: ["measure", t / "ck", "--activations", b / "set", "--out", t / "ck"],
                     "overlaps the input"),
    "lr-sweep-ckpt": (lambda b, t: FOLDER_COMMANDS["lr-sweep"](b, t, t / "ck"),
                      "already exists and is a checkpoint, not an lr-sweep folder"),
}


@pytest.mark.parametrize("case", TABLES_INSIDE)
def test_tables_never_go_inside_an_input(case, base, tmp_path, capsys):
    copy(base, "set", tmp_path)
    copy(base, "ck", tmp_path)
    make, expect = TABLES_INSIDE[case]
    before = tree(tmp_path)
    refuse(capsys, make(base, tmp_path), expect)
    assert tree(tmp_path) == before


def test_fidelity_table_never_inside_the_checkpoint(base, tmp_path, capsys):
    ck = copy(base, "ck", tmp_path)
    before = tree(ck)
    refuse(capsys, ["fidelity", ck, "--out", ck / "fidelity.parquet"], "go inside it")
    assert tree(ck) == before


def test_measure_out_an_existing_file(base, tmp_path, capsys):
    f = tmp_path / "tables"
    f.write_text("mine\n")
    refuse(capsys, ["measure", base / "ck", "--activations", base / "set", "--out", f], "is a file")
    assert f.read_text() == "mine\n"


# ----------------------------------------------------------------------------- item 4: leftovers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_leftovers_are_removed_and_said(tmp_path, capsys, caplog):
    dead = _dead_pid()
    out = tmp_path / "set"
    stale_tmp = tmp_path / f".set.tmp-{dead}"  # a killed extract's staging folder
    stale_tmp.mkdir()
    (stale_tmp / "part-00000.parquet").write_bytes(b"\0" * 1000)
    stale_old = tmp_path / f".set.old-{dead}"  # a replaced set, half deleted
    (stale_old / "truth").mkdir(parents=True)
    live = tmp_path / f".set.tmp-{os.getppid()}"  # a running process's: never touched
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}"  # another output's: not this run's to judge
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="isae.data.atomic"):
        ok(capsys, extract_args(out))
    assert not stale_tmp.exists() and not stale_old.exists()
    assert live.is_dir() and other.is_dir() and output_kind(out) == "activations"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f".set.tmp-{dead}" in said and f".set.old-{dead}" in said and f"process {dead} is gone" in said


def test_replacement_interrupted_while_deleting_the_old_folder(tmp_path, capsys, monkeypatch):
    """Ctrl-C (or a kill) while the replaced folder is being deleted: the new folder is in
    place and the old one is a recognisable leftover, which the next run removes."""
    out = tmp_path / "set"
    ok(capsys, extract_args(out))
    real = atomic._remove

    def interrupted(path):
        if ".old-" in path.name and path.exists():
            next(path.rglob("*.parquet")).unlink()  # half deleted
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(atomic, "_remove", interrupted)
    assert main(["-q", *extract_args(out, "--seed", "3")]) == 130
    monkeypatch.undo()
    old = tmp_path / f".set.old-{os.getpid()}"
    assert old.is_dir() and json.loads((out / "meta.json").read_text())["seed"] == 3
    # The next run (here: of another process, once this one is gone) removes it.
    old.rename(tmp_path / f".set.old-{_dead_pid()}")
    ok(capsys, extract_args(out, "--seed", "4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_publish_puts_the_old_folder_back_when_the_new_cannot_go_in(tmp_path, monkeypatch):
    out, stage = tmp_path / "out", tmp_path / ".out.tmp-1"
    out.mkdir()
    (out / "a").write_text("old\n")
    stage.mkdir()
    real = os.replace

    def fail_second(src, dst):
        if Path(src) == stage:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_second)
    with pytest.raises(OSError):
        atomic.publish(stage, out)
    assert (out / "a").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]


@pytest.mark.slow
def test_killed_extract_leftover_is_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "big"
    p = subprocess.Popen(
        [sys.executable, "-m", "isae", "-q", "extract", "synthetic", "--d", "32", "--atoms", "64",
         "--k", "2", "--rows", "20000000", "--rows-per-shard", "500", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, preexec_fn=_limit_address_space)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".big.tmp-*/part-00002.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / f".big.tmp-{p.pid}").is_dir()
    proc = run_isae("extract", "synthetic", "--d", "4", "--atoms", "8", "--k", "2", "--rows",
                    "100", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f".big.tmp-{p.pid}, left by an interrupted isae run" in proc.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["big"]


# ----------------------------------------------------------------------------- item 8: limits


LIMITS = {
    "batch-size": (lambda s, o: train_args(s, o, "--batch-size", 10**12), "a batch's pre-activations"),
    "shuffle-buffer": (lambda s, o: train_args(s, o, "--shuffle-buffer", 10**11), "the shuffle buffer"),
    "width": (lambda s, o: train_args(s, o, "--width", 1 << 26), "1 model with optimiser state"),
    "tokens": (lambda s, o: train_args(s, o, "--tokens", 10**18, "--batch-size", 2),
               "optimiser steps, more than any run can take"),
    "synthetic-atoms": (lambda s, o: ["extract", "synthetic", "--d", 131072, "--atoms", 1 << 26,
                                      "--k", 2, "--rows", 100, "--out", o], "the true dictionary"),
    "synthetic-rows": (lambda s, o: ["extract", "synthetic", "--d", 8, "--atoms", 24, "--k", 2,
                                     "--rows", 10**15, "--out", o], "lower --rows"),
    "chance-draws": (lambda s, o: ["chance", "--activations", s, "--width", 24, "--draws", 10**9,
                                   "--out", f"{o}.parquet"], "the table of draws"),
    "threads": (lambda s, o: ["--threads", 100000, *train_args(s, o)], "--threads 100000 is more than"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", LIMITS)
def test_sizes_that_cannot_fit_are_refused_before_allocation(case, base, tmp_path):
    make, expect = LIMITS[case]
    args = make(base / "set", tmp_path / "out")
    proc = run_isae(*args, cwd=tmp_path)
    line = one_line_refusal(proc, expect)
    assert "Traceback" not in proc.stderr and line.startswith("isae")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_threads_far_beyond_the_cores_is_one_line(capsys):
    line = refuse(capsys, ["--threads", "100000", "eval", "x", "--activations", "y"],
                  "--threads 100000")
    assert f"{os.cpu_count()} CPU cores" in line
    assert torch.get_num_threads() <= 4 * (os.cpu_count() or 1)


@pytest.mark.parametrize("arch", ["topk", "isae", "dl"])
def test_memory_estimate_is_a_lower_bound_of_what_training_holds(arch):
    """The footprint counts parameters, gradients, Adam's moments and the initial decoder:
    against the bytes a real stepper holds after one step, it is at most that, and misses
    only the bias vectors (an SAE) or nothing (dictionary learning: W_dec, A, B)."""
    from isae.models.compute import select_ops
    from isae.training import footprint
    from isae.training.steppers import Run

    cfg = SAEConfig.from_arch(arch, d_in=D, d_sae=ATOMS, k=K, seed=0)
    run = Run(cfg, TrainConfig(tokens=64, batch_size=32), Path("unused"), torch.device("cpu"),
               select_ops(torch.device("cpu")))
    x = torch.randn(32, D)
    run.stepper.step(x, 1.0, None)
    held = [p for p in run.model.parameters()]
    held += [p.grad for p in run.model.parameters() if p.grad is not None]
    if arch == "dl":
        held = [run.model.W_dec, run.stepper.A, run.stepper.B]
    else:
        held += [t for s in run.stepper.opt.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.ndim > 0]
        held.append(run.initial_decoder())
    actual = sum(t.numel() * t.element_size() for t in held)
    estimate = footprint.model_bytes(cfg)
    biases = 0 if arch == "dl" else 4 * 4 * sum(p.numel() for p in run.model.parameters() if p.ndim == 1)
    assert estimate == actual - biases, (estimate, actual, biases)


def test_check_memory_refuses_what_is_not_available(monkeypatch):
    from isae import limits

    monkeypatch.setattr(limits, "host_available_bytes", lambda: 10**9)
    limits.check_memory({"a": 6 * 10**8, "b": 4 * 10**8}, "cpu", "lower it")
    with pytest.raises(UserError, match=r"needs at least 1\.0 GB of memory \(b 500\.0 MB, a 500\.0 MB\), "
                                        r"but the host has 1\.0 GB available: lower it"):
        limits.check_memory({"a": 5 * 10**8, "b": 5 * 10**8 + 1}, "cpu", "lower it")
    assert limits.host_available_bytes() == 10**9


def test_check_memory_on_a_cuda_device_names_it(monkeypatch):
    """The device branch, without a GPU: its free memory is what the device reports."""
    from isae import limits

    monkeypatch.setattr(limits, "device_available_bytes", lambda device: 2 * 10**9)
    with pytest.raises(UserError, match=r"but cuda:0 has 2\.0 GB free: lower it"):
        limits.check_memory({"models": 3 * 10**9}, "cuda:0", "lower it")


def test_host_memory_is_read_from_the_kernel():
    from isae.limits import host_available_bytes

    have = host_available_bytes()
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    total = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < have <= total


# ----------------------------------------------------------------------------- item 9: JSON


def _deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("which", ["cfg", "meta", "lr", "meta-digits"])
def test_deeply_nested_json_is_one_line(which, base, tmp_path, capsys):
    if which == "cfg":
        ck = copy(base, "ck", tmp_path)
        (ck / "cfg.json").write_text(_deep())
        refuse(capsys, ["eval", ck, "--activations", base / "set"], "nests too deeply")
    elif which.startswith("meta"):
        s = copy(base, "set", tmp_path)
        (s / "meta.json").write_text(_deep() if which == "meta" else '{"d": ' + "9" * 5000 + "}")
        refuse(capsys, train_args(s, tmp_path / "out"), "meta.json")
        assert not (tmp_path / "out").exists()
    else:
        lr = tmp_path / "lr.json"
        lr.write_text('{"lr": ' + _deep() + "}")
        refuse(capsys, train_args(base / "set", tmp_path / "out", "--lr-from", lr), "nests too deeply")


# ----------------------------------------------------------------------------- item 10


def test_corrupt_or_foreign_train_log_in_measure(base, tmp_path, capsys):
    import pandas as pd

    ck = tmp_path / "ck"
    ok(capsys, train_args(base / "set", ck))
    log = ck / "train_log.parquet"
    good = log.read_bytes()
    log.write_bytes(good[: len(good) // 2])
    args = ["measure", ck, "--activations", base / "set", "--out", tmp_path / "m"]
    refuse(capsys, args, "train_log.parquet is not a readable Parquet table")
    pd.DataFrame({"step": ["a", "b"], "loss": [1.0, 2.0]}).to_parquet(log)
    refuse(capsys, args, "has no numeric column 'step'")
    log.write_bytes(good)
    ok(capsys, args)


def test_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only file system (simulated: the tests may run as root, which ignores modes)."""
    from isae.data import activations

    def read_only(table, where, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(where))

    monkeypatch.setattr(activations.pq, "write_table", read_only)
    line = refuse(capsys, extract_args(tmp_path / "set"), "Read-only file system")
    assert "cannot write" in line
    assert list(tmp_path.iterdir()) == []


def test_two_trains_on_one_out_in_process(base, tmp_path, capsys):
    out = tmp_path / "out"
    with atomic.output_lock([out]):  # as a running train holds it
        line = refuse(capsys, train_args(base / "set", out), "is writing")
    assert f"another isae run (process {os.getpid()})" in line
    assert not out.exists() and not (tmp_path / "out.resume").exists()
    ok(capsys, train_args(base / "set", out))  # released: the next run goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_two_trains_on_one_out(base, tmp_path, capsys):
    out = tmp_path / "out"
    args = train_args(base / "set", out, "--checkpoint-every", "5", "--checkpoint-seconds", "0")
    args[args.index("--tokens") + 1] = "4000000"
    first = subprocess.Popen([sys.executable, "-m", "isae", "-q", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_limit_address_space,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "out.resume" / "state.safetensors").exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        line = refuse(capsys, args, "is writing")
        assert f"(process {first.pid})" in line
        assert (tmp_path / "out.resume" / "state.safetensors").is_file()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143


def test_resume_state_of_other_tokens_names_the_setting(base, tmp_path, capsys, monkeypatch):
    from isae.training import trainer

    real = trainer._save_state

    def save_then_crash(rdir, state):
        real(rdir, state)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer, "_save_state", save_then_crash)
    cfg = SAEConfig.from_arch("topk", d_in=D, d_sae=ATOMS, k=K)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(base / "set", cfg, TrainConfig(tokens=4000, batch_size=200, checkpoint_every=5, checkpoint_seconds=0),
                      tmp_path / "out")
    monkeypatch.undo()
    # Fewer tokens than the state's step: once refused as "unreadable or corrupt".
    line = refuse(capsys, ["train", "--activations", base / "set", "--arch", "topk", "--k", K,
                           "--width", ATOMS, "--tokens", 600, "--batch-size", 200,
                           "--checkpoint-every", 5, "--checkpoint-seconds", "0", "--seed", 0, "--out", tmp_path / "out"],
                  "belongs to another configuration")
    assert "training setting tokens is 4000 there, 600 here" in line and "corrupt" not in line


def test_api_refuses_wrong_shapes(base):
    import isae

    sae = isae.load(base / "ck")
    x = torch.randn(4, 2 * D)  # as many numbers as 8 rows of d: a reshape would take it
    for call, arg in ((sae.encode, x), (sae.forward, x), (sae.encode_sparse, x[:, :D].reshape(-1)),
                      (sae.decode, torch.randn(3, ATOMS + 1))):
        with pytest.raises(UserError, match="has shape"):
            call(arg)
    x3 = torch.randn(2, 3, D)  # any leading shape with the right width is taken
    z = sae.encode(x3)
    assert z.shape == (2, 3, ATOMS)
    torch.testing.assert_close(sae.decode(z), sae(x3))


@pytest.mark.slow
def test_splice_refuses_an_sae_of_another_width(tmp_path):
    """A d 16 SAE at MiniLM's 384-d residual hook: refused when the hooks are made."""
    import isae
    from isae.data.activations import Normalizer

    m = SparseCoder(SAEConfig.from_arch("topk", d_in=16, d_sae=32, k=2, seed=0))
    checkpoint.save(m, tmp_path / "ck16", Normalizer(np.zeros(16, np.float32), 1.0),
                    extra={"activations": {"hook": "blocks.3.hook_resid_post"}})
    model = isae.load_model("all-MiniLM-L6-v2")
    with pytest.raises(UserError, match=r"width 384, but .* takes d_in=16"):
        isae.splice(model, isae.load(tmp_path / "ck16"))
