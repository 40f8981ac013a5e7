"""Reading the JSON files isae takes as input (a checkpoint's ``cfg.json``, an activation
set's ``meta.json``, an lr sweep's ``lr.json``, a SAELens or sparsify ``cfg.json``) so that
whatever is in them, a nesting deep enough to exhaust the parser's recursion, a number too
long to convert, bytes that are not UTF-8, ends as one UserError naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from isae.errors import UserError


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``; UserError when it cannot be read or parsed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid JSON: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path} is not a file isae reads: its JSON nests too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        first = (str(e).strip().splitlines() or ["unreadable"])[0]
        raise UserError(f"{path} is not valid JSON: {first}") from None


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; UserError when it is anything else."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a JSON object")
    return obj
