"""``isae extract gaussian --like SET``: Gaussian rows with the mean and covariance of SET's
training split, the data of the *trained null* (SAEs of the same shape and recipe trained on
data that has the activations' second-order structure and nothing else).

The generative model, row by row: ``x = mean + Σ^½ z``, ``z ~ N(0, I_d)``, where ``mean``
[d] and ``Σ`` [d, d] are the mean and covariance (divisor N − 1) of *every* training row of
SET, streamed shard by shard in float64 (isae.data.activations.split_moments: one pass, the
set never in memory), and ``Σ^½ = V diag(√λ) Vᵀ`` from its eigendecomposition, eigenvalues
under 1e-12 of the largest set to 0 (a rank-deficient covariance gives rows inside the
data's span). Rows are generated in blocks of ``BLOCK_ROWS``, block b from
``numpy.random.default_rng([seed, 1, b])``, so the set depends on SET, ``rows`` and
``seed`` alone (not on the shard size), and a longer set starts with a shorter one's rows.

The held-out split is SET's: row i is held out when SET's row ``i mod SET.rows`` is, so
with ``rows`` = SET's rows (the default) both sets hold out the same number of rows at the
same positions. The rows are independent, so the position carries no meaning; the count
does. Column ``row`` numbers the rows (there are no documents: ``isae split`` splits such
a set by row). meta.json records SET (path, rows, meta.json digest), the moments' row
count and the covariance's rank under ``like`` and ``generator``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from isae.data.activations import ActivationSet, ActivationWriter, split_moments
from isae.data.sources import check_extract_out, check_layout, package_versions
from isae.errors import UserError
from isae.limits import check_disk
from isae.progress import progress

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192
"""Rows generated per seeded block."""
MODEL = "x = mean + V diag(sqrt(lambda)) V^T z, z ~ N(0, I_d); (mean, V lambda V^T) of every training row of the source"


def covariance_root(cov: np.ndarray, rel_floor: float = 1e-12) -> tuple[np.ndarray, int]:
    """(cov: [d, d] symmetric PSD) -> (R [d, d] float64 with R Rᵀ = cov, numerical rank):
    R = V diag(√λ), eigenvalues under ``rel_floor`` × the largest set to 0."""
    lam, V = np.linalg.eigh(np.asarray(cov, np.float64))
    keep = lam > lam.max() * rel_floor
    lam = np.where(keep, lam, 0.0)
    return V * np.sqrt(lam), int(keep.sum())


def heldout_pattern(acts: ActivationSet) -> np.ndarray:
    """[rows] bool: the set's ``heldout`` column in row order (nothing else read)."""
    import pyarrow.parquet as pq

    parts = [pq.read_table(p, columns=["heldout"]).column("heldout").to_numpy(zero_copy_only=False)
             for p in acts.shards]
    return np.concatenate(parts).astype(bool)


def extract(
    out: str,
    like: str,
    rows: int | None = None,
    seed: int = 0,
    rows_per_shard: int = 16384,
    dtype: str | None = None,
    force: bool = False,
) -> dict:
    """Write the Gaussian set shaped like ``like`` to ``out``; return the summary. An
    existing ``out`` is replaced only if it is an activation set, or with ``force``; never
    ``like`` or a folder holding it."""
    check_layout(0.0, rows_per_shard, seed)
    src = ActivationSet(like)
    rows = src.rows if rows is None else int(rows)
    if rows < 1:
        raise UserError(f"--rows must be >= 1, got {rows}")
    dtype = dtype or src.meta.get("dtype", "float32")
    check_extract_out(out, [like], force)
    check_disk(rows * src.d * (2 if dtype == "float16" else 4), Path(out).parent,
               "lower --rows, or write elsewhere")
    t0 = time.perf_counter()
    log.info("moments of %s's training rows (d=%d)", src.path, src.d)
    mean, cov, n = split_moments(src)
    root, rank = covariance_root(cov)
    held = heldout_pattern(src)
    if len(held) != src.rows or int((~held).sum()) != n:
        raise UserError(f"{src.path}: its held-out column changed while it was read")
    meta = {
        "like": {"path": str(src.path.resolve()), "source": src.meta.get("source"),
                 "rows": src.rows, "train_rows": n,
                 "meta_sha256": hashlib.sha256((src.path / "meta.json").read_bytes()).hexdigest()},
        "generator": {"model": MODEL, "moments_rows": n, "covariance_rank": rank,
                      "trace": float(np.trace(cov)), "block_rows": BLOCK_ROWS},
        "seed": seed,
        "columns": {"row": "row id"},
        "versions": package_versions("isae", "numpy", "pyarrow"),
    }
    split = {"by": "like", "rule": "row i is held out when the source's row i mod its rows is",
             "from": str(src.path.resolve()), "fraction": float(held.mean())}
    with ActivationWriter(out, src.d, dtype=dtype, rows_per_shard=rows_per_shard,
                          source="gaussian", meta=meta, heldout=split, inputs=[like],
                          force=force) as writer, \
            progress(total=rows, desc="gaussian", unit="row") as bar:
        for b, start in enumerate(range(0, rows, BLOCK_ROWS)):
            m = min(BLOCK_ROWS, rows - start)
            # Always a whole block, cut afterwards: a longer set starts with this one's rows.
            z = np.random.default_rng([seed, 1, b]).standard_normal((BLOCK_ROWS, src.d))[:m]
            x = mean + z @ root.T
            idx = np.arange(start, start + m, dtype=np.int64)
            writer.add(x, held[idx % src.rows], row=idx)
            bar.update(m)
    seconds = time.perf_counter() - t0
    log.info("wrote %s: %d Gaussian rows like %s in %.1f s", out, writer.rows, src.path, seconds)
    return {"source": "gaussian", "out": str(Path(out)), "like": str(src.path), "d": src.d,
            "rows": writer.rows, "train_rows": writer.rows - writer.heldout_rows,
            "heldout_rows": writer.heldout_rows, "covariance_rank": rank,
            "seconds": round(seconds, 3)}
