"""Writing files so that a crash never leaves one that looks complete: a temporary name in
the same folder, then an atomic rename."""

from __future__ import annotations

import json
import os
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
