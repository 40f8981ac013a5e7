"""Resume state on disk without pickle: one safetensors file, tensors as tensors and
everything else as JSON in the file's header.

A pickle (``torch.save``) runs whatever code the file names when it is loaded, so a planted
``state.pt`` beside an ``--out`` would run on the next ``isae train``. This format cannot:
safetensors holds only typed arrays, and the JSON holds only plain values.

The nested state (optimiser state dicts with integer keys and tuples, generator states,
the log rows) is encoded so that it comes back exactly: tensors by reference
(``{"__tensor__": name}``), dicts with keys that are not strings as pairs, tuples marked,
non-finite floats by name, and a list of log rows with uniform scalar columns as one
float64 or int64 tensor per column (the header of a safetensors file is limited to 100 MB;
the log of a long run logged at every step would not fit). Floats keep every bit: JSON
writes Python floats by their shortest round-trip repr, and float64 columns are exact.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: The resume state's file name inside ``<out>.resume/``.
STATE_FILE = "state.safetensors"
#: What older versions wrote (a pickle): never loaded.
LEGACY_FILE = "state.pt"
_HEADER_KEY = "isae_resume"
_FORMAT = "1"
_MARKERS = ("__tensor__", "__dict__", "__tuple__", "__float__", "__rows__")


class StateError(ValueError):
    """The file is not a resume state this version wrote (corrupt, truncated or foreign)."""


def _rows_columns(rows: list) -> dict[str, type] | None:
    """Column -> int or float when ``rows`` is a non-empty list of dicts with the same string
    keys and one scalar Python type per column (int or float, never bool); else None."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    keys = list(rows[0])
    cols: dict[str, type] = {}
    for k in keys:
        if not isinstance(k, str):
            return None
        kinds = {type(r.get(k)) for r in rows}
        if len(kinds) != 1 or kinds.pop() not in (int, float):
            return None
        cols[k] = type(rows[0][k])
    if any(list(r) != keys for r in rows):
        return None
    return cols


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        cols = _rows_columns(obj) if len(obj) > 1 else None
        if cols is not None:
            spec = {}
            for k, kind in cols.items():
                dtype = torch.int64 if kind is int else torch.float64
                spec[k] = _encode(torch.tensor([r[k] for r in obj], dtype=dtype), tensors)
            return {"__rows__": spec}
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"resume state cannot hold a {type(obj).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        if isinstance(obj, float) and not math.isfinite(obj):
            raise StateError("a non-finite number outside a marker")
        return obj
    if len(obj) == 1:
        (key, val), = obj.items()
        if key == "__tensor__":
            if not isinstance(val, str) or val not in tensors:
                raise StateError(f"reference to a missing tensor {val!r}")
            return tensors[val]
        if key == "__float__":
            if val not in ("nan", "inf", "-inf"):
                raise StateError(f"bad float marker {val!r}")
            return float(val)
        if key == "__tuple__":
            if not isinstance(val, list):
                raise StateError("bad tuple marker")
            return tuple(_decode(v, tensors) for v in val)
        if key == "__dict__":
            if not isinstance(val, list) or not all(isinstance(p, list) and len(p) == 2 for p in val):
                raise StateError("bad dict marker")
            out = {}
            for k, v in val:
                k = _decode(k, tensors)
                if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                    raise StateError("a dict key that is not a plain value")
                out[k] = _decode(v, tensors)
            return out
        if key == "__rows__":
            if not isinstance(val, dict) or not val:
                raise StateError("bad rows marker")
            cols = {k: _decode(v, tensors) for k, v in val.items()}
            if not all(isinstance(c, torch.Tensor) and c.ndim == 1 for c in cols.values()):
                raise StateError("bad rows marker")
            n = {len(c) for c in cols.values()}
            if len(n) != 1:
                raise StateError("log columns of different lengths")
            lists = {k: c.tolist() for k, c in cols.items()}
            return [{k: lists[k][i] for k in cols} for i in range(n.pop())]
    if any(k in _MARKERS for k in obj):
        raise StateError("a marker key in a plain object")
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` under a temporary name, then rename it into place; the
    temporary file is removed on any failure (a full disk, an interrupt)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_encode(state, tensors), allow_nan=False, separators=(",", ":"))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: header, "format": _FORMAT})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike) -> dict:
    """Read a state written by save_state; StateError when the file is anything else."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except StateError:
        raise
    except Exception as e:  # SafetensorError, OSError and the like: not a readable file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StateError(f"not a readable safetensors file ({first})") from None
    if meta.get("format") != _FORMAT or _HEADER_KEY not in meta:
        raise StateError("not an isae resume state (its header lacks the state)")
    try:
        raw = json.loads(meta[_HEADER_KEY])
        state = _decode(raw, tensors)
    except (ValueError, RecursionError) as e:  # StateError is a ValueError
        if isinstance(e, StateError):
            raise
        raise StateError(f"its header is not a state isae wrote ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise StateError("the state is not an object")
    return state
