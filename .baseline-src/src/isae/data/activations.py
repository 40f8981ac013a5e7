"""Activation sets on disk: a folder with ``meta.json`` and ``part-NNNNN.parquet`` shards.

The format is the contract between the extract stage and everything after it:

* ``meta.json``: ``d``, ``rows``, ``source``, ``dtype``, provenance, ``mean`` (d floats) and
  ``scale`` (float) such that ``(x - mean) / scale`` has E||.||^2 = d over the training rows,
  and ``heldout`` describing the split.
* files a text source writes beside meta.json when its provenance is too long for it, named
  in ``meta["text_source"]["file_list"]``: the ``stdlib`` corpus writes ``text_files.json``
  (``python``, ``implementation``, ``stdlib`` folder, ``files``: one ``{path, bytes, sha256}``
  per document in document-id order, ``skipped``: ``{path, reason}`` for files not used).
* shards: column ``x`` = ``fixed_size_list<float32|float16>[d]``, column ``heldout`` (bool,
  the one split every stage uses), provenance columns (``doc``/``pos``/``token_id``,
  ``image``/``patch``) and, for synthetic sets, ``z_idx`` / ``z_val``.

The minimal set the readers accept (for a set written by other code; ``isae extract
array`` makes one from a .npy, a .safetensors tensor or a Parquet column, and is the safer
way):

* ``meta.json`` with ``d`` (int) and ``rows`` (int). Without ``mean`` and ``scale`` the
  rows are used as they are (mean 0, scale 1), so every model then works on unnormalised
  activations; ``train_rows`` and ``heldout_rows`` are optional (row counts for buffer
  sizes and progress bars).
* one or more ``part-*.parquet`` files (read in name order), each with the columns ``x``, a
  ``fixed_size_list`` of float32 or float16 of length d (a variable-length ``list`` is not
  read), and ``heldout`` (bool). Other columns are optional: ``doc``, ``pos``, ``token_id``
  with the meta keys ``model`` and ``text`` let the feature browser show text; ``z_idx``,
  ``z_val`` and a ``truth/`` checkpoint make a synthetic set.

A shard without ``x`` or ``heldout`` is refused with one line naming the column and the file.

Writers stage everything under a temporary folder and rename it into place on success, so a
crash never leaves a set that looks complete. Readers stream shard by shard.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from isae.data.atomic import check_out, publish, staging_folder, write_json_atomic
from isae.data.json_files import read_json
from isae.errors import UserError
from isae.models.config import MAX_D_IN

FORMAT_VERSION = 1
SHARD_GLOB = "part-*.parquet"
#: Rows per Parquet row group in a shard (the unit Arrow decodes in parallel).
ROW_GROUP = 8192
#: Storage types of column x's elements.
X_TYPES = (pa.float32(), pa.float16())
#: More rows than any set can hold (a corrupt meta.json otherwise sizes arrays by it).
MAX_ROWS = 1 << 48


# ----------------------------------------------------------------------------- the split


def heldout_mask(groups: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministic held-out assignment by group (document or image), never by row.

    (groups: [rows] int) -> [rows] bool. A group is held out when a 64-bit mix of
    (group, seed) falls under ``fraction``; every stage that recomputes it agrees, and rows
    of one group always land on the same side.
    """
    with np.errstate(over="ignore"):
        # uint64 arithmetic wraps on purpose (also in the seed term).
        g = np.asarray(groups, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        # splitmix64 finaliser: a good mix of consecutive integers.
        g = (g ^ (g >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        g = (g ^ (g >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        g = g ^ (g >> np.uint64(31))
    u = (g >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction


# ----------------------------------------------------------------------------- writing


def _to_arrow(name: str, values) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    arr = np.asarray(values)
    if arr.ndim == 1:
        return pa.array(arr)
    if arr.ndim == 2:
        # Ragged lists are not needed by any source: rows of equal length become list<>.
        rows, width = arr.shape
        offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(arr.reshape(-1)))
    raise ValueError(f"column {name}: cannot store an array of {arr.ndim} dimensions")


class ActivationWriter:
    """Write an activation set shard by shard; ``close()`` publishes it atomically.

    Use as a context manager: leaving the block with an exception removes the staging
    folder, so nothing half-written is ever visible at ``out``.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        d: int,
        *,
        dtype: str = "float32",
        rows_per_shard: int = 16384,
        source: str,
        meta: Mapping | None = None,
        heldout: Mapping | None = None,
        on_close: Callable[[Path, dict], None] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
        force: bool = False,
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise UserError(f"dtype must be float32 or float16, not {dtype!r}")
        # An existing out is replaced only if it is an activation set (or with force), never
        # when it is or holds one of the inputs (see isae.data.atomic.check_out).
        check_out(out, "activations", inputs=inputs, force=force)
        self.out = Path(out)
        self.d = int(d)
        self.dtype = np.dtype(dtype)
        self.rows_per_shard = int(rows_per_shard)
        self.source = source
        self.meta = dict(meta or {})
        self.heldout = dict(heldout or {})
        # on_close(stage_dir, meta): writes extra files (a synthetic set's truth/) into the
        # staged set before the rename, so they appear atomically with the shards; it may add
        # keys to meta, which is written after it.
        self.on_close = on_close
        self.stage = staging_folder(self.out)
        self._pending: list[dict[str, np.ndarray | pa.Array]] = []
        self._pending_rows = 0
        self._shards = 0
        self.rows = 0
        self.heldout_rows = 0
        # Streaming float64 moments over the training rows, for normalisation constants.
        self._sum = np.zeros(self.d, np.float64)
        self._sumsq = 0.0
        self._n = 0

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, x: np.ndarray, heldout: np.ndarray, **columns) -> None:
        """Append rows. (x: [rows, d]) float; (heldout: [rows]) bool; columns: [rows] or
        [rows, w] arrays, or pyarrow arrays of length rows."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x has shape {x.shape}, expected [rows, {self.d}]")
        if not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x))[0, 0])
            raise UserError(f"non-finite activation in row {self.rows + bad} of {self.source}")
        heldout = np.asarray(heldout, dtype=bool)
        x = x.astype(self.dtype, copy=False)
        # Constants from the stored (possibly float16) values, so readers see exactly them.
        train = x[~heldout].astype(np.float64)
        self._sum += train.sum(0)
        self._sumsq += float((train**2).sum())
        self._n += train.shape[0]
        self.heldout_rows += int(heldout.sum())
        start = 0
        while start < x.shape[0]:
            take = min(self.rows_per_shard - self._pending_rows, x.shape[0] - start)
            sl = slice(start, start + take)
            chunk = {"x": x[sl], "heldout": heldout[sl]}
            for k, v in columns.items():
                chunk[k] = v.slice(start, take) if isinstance(v, pa.Array) else np.asarray(v)[sl]
            self._pending.append(chunk)
            self._pending_rows += take
            start += take
            if self._pending_rows == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        names = list(self._pending[0])
        cols = {}
        for name in names:
            parts = [c[name] for c in self._pending]
            if isinstance(parts[0], pa.Array):
                cols[name] = pa.concat_arrays(parts)
            else:
                cols[name] = np.concatenate(parts)
        x = cols.pop("x")
        # x and its elements are declared non-null: Parquet then stores no definition
        # levels for them: Arrow decodes a float16 shard's column 1.75x faster, the whole
        # shard read (checks and copy included) 1.3x (benchmarks/RESULTS.md).
        xtype = pa.list_(pa.field("item", pa.from_numpy_dtype(x.dtype), nullable=False), self.d)
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type=xtype)]
        arrays += [_to_arrow(k, v) for k, v in cols.items()]
        fields = [pa.field("x", xtype, nullable=False)]
        fields += [pa.field(k, a.type) for k, a in zip(cols, arrays[1:])]
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        path = self.stage / f"part-{self._shards:05d}.parquet"
        # Reading is the trainer's bottleneck, so the activations are stored plainly: no
        # dictionary (it made the nested column ~4x slower to read) and no compression
        # (zstd saved 7% on MiniLM activations and made reading 3.5x slower), in row groups
        # that Arrow decodes in parallel.
        pq.write_table(table, path, write_statistics=False,
                       compression={c: "none" if c == "x" else "zstd" for c in table.column_names},
                       use_dictionary=[c for c in table.column_names if c != "x"],
                       data_page_version="2.0", row_group_size=ROW_GROUP)
        self._shards += 1
        self.rows += table.num_rows
        self._pending, self._pending_rows = [], 0

    def close(self) -> Path:
        """Write meta.json and publish the set at ``out``; on any failure (a full disk, say)
        the staged folder is removed and the old ``out``, if any, stays as it was."""
        try:
            return self._close()
        except BaseException:
            self.abort()
            raise

    def _close(self) -> Path:
        self._flush()
        if self.rows == 0:
            raise UserError(f"no activations were produced for {self.out}")
        if self._n == 0:
            raise UserError(f"every row of {self.out} is held out: no training rows")
        mean = self._sum / self._n
        var = max(self._sumsq / self._n - float(mean @ mean), 0.0)
        scale = math.sqrt(var / self.d) if var > 0 else 1.0
        meta = {
            "version": FORMAT_VERSION,
            "d": self.d,
            "rows": self.rows,
            "train_rows": self.rows - self.heldout_rows,
            "heldout_rows": self.heldout_rows,
            "shards": self._shards,
            "source": self.source,
            "dtype": self.dtype.name,
            "heldout": self.heldout,
            **self.meta,
            "mean": [float(v) for v in mean],
            "scale": scale,
        }
        if self.on_close is not None:
            self.on_close(self.stage, meta)
        write_json_atomic(self.stage / "meta.json", meta)
        publish(self.stage, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Normalizer:
    """Maps raw activations to the normalised space every model works in, and back:
    ``(x - mean) / scale`` (meta.json's constants; a checkpoint keeps them in cfg.json).

    The one place that applies them: numpy arrays and torch tensors alike ([..., d]); a
    tensor gets the mean as a float32 tensor on its own device, made once per device.
    """

    mean: np.ndarray
    """[d] float32."""
    scale: float
    _means: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def forward(self, x):
        """Raw activations [..., d] (array or tensor) -> normalised, the same kind."""
        return (x - self._mean_for(x)) / self.scale

    def inverse(self, x):
        """Normalised [..., d] (array or tensor) -> raw activations, the same kind."""
        return x * self.scale + self._mean_for(x)

    def _mean_for(self, x):
        if isinstance(x, np.ndarray) or not hasattr(x, "device"):
            return self.mean
        import torch

        mean = self._means.get(x.device)
        if mean is None:
            mean = self._means[x.device] = torch.as_tensor(self.mean, device=x.device)
        return mean


class ActivationSet:
    """Read side of the format: metadata, shard list and streaming iterators."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"activation set {self.path} does not exist (run `isae extract`)")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"activation set {self.path} has no meta.json (incomplete or not a set)")
        self.meta = read_json(meta_path)
        self.shards = sorted(self.path.glob(SHARD_GLOB))
        check_meta(self.meta, meta_path, len(self.shards))
        self.d = self.meta["d"]
        self.rows = self.meta["rows"]
        if not self.shards:
            raise UserError(f"activation set {self.path} has no {SHARD_GLOB} shards")
        # The first shard's schema now; every shard's as it is read. The shards' row counts
        # against meta.json: a shard lost, truncated or left from another extraction would
        # otherwise shift the held-out split silently. Both from the footers only.
        footers = [self._footer(p) for p in self.shards]
        self._check_schema(self.shards[0], footers[0].schema.to_arrow_schema())
        found = sum(f.num_rows for f in footers)
        if found != self.rows:
            raise UserError(f"activation set {self.path}: its {len(self.shards)} shards hold "
                            f"{found} rows, meta.json says {self.rows} (a shard missing, "
                            "truncated or from another extraction?): extract it again")

    def _footer(self, path: Path) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read shard {path}: {_first_line(e)}") from None

    def _schema(self, path: Path) -> pa.Schema:
        return self._footer(path).schema.to_arrow_schema()

    def _check_schema(self, path: Path, schema: pa.Schema) -> None:
        """Column x: fixed_size_list<float32|float16>[d]; column heldout: bool."""
        for name in ("x", "heldout"):
            if schema.get_field_index(name) < 0:
                raise _missing_column(path, name)
        xtype = schema.field("x").type
        if not (pa.types.is_fixed_size_list(xtype) and xtype.list_size == self.d
                and xtype.value_type in X_TYPES):
            raise UserError(
                f"shard {path}: column x is {xtype}, expected fixed_size_list<float32 or "
                f"float16>[{self.d}] (d in meta.json)"
            )
        htype = schema.field("heldout").type
        if not pa.types.is_boolean(htype):
            raise UserError(f"shard {path}: column heldout is {htype}, expected bool")

    @property
    def has_truth(self) -> bool:
        return (self.path / "truth" / "sae.safetensors").is_file()

    def normalizer(self) -> Normalizer:
        mean = np.asarray(self.meta.get("mean", np.zeros(self.d)), np.float32)
        return Normalizer(mean=mean, scale=float(self.meta.get("scale", 1.0)))

    def columns(self) -> list[str]:
        return self._schema(self.shards[0]).names

    def fingerprint(self) -> dict:
        """What identifies the set's content without reading it: meta.json's digest (its
        seed, constants and counts) and every shard's name and size, as they are on disk
        now (so a set replaced since it was opened shows). OSError when meta.json is gone."""
        import hashlib

        meta = hashlib.sha256((self.path / "meta.json").read_bytes()).hexdigest()
        shards = sorted(self.path.glob(SHARD_GLOB))
        h = hashlib.sha256()
        for p in shards:
            h.update(f"{p.name}:{p.stat().st_size};".encode())
        return {"meta_sha256": meta, "shards": len(shards), "shards_sha256": h.hexdigest()}

    def iter_shards(
        self, split: str = "train", columns: list[str] | None = None, shards=None,
        native: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield one dict per shard: ``x`` as float32 [rows, d], other columns as numpy.

        split: ``train``, ``heldout`` or ``all``. native: keep ``x`` in its stored dtype
        (float16 sets: half the bytes to move; the trainer converts on its device).
        Non-finite activations raise a UserError naming the shard and row.
        """
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be train, heldout or all, not {split!r}")
        want = ["x", "heldout"] + [c for c in (columns or []) if c not in ("x", "heldout")]
        for path in shards if shards is not None else self.shards:
            schema = self._schema(path)
            self._check_schema(path, schema)
            for name in want[2:]:
                if schema.get_field_index(name) < 0:
                    raise _missing_column(path, name)
            try:
                table = pq.read_table(path, columns=want, memory_map=True)
            except (pa.ArrowException, OSError, KeyError) as e:
                raise _shard_error(path, want, e) from None
            xcol = table.column("x")
            if xcol.null_count or table.column("heldout").null_count:
                raise UserError(f"shard {path}: missing values (nulls) in column x or heldout")
            held = table.column("heldout").to_numpy(zero_copy_only=False).astype(bool)
            keep = None if split == "all" else (held if split == "heldout" else ~held)
            x = self._x_rows(path, xcol, keep)
            out = {"x": x if native else x.astype(np.float32, copy=False)}
            for name in want[1:]:
                col = table.column(name).combine_chunks()
                if pa.types.is_list(col.type):
                    v = _list_to_numpy(col)
                else:
                    v = col.to_numpy(zero_copy_only=False)
                out[name] = v if keep is None else v[keep]
            if len(out["x"]):
                yield out

    def _x_rows(self, path: Path, xcol: pa.ChunkedArray, keep: np.ndarray | None) -> np.ndarray:
        """Column x's rows (those in ``keep``) as one array in the stored dtype, checked
        finite, chunk by chunk: one copy of the kept rows, where combining the chunks and
        then masking made two, and the check runs on cache-sized blocks."""
        n_out = len(xcol) if keep is None else int(keep.sum())
        chunks = [c for c in xcol.chunks if len(c)]
        if keep is None and len(chunks) == 1:
            x = chunks[0].flatten().to_numpy(zero_copy_only=False).reshape(-1, self.d)
            _check_finite(path, x, 0)
            return x
        dtype = chunks[0].type.value_type.to_pandas_dtype() if chunks else np.float32
        x = np.empty((n_out, self.d), dtype=dtype)
        start = pos = 0
        for c in chunks:
            v = c.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.d)
            _check_finite(path, v, start)
            if keep is None:
                x[pos : pos + len(v)] = v
                pos += len(v)
            else:
                k = keep[start : start + len(v)]
                m = int(k.sum())
                np.compress(k, v, axis=0, out=x[pos : pos + m])
                pos += m
            start += len(v)
        return x

    def load(
        self, split: str = "heldout", columns: list[str] | None = None, max_rows: int | None = None
    ) -> dict[str, np.ndarray]:
        """Concatenate a split into memory (for held-out evaluation sets, which are small)."""
        parts: list[dict[str, np.ndarray]] = []
        n = 0
        for part in self.iter_shards(split, columns):
            parts.append(part)
            n += len(part["x"])
            if max_rows is not None and n >= max_rows:
                break
        if not parts:
            raise UserError(f"activation set {self.path} has no {split} rows")
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if max_rows is not None:
            out = {k: v[:max_rows] for k, v in out.items()}
        return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def check_meta(meta, where: Path, n_shards: int | None = None) -> None:
    """A UserError naming ``where`` and the key unless ``meta`` is a valid meta.json:
    d an integer in [1, MAX_D_IN]; rows, train_rows, heldout_rows integers that add up;
    mean d finite numbers; scale finite and positive; dtype float32 or float16; shards the
    number of shard files present (``n_shards``)."""
    if not isinstance(meta, dict):
        raise UserError(f"{where} is not a JSON object")
    for key in ("d", "rows"):
        if key not in meta:
            raise UserError(f"{where} lacks the required key {key!r}")
    d, rows = meta["d"], meta["rows"]
    if not _is_int(d) or not 1 <= d <= MAX_D_IN:
        raise UserError(f"{where}: d must be an integer in [1, {MAX_D_IN}], not {d!r}")
    if not _is_int(rows) or not 0 <= rows <= MAX_ROWS:
        raise UserError(f"{where}: rows must be a non-negative integer, not {rows!r}")
    for key in ("train_rows", "heldout_rows"):
        v = meta.get(key)
        if v is not None and (not _is_int(v) or not 0 <= v <= rows):
            raise UserError(f"{where}: {key} must be an integer in [0, rows={rows}], not {v!r}")
    if _is_int(meta.get("train_rows")) and _is_int(meta.get("heldout_rows")):
        if meta["train_rows"] + meta["heldout_rows"] != rows:
            raise UserError(f"{where}: train_rows + heldout_rows must equal rows={rows}")
    if "shards" in meta and n_shards is not None and meta["shards"] != n_shards:
        raise UserError(
            f"{where} lists {meta['shards']!r} shards but the folder holds {n_shards}: "
            "the set is incomplete or was changed"
        )
    version = meta.get("version", FORMAT_VERSION)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"{where}: format version {version!r} is not one this isae reads "
                        f"(1 to {FORMAT_VERSION})")
    if "dtype" in meta and meta["dtype"] not in ("float32", "float16"):
        raise UserError(f"{where}: dtype must be float32 or float16, not {meta['dtype']!r}")
    if "mean" in meta:
        mean = meta["mean"]
        if (not isinstance(mean, list) or len(mean) != d
                or not all(isinstance(v, Real) and not isinstance(v, bool) for v in mean)):
            raise UserError(f"{where}: mean must be a list of d={d} numbers")
        try:
            ok = bool(np.isfinite(np.asarray(mean, np.float64)).all())
        except OverflowError:
            ok = False
        if not ok or max((abs(v) for v in mean), default=0) > 1e30:
            raise UserError(f"{where}: mean holds non-finite or huge values")
    if "scale" in meta:
        scale = meta["scale"]
        ok = isinstance(scale, Real) and not isinstance(scale, bool)
        try:
            ok = ok and 1e-30 < float(scale) < 1e30
        except OverflowError:
            ok = False
        if not ok:
            raise UserError(f"{where}: scale must be a positive finite number, not {scale!r}")

