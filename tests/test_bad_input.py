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
    # meta.json (items 10, 15)
    Case("meta-d-string", bad_meta(lambda m: m.update(d="sixteen")), "d must be an integer"),
    Case("meta-d-huge", bad_meta(lambda m: m.update(d=10**12)), "d must be an integer in [1,"),
    Case("meta-d-other", bad_meta(lambda m: m.update(d=16, mean=[0.0] * 16)),
         "expected fixed_size_list<float32 or float16>[16]"),
    Case("meta-rows-float", bad_meta(lambda m: m.update(rows=1e12)), "rows must be a non-negative integer"),
    Case("meta-scale-zero", bad_meta(lambda m: m.update(scale=0)), "scale must be a positive finite"),
    Case("meta-list", bad_meta(lambda m: [], "eval"), "is not a JSON object"),
    Case("meta-shards", bad_meta(lambda m: m.update(shards=4)), "lists 4 shards but the folder holds 3"),
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
