"""Which files are isae's: what an output folder of each kind holds, so that nothing that
isae did not write is ever replaced or deleted (isae.data.atomic.check_out applies it).

An output is recognised by its own files, not by its name: a checkpoint by a ``cfg.json``
that isae wrote (a JSON object with an integer ``version`` and ``d_sae``) beside
``sae.safetensors``, an activation set by its ``meta.json`` (``version`` and ``d``), an
export by the ``isae_export`` record in its ``cfg.json``, a measure folder by its three
tables, an lr-sweep folder by ``lr.json``, ``sweep.parquet`` and its tree of candidate
checkpoints, a folder of checkpoints (``isae train --out 'DIR/{arch}/seed{seed}'``) by the
checkpoints at its leaves. A folder is isae's only when *every* file in it is one of its kind's own
files; the first that is not is named in the refusal.

isae's own leftovers count as its files wherever they are: the temporary names of its
writers (``.NAME.tmp-PID``), a replaced folder on its way out (``.NAME.old-PID``), the
lock of a training run (``.NAME.lock``) and a trainer's resume folder (``NAME.resume/``
holding only its state). ``stale_leftovers`` finds those of processes that are gone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

#: Kind -> how a refusal names it.
KINDS = {
    "activations": "an activation set",
    "checkpoint": "a checkpoint",
    "saelens": "a SAELens export",
    "sparsify": "a sparsify export",
    "lr-sweep": "an lr-sweep folder",
    "measure": "a measure folder",
    "checkpoints": "a folder of checkpoints",
}

#: What a checkpoint folder holds (isae.data.checkpoints): tensors, cfg, train log, initial decoder.
CHECKPOINT_FILES = frozenset({"sae.safetensors", "cfg.json", "train_log.parquet", "init.safetensors"})
#: An activation set's files besides its shards and truth/ (isae.data.activations and the
#: sources' long provenance: the stdlib corpus's file list, the vision source's image list).
ACTIVATION_FILES = frozenset({"meta.json", "text_files.json", "images.parquet"})
SHARD = re.compile(r"part-\d{5,}\.parquet")
MEASURE_FILES = frozenset({"runs.parquet", "pairs.parquet", "latents.parquet"})
LR_SWEEP_FILES = frozenset({"lr.json", "sweep.parquet"})
#: What a trainer's resume folder holds (isae.training.resume: STATE_FILE and the older
#: LEGACY_FILE), besides the state's temporary names.
RESUME_FILES = frozenset({"state.safetensors", "state.pt"})
RESUME_SUFFIX = ".resume"

#: ``.NAME.tmp-PID`` (a writer's temporary file or folder) and ``.NAME.old-PID`` (a replaced
#: output being deleted).
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)")
LOCK = re.compile(r"\.(?P<name>.+)\.lock")

#: Largest cfg.json / meta.json read to recognise a folder (a real one is a few hundred kB
#: at most: the mean vector); a larger file is not isae's.
_MAX_JSON = 64 << 20


def _json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, not a regular file, too
    large, unreadable, not JSON (a nesting too deep included) or not an object."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_JSON:
            return None
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _isae_checkpoint_cfg(folder: Path) -> bool:
    cfg = _json_object(folder / "cfg.json")
    return cfg is not None and _int(cfg.get("version")) and "d_sae" in cfg


def _isae_meta(folder: Path) -> bool:
    meta = _json_object(folder / "meta.json")
    return meta is not None and _int(meta.get("version")) and "d" in meta


def _isae_export_cfg(folder: Path) -> bool:
    cfg = _json_object(folder / "cfg.json")
    return cfg is not None and isinstance(cfg.get("isae_export"), dict)


def is_leftover(p: Path) -> bool:
    """A temporary name of isae's writers, a replaced output being deleted, or a lock."""
    return bool(LEFTOVER.fullmatch(p.name) or LOCK.fullmatch(p.name))