def _shard_error(path: Path, want: list[str], err: Exception) -> UserError:
    """One line for a shard that cannot be read: the missing column by name where that is
    the cause (Arrow's own message is a multi-line schema dump)."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        names = None
    if names is not None:
        missing = [c for c in want if c not in names]
        if missing:
            return _missing_column(path, missing[0])
    return UserError(f"cannot read shard {path}: {_first_line(err)}")


def _missing_column(path: Path, name: str) -> UserError:
    hint = ""
    if name in ("x", "heldout"):
        hint = " (every shard needs x and heldout; `isae extract array` makes a set from other files)"
    return UserError(f"shard {path} has no column {name!r}{hint}")


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """[rows] bool: all values finite. float16 by its exponent bits (NumPy's float16
    arithmetic is slow; an all-ones exponent is exactly Inf or NaN)."""
    if x.dtype == np.float16:
        return ((x.view(np.uint16) & 0x7C00) != 0x7C00).all(1)
    return np.isfinite(x).all(1)


def _check_finite(path: Path, x: np.ndarray, first_row: int, block: int = 2048) -> None:
    """A UserError naming the shard and row of the first non-finite activation in x, whose
    row 0 is the shard's row ``first_row``. Blocks of rows keep the temporaries in cache."""
    for i in range(0, len(x), block):
        ok = _finite_rows(x[i : i + block])
        if not ok.all():
            row = first_row + i + int(np.argmin(ok))
            raise UserError(f"{path}: non-finite activation (NaN or Inf) in row {row}")


