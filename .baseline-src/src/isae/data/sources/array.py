"""``isae extract array``: an activation set from activations computed elsewhere.

Three inputs, each read in chunks of rows so that a file larger than memory streams through:

* ``.npy`` — a 2-D float array [rows, d] (float16, float32 or float64), memory-mapped.
* ``.safetensors`` — one 2-D float tensor [rows, d] (F16, BF16, F32 or F64): the one named
  with ``--tensor``, or the file's only tensor. Rows are read slice by slice.
* ``.parquet`` — one column whose rows are the activation vectors: ``list``,
  ``large_list`` or ``fixed_size_list`` of floats, every row of the same length d, no nulls.
  ``--column`` names it; without it, a column named ``x``, else the file's only such column.
  Activations spread over d scalar columns (one per dimension) are not read: Parquet keeps
  metadata per column, which grows with d, and the order of the columns would be a guess —
  pack them into one list column. Read by record batches, never whole.

The held-out split uses the same ``heldout_mask`` as every other source, over groups: by
default blocks of ``block_rows`` consecutive rows (set it to the context length, so that a
context lands on one side); with ``--group-column NAME`` (Parquet only), the values of that
column (integers, or strings hashed to 64 bits), so that all rows of a document stay on one
side. The group column and the provenance columns ``doc``, ``pos``, ``token_id``, ``image``,
``patch`` (where the input has them) are copied into the set.

Refused with one line naming the file: a missing file, an unknown suffix, a tensor that is
not 2-D or not a float type, no rows, rows of different lengths, nulls, NaN or Inf (with
the row), a value beyond float16's range when ``--dtype float16``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from isae.data.activations import ActivationWriter, heldout_mask
from isae.data.sources import check_extract_out, check_layout, local_inputs, package_versions
from isae.errors import UserError
from isae.progress import progress

log = logging.getLogger(__name__)

KINDS = {".npy": "npy", ".safetensors": "safetensors", ".parquet": "parquet"}
#: Columns copied from a Parquet input into the set when present (the formats' provenance).
PROVENANCE = ("doc", "pos", "token_id", "image", "patch")
#: Bytes of input rows per chunk when --chunk-rows is not given.
CHUNK_BYTES = 64 << 20
FLOAT16_MAX = float(np.finfo(np.float16).max)
_SAFETENSORS_FLOATS = {"F16", "BF16", "F32", "F64"}


@dataclass
class Chunk:
    """Consecutive input rows start, start + 1, ...: (x: [rows, d]) float, and columns."""

    start: int
    x: np.ndarray
    columns: dict[str, pa.Array] = field(default_factory=dict)


class _Input:
    """An opened input: its shape, what to record about it, and its rows chunk by chunk."""

    kind: str
    path: Path
    rows: int
    d: int
    dtype: str

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "bytes": self.path.stat().st_size,
                "dtype": self.dtype, "shape": [self.rows, self.d]}

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        raise NotImplementedError

    def groups(self, chunk: Chunk) -> np.ndarray | None:
        """[rows] uint64 group ids of a chunk's rows, or None (split by row blocks)."""
        return None


