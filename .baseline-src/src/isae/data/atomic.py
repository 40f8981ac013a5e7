"""Writing files so that a crash never leaves one that looks complete: a temporary name in
the same folder, then an atomic rename; and the one rule for what an output may replace
(``check_out``, ``check_table_out``, using isae.data.ownership to tell isae's files from
the user's), so that no command deletes, or writes into, what it did not make.

Temporary names are ``.NAME.tmp-PID``; a replaced folder becomes ``.NAME.old-PID`` before
it is deleted. The next run writing NAME removes those of processes that are gone, and
says so on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from isae.data.ownership import (
    KINDS,
    RESUME_FILES,
    first_foreign,
    is_leftover,
    is_resume_state,
    output_kind,
    stale_leftovers,
)
from isae.errors import UserError

log = logging.getLogger(__name__)


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


def _overlap(a: Path, b: Path) -> bool:
    """a is b, or one of them lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def overlaps_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str) -> None:
    """UserError when ``path`` is one of ``inputs``, holds one, or lies inside one
    (symbolic links resolved); ``what`` names ``path`` in the message."""
    real = Path(os.path.realpath(path))
    for item in inputs:
        if item is not None and _overlap(real, Path(os.path.realpath(item))):
            raise UserError(f"{what} overlaps the input {item}: choose another folder")


def remove_stale_leftovers(path: str | os.PathLike) -> None:
    """Remove what interrupted isae runs left beside ``path`` (``.NAME.tmp-PID``,
    ``.NAME.old-PID`` whose process is gone), saying so on stderr."""
    for p in stale_leftovers(path):
        _remove(p)
        log.warning("removed %s, left by an interrupted isae run (process %s is gone)",
                    p, p.name.rsplit("-", 1)[1])


def check_out(
    out: str | os.PathLike,
    kind: str,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    can_force: bool = True,
) -> Path:
    """Check that writing the ``kind`` folder ``out`` loses nothing; UserError if it would.

    An existing ``out`` is replaced only when it is empty, when it already is an output of
    the same kind, or, with ``force``, an isae output of another kind (isae.data.ownership).
    Never, even with ``force``: a folder holding a file isae did not write (the refusal
    names it), a file or a symbolic link, the current folder or a folder above it, or a
    folder that is, holds or lies inside one of the ``inputs`` (each an activation set, a
    checkpoint or another file or folder the command reads). ``can_force``: whether the
    command has a --force flag (for the message).

    Creates the parent folder and removes stale leftovers of ``out``; returns ``out``.
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
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link, which isae never replaces: remove it "
                        "or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, which isae never replaces with a folder: "
                        "choose another --out")
    writable_parent(out)
    if out.is_dir():
        bad = first_foreign(out)
        if bad is not None:
            raise UserError(
                f"--out {out} holds {bad.relative_to(out)}, which isae did not write: isae "
                f"never replaces such a folder{', not even with --force' if can_force else ''}; "
                "choose another --out"
            )
        have = output_kind(out)  # None: empty
        if have is not None and have != kind and not force:
            hint = ", or pass --force to replace it" if can_force else ""
            raise UserError(f"--out {out} already exists and is {KINDS[have]}, not "
                            f"{KINDS[kind]}: choose another folder{hint}")
    remove_stale_leftovers(out)
    return out


def check_table_out(path: str | os.PathLike | None, inputs: Iterable[str | os.PathLike],
                    flag: str = "--out") -> None:
    """A Parquet table may replace an existing Parquet file, but never a folder, another
    kind of file, an input, or go inside an input (a new shard in an activation set, say)."""
    check_file_out(path, inputs, flag, kind="a Parquet table", magic=b"PAR1", example=".parquet")


def check_file_out(path: str | os.PathLike | None, inputs: Iterable[str | os.PathLike],
                   flag: str, *, kind: str, magic: bytes, example: str) -> None:
    """An output file may replace an existing file of its own ``kind`` (e.g. "an HTML page":
    one that starts with ``magic``), but never a folder, another kind of file, an input, or
    a file inside an input folder, new or not: a file added to an input changes it as much
    as one replaced; ``example`` is the suffix the message suggests. Removes stale
    leftovers of ``path``."""
    if path is None:
        return
    p = Path(path)
    real = Path(os.path.realpath(p))
    for item in inputs:
        if item is not None and _overlap(real, Path(os.path.realpath(item))):
            raise UserError(f"{flag} {path} would replace the input {item}, hold it or go "
                            "inside it: write it elsewhere")
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a {example} file")
    if p.exists():
        try:
            with open(p, "rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        if head != magic:
            raise UserError(f"{flag} {path} exists and is not {kind}: choose another name")
    remove_stale_leftovers(p)


def check_resume_folder(rdir: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """The trainer's resume folder beside ``--out`` (``NAME.resume/``) is deleted when
    training ends: it may not overlap an input, and an existing one must be a resume state,
    nothing else (no --force overrides this)."""
    rdir = Path(rdir)
    overlaps_input(rdir, inputs, f"the resume folder {rdir}")
    if rdir.is_symlink() or (rdir.exists() and not rdir.is_dir()):
        raise UserError(f"{rdir} (where the resume state of --out goes) is not a folder: move it")
    if rdir.is_dir() and not is_resume_state(rdir):
        other = next(p.name for p in sorted(rdir.iterdir())
                     if not (p.name in RESUME_FILES or is_leftover(p)))
        raise UserError(f"{rdir} (where the resume state of --out goes, deleted when training "
                        f"ends) holds {other}, which isae did not write: move it")


def remove_resume_folder(rdir: str | os.PathLike) -> None:
    """Delete a finished run's resume folder, but only while it is a resume state (a file
    put there since is left, with a warning)."""
    rdir = Path(rdir)
    if not rdir.exists():
        return
    if is_resume_state(rdir):
        discard(rdir)
    else:
        log.warning("left %s in place: it holds files isae did not write", rdir)


@contextlib.contextmanager
def output_lock(outs: Iterable[str | os.PathLike]):
    """Hold a lock beside each of ``outs`` (``.NAME.lock`` in its folder) for the block, so
    that a second isae process writing one of them is refused in one line instead of the
    two mixing or deleting each other's resume state. The lock goes with the process (an
    advisory ``flock``): a killed run leaves nothing that blocks the next."""
    try:
        import fcntl  # noqa: F401 (POSIX only; elsewhere runs are not locked)
    except ImportError:
        yield
        return
    held = []
    try:
        for out in outs:
            held.append(_lock(Path(out)))
        yield
    finally:
        for path, fd in reversed(held):
            try:
                path.unlink(missing_ok=True)  # while still holding it
            finally:
                os.close(fd)


def _lock(out: Path) -> tuple[Path, int]:
    import fcntl

    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (process {pid})" if pid.isdigit() else ""
            raise UserError(f"another isae run{who} is writing {out} now: wait for it to end, "
                            "or choose another --out") from None
        try:  # the last holder may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return path, fd


def publish(stage: Path, out: Path) -> None:
    """Move the finished folder ``stage`` to ``out``, replacing what ``check_out`` allowed.

    The old ``out`` is renamed aside (``.NAME.old-PID``) before the new one takes its place
    and deleted only then, so at every instant the old folder is either intact at ``out``
    or a leftover under that name, which the next run writing ``out`` removes
    (``remove_stale_leftovers``); a failure before the new one is in place puts it back.
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


def discard(path: Path) -> None:
    """Delete ``path`` by renaming it to ``.NAME.old-PID`` first, so that an interruption
    leaves a recognisable leftover, not a half-deleted folder under its own name."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    _remove(old)
    os.replace(path, old)
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