def _list_to_numpy(col: pa.ListArray) -> np.ndarray:
    """list<> column of equal-length rows -> [rows, w] numpy array."""
    offsets = col.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = col.values.to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths == lengths[0]).all():
        return values[offsets[0] : offsets[-1]].reshape(len(lengths), int(lengths[0]))
    raise UserError("list column with rows of different lengths is not supported")


# ----------------------------------------------------------------------------- samples


def split_counts(acts: ActivationSet, split: str = "train") -> np.ndarray:
    """[shards] int64: the rows of ``split`` (train | heldout | all) in each shard, from
    the ``heldout`` column alone (one bool per row read, no activations)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    counts = np.zeros(len(acts.shards), np.int64)
    for i, path in enumerate(acts.shards):
        try:
            held = pq.read_table(path, columns=["heldout"]).column("heldout")
        except (pa.ArrowException, OSError, KeyError) as e:
            raise _shard_error(path, ["heldout"], e) from None
        h = held.to_numpy(zero_copy_only=False).astype(bool)
        counts[i] = len(h) if split == "all" else int(h.sum() if split == "heldout" else (~h).sum())
    return counts


def sample_rows(
    acts: ActivationSet, n: int, seed: int, split: str = "train",
    columns: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """``n`` rows of ``split`` drawn uniformly without replacement from the whole split
    (every row when it has no more than ``n``), read shard by shard, so that memory holds
    the sample and one shard, never the set.

    The draw: ``numpy.random.default_rng(seed).choice(N, n, replace=False)`` over the
    split's N rows numbered in shard order; the rows come back in that order (x: [n, d]
    float32, other columns as ``iter_shards`` gives them). A function of the set and the
    seed alone: neither the shard size nor the caller's order of reading changes it.
    """
    if n < 1:
        raise ValueError(f"sample of {n} rows")
    counts = split_counts(acts, split)
    total = int(counts.sum())
    if total == 0:
        raise UserError(f"activation set {acts.path} has no {split} rows")
    if n >= total:
        pick = np.arange(total, dtype=np.int64)
    else:
        pick = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts: list[dict[str, np.ndarray]] = []
    for i, path in enumerate(acts.shards):
        lo, hi = np.searchsorted(pick, [starts[i], starts[i + 1]])
        if lo == hi:
            continue  # no sampled row here: the shard is not read
        local = pick[lo:hi] - starts[i]
        for part in acts.iter_shards(split, columns, shards=[path]):
            parts.append({k: v[local] for k, v in part.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def split_moments(acts: ActivationSet, split: str = "train") -> tuple[np.ndarray, np.ndarray, int]:
    """The mean [d] and covariance [d, d] (float64, divisor N − 1) of every row of
    ``split``, streamed shard by shard; -> (mean, cov, N).

    Sums are taken about meta.json's mean (the training rows' own), so that a large common
    offset, as in a residual stream, costs no precision."""
    shift = np.asarray(acts.meta.get("mean", np.zeros(acts.d)), np.float64)
    s = np.zeros(acts.d, np.float64)
    ss = np.zeros((acts.d, acts.d), np.float64)
    n = 0
    for part in acts.iter_shards(split):
        x = part["x"].astype(np.float64) - shift
        s += x.sum(0)
        ss += x.T @ x
        n += len(x)
    if n < 2:
        raise UserError(f"activation set {acts.path} has {n} {split} rows: a covariance needs 2")
    m = s / n
    cov = (ss - n * np.outer(m, m)) / (n - 1)
    return shift + m, (cov + cov.T) / 2, n