def _check_shape(path: Path, shape: tuple, what: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise UserError(f"{path}: {what} has shape {list(shape)}; expected 2-D [rows, d]")
    rows, d = int(shape[0]), int(shape[1])
    if rows == 0:
        raise UserError(f"{path}: {what} has no rows")
    if d == 0:
        raise UserError(f"{path}: {what} has rows of length 0")
    return rows, d


class _Npy(_Input):
    kind = "npy"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: not a readable .npy array ({first})") from None
        if self.array.dtype.kind != "f":
            raise UserError(f"{path}: dtype {self.array.dtype} is not a float type")
        self.rows, self.d = _check_shape(path, self.array.shape, "the array")
        self.dtype = self.array.dtype.name

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for s in range(0, self.rows, chunk_rows):
            # A copy of just these rows: the memory map never pulls in the whole file.
            yield Chunk(s, np.array(self.array[s : s + chunk_rows]))


class _Safetensors(_Input):
    kind = "safetensors"

    def __init__(self, path: Path, tensor: str | None) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                if tensor is None:
                    if len(names) != 1:
                        raise UserError(
                            f"{path} holds {len(names)} tensors; name one with --tensor "
                            f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
                        )
                    tensor = names[0]
                elif tensor not in names:
                    raise UserError(
                        f"{path} has no tensor {tensor!r} (it has: {', '.join(names[:10])}"
                        f"{', ...' if len(names) > 10 else ''})"
                    )
                sl = f.get_slice(tensor)
                shape, self.dtype = tuple(sl.get_shape()), sl.get_dtype()
        except UserError:
            raise
        except Exception as e:  # safetensors' own error type for a file it cannot parse
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: not a readable safetensors file ({first})") from None
        self.tensor = tensor
        if self.dtype not in _SAFETENSORS_FLOATS:
            raise UserError(f"{path}: tensor {tensor!r} has dtype {self.dtype}, not a float type")
        self.rows, self.d = _check_shape(path, shape, f"tensor {tensor!r}")

    def describe(self) -> dict:
        return {**super().describe(), "tensor": self.tensor}

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            sl = f.get_slice(self.tensor)
            for s in range(0, self.rows, chunk_rows):
                t = sl[s : s + chunk_rows]
                # bfloat16 has no NumPy type; float32 holds it exactly.
                yield Chunk(s, (t.float() if self.dtype == "BF16" else t).numpy())


def _is_float_list(t: pa.DataType) -> bool:
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return lists and pa.types.is_floating(t.value_type)


class _Parquet(_Input):
    kind = "parquet"

    def __init__(self, path: Path, column: str | None, group_column: str | None) -> None:
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: not a readable Parquet file ({first})") from None
        schema = self.file.schema_arrow
        names = schema.names
        if column is None:
            lists = [n for n in names if _is_float_list(schema.field(n).type)]
            if "x" in lists:
                column = "x"
            elif len(lists) == 1:
                column = lists[0]
            elif not lists:
                raise UserError(
                    f"{path} has no column of float lists (columns: {', '.join(names[:12])}); "
                    "store each row's activations as one list<float> column"
                )
            else:
                raise UserError(f"{path} has several float-list columns; name one with --column "
                                f"({', '.join(lists)})")
        elif column not in names:
            raise UserError(f"{path} has no column {column!r} (columns: {', '.join(names[:12])})")
        ctype = schema.field(column).type
        if not _is_float_list(ctype):
            raise UserError(
                f"{path}: column {column!r} is {ctype}, not a list of floats (one row per "
                "activation vector; d scalar columns are not read: pack them into one list)"
            )
        self.column = column
        self.dtype = str(ctype.value_type)
        if group_column is not None:
            if group_column not in names:
                raise UserError(f"{path} has no group column {group_column!r} "
                                f"(columns: {', '.join(names[:12])})")
            gtype = schema.field(group_column).type
            if pa.types.is_dictionary(gtype):
                gtype = gtype.value_type
            if not (pa.types.is_integer(gtype) or pa.types.is_string(gtype)
                    or pa.types.is_large_string(gtype)):
                raise UserError(f"{path}: group column {group_column!r} is {gtype}; "
                                "use integers or strings")
        self.group_column = group_column
        self.extra = [n for n in dict.fromkeys([*PROVENANCE, group_column])
                      if n is not None and n in names and n != column]
        self.rows = self.file.metadata.num_rows
        if self.rows == 0:
            raise UserError(f"{path}: column {column!r} has no rows")
        if pa.types.is_fixed_size_list(ctype):
            self.d = ctype.list_size
        else:
            first = next(self.file.iter_batches(batch_size=1, columns=[column])).column(0)
            if first.null_count:
                raise UserError(f"{path}: column {column!r} is null in row 0")
            self.d = len(first[0].values)
        if self.d == 0:
            raise UserError(f"{path}: column {column!r} has rows of length 0")

    def describe(self) -> dict:
        return {**super().describe(), "column": self.column, "copied_columns": self.extra}

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        start = 0
        for batch in self.file.iter_batches(batch_size=chunk_rows, columns=[self.column, *self.extra]):
            x = self._rows(batch.column(self.column), start)
            cols = {n: batch.column(n) for n in self.extra}
            yield Chunk(start, x, cols)
            start += batch.num_rows

    def _rows(self, arr: pa.Array, start: int) -> np.ndarray:
        """A list column of one batch -> [rows, d], refusing nulls and ragged rows."""
        name, d = self.column, self.d
        if arr.null_count:
            i = int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
            raise UserError(f"{self.path}: column {name!r} is null in row {start + i}")
        if not pa.types.is_fixed_size_list(arr.type):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != d)
            if len(bad):
                i = int(bad[0])
                raise UserError(f"{self.path}: row {start + i} of column {name!r} has "
                                f"{lengths[i]} values, row 0 has {d}")
        values = arr.flatten()  # honours the batch's offsets and slicing
        if values.null_count:
            i = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False))) // d
            raise UserError(f"{self.path}: column {name!r} has a null value in row {start + i}")
        return values.to_numpy(zero_copy_only=False).reshape(-1, d)

    def groups(self, chunk: Chunk) -> np.ndarray | None:
        if self.group_column is None:
            return None
        return group_ids(chunk.columns[self.group_column], self.path, self.group_column, chunk.start)