def _regular(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _folder(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def is_resume_state(folder: Path) -> bool:
    """A trainer's resume folder: a folder holding nothing but its state files (and their
    temporary names)."""
    return _folder(folder) and _first_other(folder, lambda p: p.name in RESUME_FILES
                                            and _regular(p)) is None


def _first_other(folder: Path, own: Callable[[Path], bool]) -> Path | None:
    """The first entry of ``folder`` (sorted) that is neither ``own`` nor an isae leftover."""
    for p in sorted(folder.iterdir()):
        if not (is_leftover(p) or own(p)):
            return p
    return None


def _first_foreign_checkpoint(folder: Path) -> Path | None:
    if not _isae_checkpoint_cfg(folder):
        return folder / "cfg.json"
    return _first_other(folder, lambda p: p.name in CHECKPOINT_FILES and _regular(p))


def _first_foreign_activations(folder: Path) -> Path | None:
    if not _isae_meta(folder):
        return folder / "meta.json"
    truth = folder / "truth"
    if _folder(truth):
        bad = _first_foreign_checkpoint(truth)
        if bad is not None:
            return bad
    return _first_other(folder, lambda p: (
        (p.name in ACTIVATION_FILES or SHARD.fullmatch(p.name)) and _regular(p)
        or p.name == "truth" and _folder(p)))


def _first_foreign_saelens(folder: Path) -> Path | None:
    if not _isae_export_cfg(folder):
        return folder / "cfg.json"
    return _first_other(folder, lambda p: p.name in ("cfg.json", "sae_weights.safetensors")
                        and _regular(p))


def _first_foreign_sparsify(folder: Path) -> Path | None:
    hooks = [p for p in sorted(folder.iterdir()) if _folder(p) and not is_leftover(p)]
    if not hooks:
        return next(iter(sorted(folder.iterdir())), folder / "cfg.json")
    for hook in hooks:
        if not _isae_export_cfg(hook):
            return hook / "cfg.json"
        bad = _first_other(hook, lambda p: p.name in ("cfg.json", "sae.safetensors") and _regular(p))
        if bad is not None:
            return bad
    return _first_other(folder, _folder)


def _first_foreign_measure(folder: Path) -> Path | None:
    return _first_other(folder, lambda p: p.name in MEASURE_FILES and _regular(p))


def _first_foreign_tree(folder: Path) -> Path | None:
    """A folder of checkpoints at any depth, with their resume folders (an lr sweep's ckpt/)."""
    for p in sorted(folder.iterdir()):
        if is_leftover(p):
            continue
        if not _folder(p):
            return p
        if p.name.endswith(RESUME_SUFFIX) and is_resume_state(p):
            continue
        bad = (_first_foreign_checkpoint(p) if (p / "cfg.json").exists()
               else _first_foreign_tree(p))
        if bad is not None:
            return bad
    return None


def _first_foreign_lr_sweep(folder: Path) -> Path | None:
    ckpt = folder / "ckpt"
    if _folder(ckpt):
        bad = _first_foreign_tree(ckpt)
        if bad is not None:
            return bad
    if (folder / "lr.json").exists() and _json_object(folder / "lr.json") is None:
        return folder / "lr.json"
    return _first_other(folder, lambda p: p.name in LR_SWEEP_FILES and _regular(p)
                        or p.name == "ckpt" and _folder(p))


_FIRST_FOREIGN: dict[str, Callable[[Path], Path | None]] = {
    "activations": _first_foreign_activations,
    "checkpoint": _first_foreign_checkpoint,
    "saelens": _first_foreign_saelens,
    "sparsify": _first_foreign_sparsify,
    "lr-sweep": _first_foreign_lr_sweep,
    "measure": _first_foreign_measure,
    "checkpoints": _first_foreign_tree,
}


def _looks_like(folder: Path, kind: str) -> bool:
    """Whether ``folder`` has the file that says it is meant as a ``kind`` output."""
    if kind == "activations":
        return (folder / "meta.json").exists()
    if kind == "checkpoint":
        return (folder / "cfg.json").exists() and (folder / "sae.safetensors").exists()
    if kind == "saelens":
        return (folder / "sae_weights.safetensors").exists()
    if kind == "sparsify":
        return any(_folder(p) and (p / "cfg.json").exists() for p in folder.iterdir())
    if kind == "lr-sweep":
        return any((folder / n).exists() for n in (*LR_SWEEP_FILES, "ckpt"))
    if kind == "checkpoints":
        return any(_folder(p) and not is_leftover(p) for p in folder.iterdir())
    return any((folder / n).exists() for n in MEASURE_FILES)


def output_kind(folder: str | os.PathLike) -> str | None:
    """The kind of isae output ``folder`` is (a key of KINDS): every file in it is one that
    kind's writer makes. None for anything else, an empty folder included."""
    folder = Path(folder)
    if not _folder(folder) or not any(folder.iterdir()):
        return None
    for kind, first_foreign in _FIRST_FOREIGN.items():
        if _looks_like(folder, kind) and first_foreign(folder) is None:
            return kind
    return None


def first_foreign(folder: str | os.PathLike) -> Path | None:
    """The first file of ``folder`` that isae did not write (None when every file is isae's,
    or the folder is empty): of the kind the folder looks like, the first file that kind
    does not make; of a folder that looks like none, its first entry."""
    folder = Path(folder)
    if not any(p for p in folder.iterdir() if not is_leftover(p)):
        return None
    found = None
    for kind, first in _FIRST_FOREIGN.items():
        if _looks_like(folder, kind):
            bad = first(folder)
            if bad is None:
                return None
            found = found or bad
    return found or next(p for p in sorted(folder.iterdir()) if not is_leftover(p))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process has: leave it
    return True


def stale_leftovers(path: str | os.PathLike) -> list[Path]:
    """isae's leftovers beside ``path`` from processes that are gone: ``.NAME.tmp-PID`` and
    ``.NAME.old-PID`` of ``path``'s own name, whose PID no longer runs."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    found = []
    prefix = f".{path.name}."
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        m = LEFTOVER.fullmatch(p.name)
        if m and m["name"] == path.name and not _alive(int(m["pid"])):
            found.append(p)
    return found
