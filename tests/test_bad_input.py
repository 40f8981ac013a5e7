"""Bad input and faults against the real command line: each case runs ``python -m isae`` in
a subprocess and asserts exit code 2, one stderr line naming the problem, and nothing left
behind (no output, no temporary folder, the inputs unchanged).

Also the data-loss and security cases (an ``--out`` that would delete what is there, a
planted resume pickle, a hook name that escapes ``--out``, resuming on other data), each
with its own test, SIGTERM during extract, and a full disk at every write (in-process,
with the write replaced by one that fails as a full disk does).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from isae.cli.main import main
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.data.sources import synthetic
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder

D, ATOMS, K = 8, 24, 2


def isae(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "isae", "-q", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tree(path: Path) -> dict:
    """Every file under ``path`` (itself if a file) -> its sha256: to prove nothing changed."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files or folders of a writer (``.NAME.tmp-PID``, ``.NAME.old-PID``)."""
    found = []
    for f in folders:
        found += [p for p in Path(f).rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    return found


def one_line(proc: subprocess.CompletedProcess, expect: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("isae") and expect in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


# ----------------------------------------------------------------------------- valid inputs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small synthetic set (3 shards), a checkpoint of it, and a bigger checkpoint (for
    truncation); written once, never modified by a case (cases copy what they change)."""
    root = tmp_path_factory.mktemp("base")
    synthetic.extract(out=str(root / "set"), d=D, atoms=ATOMS, k=K, rows=1200,
                      rows_per_shard=400, seed=0)
    norm = ActivationSet(root / "set").normalizer()
    for name, width in (("ck", ATOMS), ("big", 512)):
        m = SparseCoder(SAEConfig.from_arch("topk", d_in=D, d_sae=width, k=K, seed=1))
        checkpoint.save(m, root / name, norm, extra={"activations": {"hook": "blocks.0.hook_resid_post"}})
    return root


def copy(base: Path, name: str, tmp: Path) -> Path:
    shutil.copytree(base / name, tmp / name)
    return tmp / name


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    obj = json.loads(path.read_text())
    new = fn(obj)
    path.write_text(json.dumps(obj if new is None else new))


def edit_shards(set_dir: Path, fn: Callable[[pa.Table], pa.Table]) -> None:
    for p in sorted(set_dir.glob("part-*.parquet")):
        pq.write_table(fn(pq.read_table(p)), p)


def x_as(dtype) -> Callable[[pa.Table], pa.Table]:
    def fn(t: pa.Table) -> pa.Table:
        x = t.column("x").combine_chunks()
        vals = x.values.to_numpy(zero_copy_only=False).astype(dtype)
        return t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(pa.array(vals), D))
    return fn


def set_column(name: str, make: Callable[[int], pa.Array]) -> Callable[[pa.Table], pa.Table]:
    def fn(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index(name)
        return t.set_column(i, name, make(t.num_rows))
    return fn


def edit_tensors(ck: Path, fn: Callable[[dict], None]) -> None:
    t = load_file(str(ck / "sae.safetensors"))
    fn(t)
    save_file(t, str(ck / "sae.safetensors"))


def nan_in_wdec(t: dict) -> None:
    t["W_dec"][3, 1] = float("nan")


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    make: Callable[[Path, Path], list[str]]
    """(base, tmp) -> the arguments; writes the bad input under tmp."""
    expect: str
    """What the one line must contain (it names the problem)."""


def train_args(acts: str, out: str, *more: str) -> list[str]:
    return ["train", "--activations", acts, "--arch", "topk", "--k", str(K), "--width",
            str(ATOMS), "--tokens", "2000", "--batch-size", "200", *more, "--out", out]


def bad_cfg(fn, cmd="eval"):
    def make(b, t):
        ck = copy(b, "ck", t)
        edit_json(ck / "cfg.json", fn)
        if cmd == "eval":
            return ["eval", str(ck), "--activations", str(b / "set")]
        return ["export", str(ck), "--format", "saelens", "--out", str(t / "out")]
    return make


def bad_tensors(fn, cmd="eval"):
    def make(b, t):
        ck = copy(b, "ck", t)
        edit_tensors(ck, fn)
        if cmd == "eval":
            return ["eval", str(ck), "--activations", str(b / "set")]
        if cmd == "match":
            return ["match", str(ck), str(b / "ck")]
        return ["ric", str(ck), "--activations", str(b / "set"), "--pairs", "10"]
    return make


def truncated(size):
    def make(b, t):
        ck = copy(b, "big", t)
        f = ck / "sae.safetensors"
        f.write_bytes(f.read_bytes()[:size])
        return ["eval", str(ck), "--activations", str(b / "set")]
    return make


def bad_export(fmt: str, fn: Callable[[Path], None]):
    """A SAELens or sparsify export of the checkpoint, broken by ``fn``, read by eval."""
    def make(b, t):
        from isae.data.export import export_saelens, export_sparsify

        write = export_saelens if fmt == "saelens" else export_sparsify
        out = write(checkpoint.load(b / "ck"), t / fmt)
        fn(out)
        return ["eval", str(out), "--activations", str(b / "set")]
    return make


def truncate_file(name: str, size: int) -> Callable[[Path], None]:
    def fn(folder: Path) -> None:
        f = next(folder.rglob(name))
        f.write_bytes(f.read_bytes()[:size])
    return fn


def nan_in_file(name: str, key: str) -> Callable[[Path], None]:
    def fn(folder: Path) -> None:
        f = next(folder.rglob(name))
        t = load_file(str(f))
        t[key][0, 0] = float("nan")
        save_file(t, str(f))
    return fn


def bad_meta(fn, cmd="train"):
    def make(b, t):
        s = copy(b, "set", t)
        edit_json(s / "meta.json", fn)
        if cmd == "train":
            return train_args(str(s), str(t / "out"))
        return ["eval", str(b / "ck"), "--activations", str(s)]
    return make


def bad_shards(fn, cmd="train"):
    def make(b, t):
        s = copy(b, "set", t)
        edit_shards(s, fn)
        if cmd == "train":
            return train_args(str(s), str(t / "out"))
        return ["eval", str(b / "ck"), "--activations", str(s)]
    return make


def cli(*args):
    """Arguments with {set}, {ck} and {out} filled in."""
    def make(b, t):
        return [a.format(set=b / "set", ck=b / "ck", out=t / "out", seed="{seed}") for a in args]
    return make


def all_held_out(meta_too: bool):
    def make(b, t):
        s = copy(b, "set", t)
        edit_shards(s, set_column("heldout", lambda n: pa.array(np.ones(n, bool))))
        if meta_too:
            edit_json(s / "meta.json", lambda m: m.update(train_rows=0, heldout_rows=m["rows"]))
        else:
            edit_json(s / "meta.json", lambda m: {k: v for k, v in m.items()
                                                  if k not in ("train_rows", "heldout_rows")})
        return train_args(str(s), str(t / "out"))
    return make


def zero_rows(b, t):
    s = copy(b, "set", t)
    edit_shards(s, lambda tb: tb.slice(0, 0))
    edit_json(s / "meta.json", lambda m: m.update(rows=0, train_rows=0, heldout_rows=0))
    return train_args(str(s), str(t / "out"))


def truncated_shard(b, t):
    """A shard cut short after extraction: meta.json's rows no longer match the shards."""
    s = copy(b, "set", t)
    edit_shards(s, lambda tb: tb.slice(0, tb.num_rows - 7))
    return train_args(str(s), str(t / "out"))


def missing_heldout(b, t):
    s = copy(b, "set", t)
    edit_shards(s, lambda tb: tb.drop_columns(["heldout"]))
    return train_args(str(s), str(t / "out"))


def garbage_state(kind: str):
    def make(b, t):
        r = t / "out.resume"
        r.mkdir()
        f = r / "state.safetensors"
        if kind == "bytes":
            f.write_bytes(os.urandom(3000))
        elif kind == "empty":
            f.write_bytes(b"")
        else:  # a valid safetensors file that is not a resume state
            save_file({"a": torch.zeros(3)}, str(f), metadata={"isae_resume": "{[", "format": "1"})
        return train_args(str(b / "set"), str(t / "out"))
    return make


CASES = [
    # cfg.json (item 8) and bounds (item 6)
    Case("cfg-list", bad_cfg(lambda c: []), "is not a JSON object"),
    Case("cfg-no-k", bad_cfg(lambda c: c.pop("k") and None), "lacks the required key 'k'"),
    Case("cfg-k-string", bad_cfg(lambda c: c.update(k="4")), "k must be an integer"),
    Case("cfg-k-width", bad_cfg(lambda c: c.update(k=ATOMS)), "k must satisfy"),
    Case("cfg-steps-huge", bad_cfg(lambda c: c.update(encoder_steps=10**9)), "encoder_steps must be in"),
    Case("cfg-mean-length", bad_cfg(lambda c: c["normalization"].update(mean=[0.0] * 3)),
         "normalization mean must be a list of d_in=8"),
    Case("cfg-scale-zero", bad_cfg(lambda c: c["normalization"].update(scale=0)),
         "normalization scale must be a positive"),
    Case("cfg-d-in", bad_cfg(lambda c: c.update(d_in=9)), "cfg.json says 24x9, tensors 24x8"),
    Case("cfg-signed-string", bad_cfg(lambda c: c.update(signed="yes"), "export"),
         "signed must be true or false"),
    # tensors (items 7, 9)
    Case("safetensors-4000", truncated(4000), "is not a readable safetensors file"),
    Case("safetensors-5", truncated(5), "is not a readable safetensors file"),
    Case("safetensors-0", truncated(0), "is not a readable safetensors file"),
    Case("nan-eval", bad_tensors(nan_in_wdec), "tensor W_dec holds NaN or Inf"),
    Case("nan-match", bad_tensors(nan_in_wdec, "match"), "tensor W_dec holds NaN or Inf"),
    Case("nan-ric", bad_tensors(nan_in_wdec, "ric"), "tensor W_dec holds NaN or Inf"),
    Case("wenc-shape", bad_tensors(lambda t: t.update(W_enc=torch.zeros(D, 5))),
         "W_enc has shape [8, 5], expected [8, 24]"),
    # the same through the SAELens and sparsify readers
    Case("saelens-truncated", bad_export("saelens", truncate_file("sae_weights.safetensors", 100)),
         "is not a readable SAELens or sparsify checkpoint"),
    Case("sparsify-nan", bad_export("sparsify", nan_in_file("sae.safetensors", "W_dec")),
         "tensor W_dec holds NaN or Inf"),
    # meta.json (items 10, 15)
    Case("meta-d-string", bad_meta(lambda m: m.update(d="sixteen")), "d must be an integer"),
    Case("meta-d-huge", bad_meta(lambda m: m.update(d=10**12)), "d must be an integer in [1,"),
    Case("meta-d-other", bad_meta(lambda m: m.update(d=16, mean=[0.0] * 16)),
         "expected fixed_size_list<float32 or float16>[16]"),
    Case("meta-rows-float", bad_meta(lambda m: m.update(rows=1e12)), "rows must be a non-negative integer"),
    Case("meta-scale-zero", bad_meta(lambda m: m.update(scale=0)), "scale must be a positive finite"),
    Case("meta-list", bad_meta(lambda m: [], "eval"), "is not a JSON object"),
    Case("meta-shards", bad_meta(lambda m: m.update(shards=4)), "lists 4 shards but the folder holds 3"),
    Case("shard-truncated", truncated_shard, "shards hold"),
    Case("meta-rows-more", bad_meta(lambda m: m.update(rows=m["rows"] + 5, train_rows=None,
                                                       heldout_rows=None)), "meta.json says"),
    # shards (items 15, 16)
    Case("x-int32", bad_shards(x_as(np.int32)), "column x is fixed_size_list<element: int32>"),
    Case("x-float64", bad_shards(x_as(np.float64), "eval"), "column x is fixed_size_list<element: double>"),
    Case("heldout-strings", bad_shards(set_column("heldout", lambda n: pa.array(["no"] * n))),
         "column heldout is string, expected bool"),
    Case("heldout-missing", missing_heldout, "has no column 'heldout'"),
    # hangs (item 5)
    Case("all-held-out", all_held_out(True), "has no training rows"),
    Case("all-held-out-no-counts", all_held_out(False), "has no training rows"),
    Case("zero-rows", zero_rows, "has no training rows"),
    # numbers on the command line (items 11, 15)
    Case("checkpoint-every-0", cli(*train_args("{set}", "{out}", "--checkpoint-every", "0")),
         "--checkpoint-every must be >= 1"),
    Case("checkpoint-seconds-negative",
         cli(*train_args("{set}", "{out}", "--checkpoint-seconds", "-1")),
         "--checkpoint-seconds must be a finite number >= 0"),
    Case("log-every-0", cli(*train_args("{set}", "{out}", "--log-every", "0")), "--log-every must be >= 1"),
    Case("lr-negative", cli(*train_args("{set}", "{out}", "--lr", "-1")), "--lr must be a finite number > 0"),
    Case("lr-nan", cli(*train_args("{set}", "{out}", "--lr", "nan")), "--lr must be a finite number > 0"),
    Case("device-bogus", cli(*train_args("{set}", "{out}", "--device", "bogus")), "unknown device 'bogus'"),
    Case("width-0", cli(*train_args("{set}", "{out}", "--width", "0")), "width (d_sae) must be in [1,"),
    Case("seeds-twice", cli(*train_args("{set}", "{out}-{seed}", "--seeds", "1,1")), "names a seed twice"),
    Case("eval-batch-0", cli("eval", "{ck}", "--activations", "{set}", "--batch-size", "0"),
         "--batch-size must be a positive integer"),
    Case("match-block-0", cli("match", "{ck}", "{ck}", "--block", "0"), "--block must be a positive integer"),
    Case("extract-k-atoms", cli("extract", "synthetic", "--d", "4", "--atoms", "6", "--k", "6",
                                "--rows", "100", "--out", "{out}"), "--k must satisfy 1 <= k < atoms"),
    Case("extract-seed", cli("extract", "synthetic", "--d", "4", "--atoms", "6", "--k", "2",
                             "--rows", "100", "--seed", "-1", "--out", "{out}"), "--seed must be in [0,"),
    Case("argparse", cli("train", "--k", "x"), "invalid int value: 'x'"),
    # a table --out that would replace an input's file, or a file that is not a table
    Case("table-out-input", lambda b, t: ["eval", str(copy(b, "ck", t)), "--activations", str(b / "set"),
                                          "--out", str(t / "ck" / "cfg.json")],
         "would replace the input"),
    Case("table-out-other-file", lambda b, t: [(t / "notes.txt").write_text("keep") and "eval",
                                               str(b / "ck"), "--activations", str(b / "set"),
                                               "--out", str(t / "notes.txt")],
         "exists and is not a Parquet table"),
    # resume state (item 12)
    Case("state-bytes", garbage_state("bytes"), "pass --no-resume to start afresh"),
    Case("state-empty", garbage_state("empty"), "pass --no-resume to start afresh"),
    Case("state-header", garbage_state("header"), "pass --no-resume to start afresh"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, base, tmp_path):
    before = tree(base)
    args = case.make(base, tmp_path)
    inputs = {p.name: tree(p) for p in tmp_path.iterdir()}
    proc = isae(*args, timeout=60)  # a hang fails here instead of blocking the suite
    one_line(proc, case.expect)
    assert not (tmp_path / "out").exists()
    assert not leftovers(tmp_path, base)
    assert tree(base) == before
    assert {p.name: tree(p) for p in tmp_path.iterdir() if p.name in inputs} == inputs


# ----------------------------------------------------------------------------- data loss


def test_out_never_the_current_folder_or_above(base, tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    sub = tmp_path / "sub"
    sub.mkdir()
    for cwd, out in ((tmp_path, "."), (sub, "..")):
        proc = isae("export", str(base / "ck"), "--format", "saelens", "--out", out, "--force",
                    cwd=cwd)
        one_line(proc, f"--out {out} is the current folder or a folder above it")
    assert (tmp_path / "precious.txt").read_text() == "keep" and sub.is_dir()


def test_out_never_the_input_even_with_force(base, tmp_path):
    s = copy(base, "set", tmp_path)
    before = tree(s)
    for out in (s, tmp_path, s / "truth"):  # the set, a folder holding it, a folder in it
        proc = isae(*train_args(str(s), str(out), "--force"))
        one_line(proc, "overlaps the input")
    assert tree(s) == before
    ck = copy(base, "ck", tmp_path)
    proc = isae("export", str(ck), "--format", "saelens", "--out", str(ck), "--force")
    one_line(proc, "overlaps the input")
    assert tree(ck) == tree(base / "ck")  # same names and bytes as the original


@pytest.mark.parametrize("cmd", ["extract", "train", "export"])
def test_folder_of_other_files_is_never_replaced(cmd, base, tmp_path):
    """Not even with --force (tests/test_output_safety.py has the rest of the rule)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    args = {
        "extract": ["extract", "synthetic", "--d", "4", "--atoms", "8", "--k", "2", "--rows", "200",
                    "--out", str(out)],
        "train": train_args(str(base / "set"), str(out)),
        "export": ["export", str(base / "ck"), "--format", "sparsify", "--out", str(out)],
    }[cmd]
    for force in ((), ("--force",)):
        one_line(isae(*args, *force), "holds precious.txt, which isae did not write")
    assert (out / "precious.txt").read_text() == "keep"
    assert not leftovers(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_same_kind_is_replaced_and_kinds_are_told_apart(base, tmp_path, capsys):
    from isae.data.ownership import output_kind as layout_kind

    out = str(tmp_path / "set")
    args = ["-q", "extract", "synthetic", "--d", "4", "--atoms", "8", "--k", "2", "--rows", "200"]
    assert main([*args, "--out", out]) == 0
    assert main([*args, "--seed", "3", "--out", out]) == 0  # an activation set: replaced
    assert json.loads((tmp_path / "set" / "meta.json").read_text())["seed"] == 3
    assert layout_kind(tmp_path / "set") == "activations"
    assert layout_kind(base / "ck") == "checkpoint"
    # A folder of checkpoints (one per seed) is not a sparsify export, so exporting over it
    # needs --force; a real sparsify export is recognised.
    seeds = tmp_path / "seeds"
    for s in ("seed0", "seed1"):
        shutil.copytree(base / "ck", seeds / s)
    assert layout_kind(seeds) == "checkpoints"
    assert main(["-q", "export", str(base / "ck"), "--format", "sparsify", "--out", str(seeds)]) == 2
    assert "is a folder of checkpoints, not a sparsify export" in capsys.readouterr().err
    assert main(["-q", "export", str(base / "ck"), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 0
    assert layout_kind(tmp_path / "sp") == "sparsify"
    assert main(["-q", "export", str(base / "ck"), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 0
    assert layout_kind(tmp_path / "sl") == "saelens"


# ----------------------------------------------------------------------------- security


class _Evil:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_resume_pickle_never_runs(base, tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    rdir = tmp_path / "out.resume"
    rdir.mkdir()
    (rdir / "state.pt").write_bytes(pickle.dumps(_Evil(marker)))
    line = one_line(isae(*train_args(str(base / "set"), str(tmp_path / "out"))), "state.pt")
    assert "pass --no-resume" in line and "pickle" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The work-around the message names: a fresh run, which also removes the planted file.
    proc = isae(*train_args(str(base / "set"), str(tmp_path / "out"), "--no-resume"))
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists() and not rdir.exists()
    assert (tmp_path / "out" / "sae.safetensors").is_file()


@pytest.mark.parametrize("hook", ["../../escaped", "ABS", "..", "a/b"])
def test_export_hook_name_cannot_escape_out(hook, base, tmp_path):
    if hook == "ABS":
        hook = str(tmp_path / "abs_escaped")
    ck = copy(base, "ck", tmp_path)
    edit_json(ck / "cfg.json", lambda c: c["activations"].update(hook=hook))
    out = tmp_path / "exp" / "out"
    one_line(isae("export", str(ck), "--format", "sparsify", "--out", str(out)),
             "cannot name a folder inside --out")
    assert not out.exists() and not leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "exp"]
    assert not list((tmp_path / "exp").iterdir())
    assert not any("escaped" in p.name for p in tmp_path.parent.rglob("*escaped*"))


def _crash_after_saves(monkeypatch, n: int) -> None:
    """Make training stop (as a kill would) right after its n-th resume save."""
    from isae.training import trainer

    real = trainer._save_state
    count = {"n": 0}

    def save_then_crash(rdir, state):
        real(rdir, state)
        count["n"] += 1
        if count["n"] == n:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer, "_save_state", save_then_crash)


def test_resume_refuses_other_data(base, tmp_path, monkeypatch):
    from isae.models.config import TrainConfig
    from isae.training.trainer import train

    s = tmp_path / "set"
    synthetic.extract(out=str(s), d=D, atoms=ATOMS, k=K, rows=1200, rows_per_shard=400, seed=0)
    cfg = SAEConfig.from_arch("topk", d_in=D, d_sae=ATOMS, k=K)
    tcfg = TrainConfig(tokens=4000, batch_size=200, checkpoint_every=5, checkpoint_seconds=0, lr=1e-2)
    _crash_after_saves(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(s, cfg, tcfg, tmp_path / "out")
    monkeypatch.undo()
    state = tmp_path / "out.resume" / "state.safetensors"
    assert state.is_file()
    # The same path, regenerated from another seed: same shape, other rows.
    synthetic.extract(out=str(s), d=D, atoms=ATOMS, k=K, rows=1200, rows_per_shard=400, seed=1)
    args = ["train", "--activations", str(s), "--arch", "topk", "--k", str(K), "--width", str(ATOMS),
            "--tokens", "4000", "--batch-size", "200", "--checkpoint-every", "5", "--checkpoint-seconds", "0", "--lr", "1e-2",
            "--out", str(tmp_path / "out")]
    line = one_line(isae(*args), "was made on other data")
    assert "pass --no-resume" in line and state.is_file()


@pytest.mark.parametrize("arch", ["dl", "topk"])
def test_resume_round_trip_is_bit_exact(arch, base, tmp_path, monkeypatch):
    """Both steppers (Adam on an SAE, online dictionary learning with its generator) come
    back from the pickle-free state exactly: a crashed-and-resumed run equals an
    uninterrupted one bit for bit."""
    import pandas as pd

    from isae.models.config import TrainConfig
    from isae.training.trainer import train

    cfg = SAEConfig.from_arch(arch, d_in=D, d_sae=ATOMS, k=K, seed=2)
    tcfg = TrainConfig(tokens=6000, batch_size=200, checkpoint_every=7, checkpoint_seconds=0, log_every=3, lr=1e-2,
                       dead_tokens=400)
    train(base / "set", cfg, tcfg, tmp_path / "ref")
    _crash_after_saves(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(base / "set", cfg, tcfg, tmp_path / "b")
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()
    summary = train(base / "set", cfg, tcfg, tmp_path / "b")
    assert summary["tokens"] == 6000
    for name in ("ref", "b"):
        assert not (tmp_path / f"{name}.resume").exists()
    assert (tmp_path / "b" / "sae.safetensors").read_bytes() == (tmp_path / "ref" / "sae.safetensors").read_bytes()
    la = pd.read_parquet(tmp_path / "b" / "train_log.parquet").drop(columns="wall_s")
    lb = pd.read_parquet(tmp_path / "ref" / "train_log.parquet").drop(columns="wall_s")
    pd.testing.assert_frame_equal(la, lb, check_exact=True)


# ----------------------------------------------------------------------------- faults


def test_sigterm_during_extract_cleans_up(tmp_path):
    out = tmp_path / "big"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "isae", "-q", "extract", "synthetic", "--d", "32", "--atoms", "64",
         "--k", "2", "--rows", "20000000", "--rows-per-shard", "500", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".big.tmp-*/part-00002.parquet")) and time.time() < deadline:
        time.sleep(0.05)
        assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.strip().splitlines() == ["isae extract: terminated (SIGTERM)"]
    assert list(tmp_path.iterdir()) == []


def _enospc(path=None):
    return OSError(errno.ENOSPC, "No space left on device", path)


def _fail_on_call(n: int, real=None, partial: bool = False):
    """A stand-in for a write function that fails as a full disk does on its n-th call
    (after writing part of the file when ``partial``)."""
    count = {"n": 0}

    def write(*args, **kw):
        count["n"] += 1
        if count["n"] == n:
            target = next((a for a in args if isinstance(a, (str, Path))), None)
            if partial and target is not None:
                Path(target).write_bytes(b"\0" * 100)
            raise _enospc(target)
        return real(*args, **kw)

    return write


def _disk_full_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0], err
    return err[0]


def test_disk_full_during_extract(tmp_path, monkeypatch, capsys):
    from isae.data import activations

    monkeypatch.setattr(activations.pq, "write_table", _fail_on_call(3, pq.write_table, partial=True))
    rc = main(["-q", "extract", "synthetic", "--d", "4", "--atoms", "8", "--k", "2", "--rows", "1000",
               "--rows-per-shard", "100", "--out", str(tmp_path / "set")])
    assert rc == 2
    _disk_full_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_final_and_resume_saves(base, tmp_path, monkeypatch, capsys):
    from isae.data import checkpoints
    from isae.training import resume

    args = ["-q", *train_args(str(base / "set"), str(tmp_path / "out"), "--checkpoint-every", "3", "--checkpoint-seconds", "0")]
    monkeypatch.setattr(resume, "save_file", _fail_on_call(2, resume.save_file, partial=True))
    assert main(args) == 2
    _disk_full_line(capsys)
    # The first save is intact and the failed one left no temporary file behind.
    assert sorted(p.name for p in (tmp_path / "out.resume").iterdir()) == ["state.safetensors"]
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints, "save_file", _fail_on_call(1, checkpoints.save_file, partial=True))
    assert main(args) == 2  # resumes, then the final save fails
    _disk_full_line(capsys)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_disk_full_during_export_keeps_the_old_export(base, tmp_path, monkeypatch, capsys):
    from isae.data import export

    out = tmp_path / "exp"
    assert main(["-q", "export", str(base / "ck"), "--format", "saelens", "--out", str(out)]) == 0
    capsys.readouterr()
    before = tree(out)
    monkeypatch.setattr(export, "save_file", _fail_on_call(1, export.save_file, partial=True))
    assert main(["-q", "export", str(base / "ck"), "--format", "saelens", "--out", str(out)]) == 2
    _disk_full_line(capsys)
    assert tree(out) == before and not leftovers(tmp_path)


def test_nan_metrics_are_null_in_the_json_summary(capsys):
    from isae.cli.main import json_safe

    out = json.dumps(json_safe({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.int64(3)}),
                     allow_nan=False)
    assert json.loads(out) == {"a": None, "b": [None, 1.5], "c": 3}