def group_ids(col: pa.Array, path: Path | str = "", name: str = "", start: int = 0) -> np.ndarray:
    """A group column -> [rows] uint64 ids for ``heldout_mask``: integers as they are (two's
    complement for negatives), strings by the first 8 bytes of their BLAKE2b digest, which
    does not depend on the run, the platform or the order of the rows."""
    if col.null_count:
        i = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise UserError(f"{path}: group column {name!r} is null in row {start + i}")
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_integer(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    enc = pc.dictionary_encode(col)
    table = np.array(
        [int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
         for v in enc.dictionary.to_pylist()],
        dtype=np.uint64,
    )
    return table[enc.indices.to_numpy(zero_copy_only=False)]


def open_input(
    path: str | os.PathLike,
    column: str | None = None,
    tensor: str | None = None,
    group_column: str | None = None,
) -> _Input:
    """Open a .npy / .safetensors / .parquet input, checked (UserError on a bad one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"input {path} does not exist" if not path.exists() else
                        f"input {path} is not a file")
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"input {path}: unknown suffix {path.suffix!r} "
                        f"(accepted: {', '.join(KINDS)})")
    if column is not None and kind != "parquet":
        raise UserError(f"--column is for Parquet inputs; {path} is a {kind} file")
    if tensor is not None and kind != "safetensors":
        raise UserError(f"--tensor is for safetensors inputs; {path} is a {kind} file")
    if group_column is not None and kind != "parquet":
        raise UserError(f"--group-column needs a Parquet input ({path} has no columns); "
                        "a .npy or .safetensors input is split by blocks of --block-rows rows")
    if kind == "npy":
        return _Npy(path)
    if kind == "safetensors":
        return _Safetensors(path, tensor)
    return _Parquet(path, column, group_column)


def _check_values(x: np.ndarray, path: Path, start: int, dtype: str) -> None:
    """NaN / Inf, and float16 overflow, named by input row."""
    finite = np.isfinite(x).all(1)
    if not finite.all():
        raise UserError(f"{path}: non-finite value (NaN or Inf) in row {start + int(np.argmin(finite))}")
    if dtype == "float16":
        over = (np.abs(x) > FLOAT16_MAX).any(1)
        if over.any():
            raise UserError(f"{path}: row {start + int(np.argmax(over))} has a value beyond "
                            f"float16's range ({FLOAT16_MAX:g}); use --dtype float32")


def extract(
    out: str,
    input: str,
    column: str | None = None,
    tensor: str | None = None,
    group_column: str | None = None,
    block_rows: int = 128,
    chunk_rows: int | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    rows_per_shard: int = 16384,
    dtype: str = "float32",
    force: bool = False,
) -> dict:
    """Write the activation set of the rows in ``input`` to ``out``; returns the summary.
    An existing ``out`` is replaced only if it is an activation set, or with ``force``;
    never the input file or a folder holding it."""
    check_layout(heldout_fraction, rows_per_shard, seed)
    if block_rows < 1:
        raise UserError(f"--block-rows must be >= 1, got {block_rows}")
    if chunk_rows is not None and chunk_rows < 1:
        raise UserError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    inputs = local_inputs(input)
    check_extract_out(out, inputs, force)
    src = open_input(input, column=column, tensor=tensor, group_column=group_column)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (src.d * 8))
    if group_column is not None:
        split = {"by": "column", "column": group_column}
    else:
        split = {"by": "rows", "block_rows": block_rows}
    split.update(fraction=heldout_fraction, seed=seed)
    meta = {"input": src.describe(), "seed": seed,
            "versions": package_versions("isae", "numpy", "pyarrow", "safetensors")}
    log.info("importing %d rows of d=%d from %s (%s)", src.rows, src.d, src.path, src.kind)

    t0 = time.perf_counter()
    with progress(src.rows, desc=f"import {src.path.name}", unit="row") as bar, ActivationWriter(
        out, src.d, dtype=dtype, rows_per_shard=rows_per_shard, source="array", meta=meta,
        heldout=split, inputs=inputs, force=force,
    ) as writer:
        seen = 0
        for chunk in src.chunks(chunk_rows):
            _check_values(chunk.x, src.path, chunk.start, dtype)
            groups = src.groups(chunk)
            if groups is None:
                groups = (chunk.start + np.arange(len(chunk.x), dtype=np.int64)) // block_rows
            writer.add(chunk.x, heldout_mask(groups, heldout_fraction, seed), **chunk.columns)
            seen += len(chunk.x)
            bar.update(len(chunk.x))
        if seen != src.rows:
            raise UserError(f"{src.path}: read {seen} rows, its header says {src.rows}")
    seconds = time.perf_counter() - t0
    log.info("wrote %s: %d rows (%d held out) in %.1f s", out, writer.rows, writer.heldout_rows, seconds)
    return {
        "out": str(out),
        "source": "array",
        "input": str(src.path),
        "kind": src.kind,
        "rows": writer.rows,
        "train_rows": writer.rows - writer.heldout_rows,
        "heldout_rows": writer.heldout_rows,
        "d": writer.d,
        "seconds": round(seconds, 3),
        "rows_per_s": round(writer.rows / seconds, 1) if seconds > 0 else None,
    }
