"""Two disjoint halves of an activation set by document, for split-data reproducibility:
SAEs of one recipe trained on the two halves say how much of a dictionary the data fix,
beside the seeds' agreement on the same data.

The rule (``assign_halves``): the documents that hold training rows (column ``doc``; a set
without one, or ``by="row"``, treats each row as its own document) are put in a random
order, ``numpy.random.default_rng(seed).permutation`` over their ids sorted, and cut where
the running count of training rows passes half the split: a document goes to half 0 when
the middle of its rows falls before the middle of the split, else to half 1. The halves
are disjoint by document, together they are the whole training split, and their training
rows differ by at most one document's.

Held-out rows: **every held-out row of the set is in both halves**, so that SAEs trained on
the two halves are evaluated on the same rows, and the held-out documents stay apart from
both halves' training documents as they were (the split is by document). A half is a valid
activation set (isae.data.activations): the same columns, dtype, held-out rule and
provenance as the set, its own normalisation constants (over its own training rows), and
under ``split`` in meta.json what made it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from isae.data.activations import ActivationSet, ActivationWriter
from isae.errors import UserError
from isae.progress import progress

log = logging.getLogger(__name__)

#: meta.json keys the writer sets itself, and counts of the whole set a half must not carry.
_NOT_COPIED = {"version", "d", "rows", "train_rows", "heldout_rows", "shards", "dtype",
               "heldout", "mean", "scale", "tokens", "documents", "split"}


def assign_halves(groups: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """(groups: [G] distinct int ids; counts: [G] training rows of each) -> [G] int8, the
    half (0 or 1) of each group: the groups in a seeded random order, half 0 those whose
    rows' middle falls before the middle of all rows. Independent of the order of
    ``groups`` (they are sorted before the permutation)."""
    groups = np.asarray(groups)
    counts = np.asarray(counts, np.int64)
    if groups.shape != counts.shape or len(np.unique(groups)) != len(groups):
        raise ValueError("groups must be distinct ids, one count each")
    order = np.argsort(groups, kind="stable")
    perm = order[np.random.default_rng(seed).permutation(len(groups))]
    c = counts[perm].astype(np.float64)
    middle = np.cumsum(c) - c / 2
    half = np.empty(len(groups), np.int8)
    half[perm] = (middle >= c.sum() / 2).astype(np.int8)
    return half


def _group_ids(part: dict, by: str, first_row: int) -> np.ndarray:
    if by == "doc":
        return np.asarray(part["doc"]).astype(np.int64)
    return first_row + np.arange(len(part["heldout"]), dtype=np.int64)


def training_groups(acts: ActivationSet, by: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (sorted distinct group ids of the training rows [G], training rows of each [G]),
    from the ``doc`` and ``heldout`` columns alone."""
    ids, cnts = [], []
    first = 0
    for path in acts.shards:
        cols = ["heldout", "doc"] if by == "doc" else ["heldout"]
        t = pq.read_table(path, columns=cols)
        part = {c: t.column(c).to_numpy(zero_copy_only=False) for c in cols}
        g = _group_ids(part, by, first)[~part["heldout"].astype(bool)]
        u, n = np.unique(g, return_counts=True)
        ids.append(u)
        cnts.append(n)
        first += t.num_rows
    u, inv = np.unique(np.concatenate(ids), return_inverse=True)
    return u, np.bincount(inv, weights=np.concatenate(cnts)).astype(np.int64)


def write_half(
    source: str | os.PathLike,
    half: int,
    out: str | os.PathLike,
    seed: int = 0,
    by: str = "auto",
    rows_per_shard: int = 16384,
    force: bool = False,
) -> dict:
    """Write half ``half`` (0 or 1) of ``source`` to ``out`` (see the module docstring);
    -> the summary. ``by``: ``doc``, ``row`` or ``auto`` (doc when the set has the column)."""
    if half not in (0, 1):
        raise UserError(f"--half must be 0 or 1, not {half}")
    if by not in ("auto", "doc", "row"):
        raise UserError(f"--by must be auto, doc or row, not {by!r}")
    acts = ActivationSet(source)
    names = acts.columns()
    if by == "auto":
        by = "doc" if "doc" in names else "row"
    elif by == "doc" and "doc" not in names:
        raise UserError(f"{acts.path} has no doc column: split it --by row")
    groups, counts = training_groups(acts, by)
    if len(groups) < 2:
        raise UserError(f"{acts.path} has {len(groups)} training {by}(s): nothing to split")
    halves = assign_halves(groups, counts, seed)
    mine = halves == half
    meta = {k: v for k, v in acts.meta.items() if k not in _NOT_COPIED}
    meta["split"] = {
        "from": str(acts.path.resolve()),
        "from_meta_sha256": hashlib.sha256((acts.path / "meta.json").read_bytes()).hexdigest(),
        "by": by, "half": half, "seed": seed,
        "rule": "groups with training rows in a seeded random order, cut at half the training rows",
        "groups": int(mine.sum()), "groups_total": int(len(groups)),
        "train_rows_total": int(counts.sum()),
        "heldout": "every held-out row of the source, in both halves",
    }
    file_list = (acts.meta.get("text_source") or {}).get("file_list")

    def copy_files(stage: Path, _meta: dict) -> None:
        # The truth of a synthetic set and the corpus' file list travel with the rows.
        if acts.has_truth:
            shutil.copytree(acts.path / "truth", stage / "truth")
        if isinstance(file_list, str) and (acts.path / file_list).is_file():
            shutil.copy2(acts.path / file_list, stage / file_list)

    extra = [c for c in names if c not in ("x", "heldout")]
    log.info("half %d of %s by %s: %d of %d groups", half, acts.path, by, mine.sum(), len(groups))
    first = 0
    with ActivationWriter(out, acts.d, dtype=acts.meta.get("dtype", "float32"),
                          rows_per_shard=rows_per_shard, source=acts.meta.get("source", "split"),
                          meta=meta, heldout=acts.meta.get("heldout", {}), on_close=copy_files,
                          inputs=[source], force=force) as writer, \
            progress(total=acts.rows, desc=f"half {half}", unit="row") as bar:
        for path in acts.shards:
            n_rows = pq.read_metadata(path).num_rows
            for part in acts.iter_shards("all", extra, shards=[path], native=True):
                held = part["heldout"].astype(bool)
                g = _group_ids(part, by, first)
                at = np.clip(np.searchsorted(groups, g), 0, len(groups) - 1)
                keep = held | ((groups[at] == g) & mine[at])
                if keep.any():
                    cols = {k: v[keep] for k, v in part.items() if k not in ("x", "heldout")}
                    writer.add(part["x"][keep], held[keep], **cols)
            first += n_rows
            bar.update(n_rows)
    return {"out": str(out), "source": str(acts.path), "by": by, "half": half, "seed": seed,
            "groups": int(mine.sum()), "rows": writer.rows,
            "train_rows": writer.rows - writer.heldout_rows, "heldout_rows": writer.heldout_rows}
