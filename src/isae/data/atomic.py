"""Writing files so that a crash never leaves one that looks complete: a temporary name in
the same folder, then an atomic rename; and the one rule for what an output folder may
replace (``check_out``), so that no command deletes what it did not make."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from isae.errors import UserError


def writable_parent(path: str | os.PathLike) -> Path:
    """Create the folder that will hold ``path``; UserError if it cannot be written."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"folder {parent} is not writable")
    return parent


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a Parquet table atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON under a temporary name, then rename it into place (removed on failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- output folders

#: What each kind of output folder holds, recognised by its files: an activation set, a
#: checkpoint, and the two export layouts (sparsify's: one sub-folder per hookpoint).
KINDS = {
    "activations": "an activation set",
    "checkpoint": "a checkpoint",
    "saelens": "a SAELens export",
    "sparsify": "a sparsify export",
}


def _cfg_keys(folder: Path) -> set:
    """The top-level keys of ``folder/cfg.json`` (empty when it is missing or not a JSON object)."""
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, ValueError):
        return set()
    return set(cfg) if isinstance(cfg, dict) else set()


def _tensors_and_cfg(folder: Path, tensors: str, key: str) -> bool:
    return (folder / tensors).is_file() and key in _cfg_keys(folder)


def layout_kind(path: str | os.PathLike) -> str | None:
    """The kind of output folder ``path`` is (a key of KINDS), or None. A checkpoint and a
    sparsify hookpoint folder both hold ``sae.safetensors`` + ``cfg.json``; their cfg.json
    tells them apart (``d_sae`` against ``num_latents``), so that a folder of checkpoints
    (one per seed, say) is never taken for a sparsify export."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "meta.json").is_file() and any(path.glob("part-*.parquet")):
        return "activations"
    if _tensors_and_cfg(path, "sae.safetensors", "d_sae"):
        return "checkpoint"
    if _tensors_and_cfg(path, "sae_weights.safetensors", "d_sae"):
        return "saelens"
    subs = list(path.iterdir())
    if subs and all(p.is_dir() and _tensors_and_cfg(p, "sae.safetensors", "num_latents")
                    for p in subs):
        return "sparsify"
    return None


def _overlap(a: Path, b: Path) -> bool:
    """a is b, or one of them lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def overlaps_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str) -> None:
    """UserError when ``path`` is one of ``inputs``, holds one, or lies inside one
    (symbolic links resolved); ``what`` names ``path`` in the message."""
    real = Path(os.path.realpath(path))
    for item in inputs:
        if _overlap(real, Path(os.path.realpath(item))):
            raise UserError(f"{what} overlaps the input {item}: choose another folder")


def check_out(
    out: str | os.PathLike,
    kind: str,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> Path:
    """Check that writing the ``kind`` folder ``out`` loses nothing; UserError if it would.

    An existing ``out`` is replaced only when it is empty, when it already is an output of
    the same kind, or with ``force``. Never, even with ``force``: the current folder or a
    folder above it, a folder that is or holds one of the ``inputs``, or one inside an input
    (each an activation set, a checkpoint or another folder the command reads).
    Creates the parent folder; returns ``out``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    if str(out).strip() == "":
        raise UserError("--out must name a folder")
    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        raise UserError(f"--out {out} is the current folder or a folder above it: choose a new folder")
    overlaps_input(out, inputs, f"--out {out}")
    writable_parent(out)
    if not (out.exists() or out.is_symlink()):
        return out
    if out.is_dir() and not out.is_symlink():
        if not any(out.iterdir()) or layout_kind(out) == kind or force:
            return out
        what = layout_kind(out)
        what = KINDS[what] if what else "a folder of other files"
        raise UserError(
            f"--out {out} already exists and is {what}, not {KINDS[kind]}: choose another "
            "folder, or pass --force to replace it"
        )
    if force:
        return out
    what = "a symbolic link" if out.is_symlink() else "not a folder"
    raise UserError(
        f"--out {out} already exists and is {what}: choose another, or pass --force to replace it"
    )


def check_table_out(path: str | os.PathLike | None, inputs: Iterable[str | os.PathLike],
                    flag: str = "--out") -> None:
    """A Parquet table may replace an existing Parquet file, but never a folder, another
    kind of file, an input, or a file inside an input (a checkpoint's own files, say)."""
    check_file_out(path, inputs, flag, kind="a Parquet table", magic=b"PAR1", example=".parquet")


def check_file_out(path: str | os.PathLike | None, inputs: Iterable[str | os.PathLike],
                   flag: str, *, kind: str, magic: bytes, example: str) -> None:
    """An output file may replace an existing file of its own ``kind`` (e.g. "an HTML page":
    one that starts with ``magic``), but never a folder, another kind of file, an input, or
    a file inside an input; ``example`` is the suffix the message suggests."""
    if path is None:
        return
    p = Path(path)
    real = Path(os.path.realpath(p))
    for item in inputs:
        src = Path(os.path.realpath(item))
        if real == src or src in real.parents and p.exists() or real in src.parents:
            raise UserError(f"{flag} {path} would replace the input {item} or a file of it")
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a {example} file")
    if p.exists():
        with open(p, "rb") as f:
            head = f.read(len(magic))
        if head != magic:
            raise UserError(f"{flag} {path} exists and is not {kind}: choose another name")


def publish(stage: Path, out: Path) -> None:
    """Move the finished folder ``stage`` to ``out``, replacing what ``check_out`` allowed.

    The old ``out`` is moved aside first and deleted only once the new one is in place, so
    a failure leaves the old one where it was. A symbolic link is replaced, not followed.
    """
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _remove(old)
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def staging_folder(out: Path) -> Path:
    """A fresh, empty temporary folder beside ``out`` (``.NAME.tmp-PID``)."""
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(stage)
    try:
        stage.mkdir()
    except OSError as e:
        raise UserError(f"cannot create {stage}: {e.strerror or e}") from None
    return stage
