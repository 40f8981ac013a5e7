"""Small I/O helpers shared by the stages: atomic Parquet tables and progress bars."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .errors import UserError


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


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    """A progress bar on stderr; in logs (not a terminal) it updates every 10 s."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        file=sys.stderr,
        mininterval=0.5 if tty else 10.0,
        dynamic_ncols=tty,
        **kw,
    )
