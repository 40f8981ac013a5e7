"""Synthetic activations with a known answer: a unit-norm dictionary, signed k-sparse codes
with Zipf-skewed atom frequencies, Gaussian noise.

The generative model, row by row:

* dictionary ``D`` [atoms, d]: i.i.d. Gaussian rows scaled to unit norm. With ``coherence``
  set, the draw is moved to that mutual coherence mu = max_{i != j} |<D_i, D_j>|:
  *above* the Gaussian draw's own mu, a shared unit direction u is mixed into every row,
  ``D_i <- normalise(D_i + a u)``, with ``a`` found by bisection; *below* it, projected
  gradient descent on sum_{i<j} relu(|<D_i, D_j>| - target)^2 (rows renormalised after
  each step) until mu <= target — a UserError when it cannot get there (the Welch bound
  sqrt((atoms - d) / (d (atoms - 1))) is a hard floor).
* support: k distinct atoms. Atom j (0-based) has Zipf weight p_j ∝ (j + 1)^-zipf, so
  atom 0 is the most frequent; the k atoms are drawn by successive sampling without
  replacement from p (an exponential race: the k smallest E_j / p_j, E_j ~ Exp(1)). Hence
  P(atom j in a row) ∝ p_j for the rare atoms; a frequent atom is capped at once per row.
  With ``correlation`` c > 0, a row is, with probability c, drawn from a *block* instead:
  the atoms are cut (in a seeded random order) into blocks of 2k, a block is picked with
  probability ∝ its total weight, and the k atoms are raced within it — so atoms of one
  block co-occur far more often than chance (leftover atoms belong to no block).
* coefficients: random sign times (|N(0, 1)| + 0.5): bounded away from zero, so a row's
  support is well defined; stored as float32 in ``z_val``, sorted by atom in ``z_idx``.
* ``x = z_val @ D[z_idx] + noise * N(0, I_d)``, computed in float64 from the stored float32
  dictionary and coefficients, then cast to the set's dtype.

Rows are generated in fixed blocks, each from its own seeded generator, so memory does not
grow with ``rows``, the output depends on nothing but the arguments (not on the shard size),
and a set with more rows starts with the rows of a smaller one. Consecutive rows form
"documents" of ``GROUP_ROWS``; the held-out split (activations.heldout_mask) is by document.

The set's ``truth/`` folder is a checkpoint (checkpoints.py) whose ``W_dec`` is ``D``, with
``arch: "truth"`` (it loads as an OMP encoder over the true dictionary) and the set's own
normalisation constants, so ``checkpoint.load(set / "truth")`` works on raw rows.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationWriter, Normalizer, heldout_mask
from isae.data.sources import check_extract_out, check_layout, package_versions
from isae.errors import UserError
from isae.limits import check_disk, check_memory
from isae.models.config import MAX_D_IN, MAX_WIDTH, SAEConfig
from isae.models.sparse_coder import SparseCoder
from isae.progress import progress

log = logging.getLogger(__name__)

GROUP_ROWS = 64
"""Consecutive rows that form one "document": the unit of the held-out split."""
MAGNITUDE = "sign * (|N(0,1)| + 0.5)"
"""The coefficient distribution, as recorded in meta.json."""
_BLOCK_ELEMENTS = 1 << 22
"""Target size of the largest per-block array (keys [rows, atoms] or D[z_idx] [rows, k, d])."""


# ----------------------------------------------------------------------------- pure parts


def zipf_weights(atoms: int, exponent: float) -> np.ndarray:
    """[atoms] float64 probabilities p_j ∝ (j + 1)^-exponent (exponent 0 = uniform)."""
    p = np.arange(1, atoms + 1, dtype=np.float64) ** -float(exponent)
    return p / p.sum()


def welch_bound(d: int, atoms: int) -> float:
    """Lower bound on the mutual coherence of ``atoms`` unit vectors in R^d (0 if atoms <= d)."""
    if atoms <= d:
        return 0.0
    return math.sqrt((atoms - d) / (d * (atoms - 1)))


def mutual_coherence(D: np.ndarray, block: int = 1024) -> float:
    """max_{i != j} |<D_i, D_j>| of (D: [atoms, d]) rows, in row blocks (no atoms^2 array)."""
    D = np.asarray(D, np.float64)
    best = 0.0
    for s in range(0, D.shape[0], block):
        G = np.abs(D[s : s + block] @ D.T)
        r = np.arange(G.shape[0])
        G[r, s + r] = 0.0
        best = max(best, float(G.max()))
    return best


def _unit_rows(D: np.ndarray) -> np.ndarray:
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def _mix_shared(G: np.ndarray, u: np.ndarray, a: float) -> np.ndarray:
    return _unit_rows(G + a * u)


def _raise_coherence(G: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Bisection on the weight a of a shared direction until mu(D) ≈ target (to 1e-4)."""
    u = _unit_rows(rng.standard_normal((1, G.shape[1])))
    lo, hi = 0.0, 1.0
    while mutual_coherence(_mix_shared(G, u, hi)) < target:
        hi *= 2.0
        if hi > 1e6:
            raise UserError(f"cannot raise the dictionary coherence to {target}")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mu = mutual_coherence(_mix_shared(G, u, mid))
        if abs(mu - target) < 1e-4:
            break
        lo, hi = (mid, hi) if mu < target else (lo, mid)
    return _mix_shared(G, u, mid)


def _lower_coherence(D: np.ndarray, target: float, max_steps: int = 5000) -> np.ndarray:
    """Projected gradient descent on sum_{i<j} relu(|G_ij| - t)^2, t a little under target."""
    t = 0.98 * target  # aim under the target: the hinge only pushes pairs above t
    block = max(1, _BLOCK_ELEMENTS // D.shape[0])
    lr = 0.2
    for _ in range(max_steps):
        grad = np.zeros_like(D)
        mu = 0.0
        for s in range(0, D.shape[0], block):
            G = D[s : s + block] @ D.T
            r = np.arange(G.shape[0])
            G[r, s + r] = 0.0
            A = np.abs(G)
            mu = max(mu, float(A.max()))
            grad[s : s + block] = (np.sign(G) * np.maximum(A - t, 0.0)) @ D
        if mu <= target:
            return D
        D = _unit_rows(D - lr * grad)
    raise UserError(
        f"could not lower the dictionary coherence to {target} (reached {mu:.4f}; the Welch "
        f"bound for {D.shape[0]} atoms in d={D.shape[1]} is {welch_bound(D.shape[1], D.shape[0]):.4f})"
    )


def make_dictionary(
    d: int, atoms: int, rng: np.random.Generator, coherence: float | None = None
) -> tuple[np.ndarray, dict]:
    """A unit-norm dictionary [atoms, d] float64 and a dict describing how it was made."""
    D = _unit_rows(rng.standard_normal((atoms, d)))
    mu0 = mutual_coherence(D)
    info = {"kind": "gaussian", "gaussian_coherence": mu0}
    if coherence is not None:
        if not 0.0 < coherence < 1.0:
            raise UserError(f"--coherence must be in (0, 1), got {coherence}")
        floor = welch_bound(d, atoms)
        if coherence < floor:
            raise UserError(
                f"--coherence {coherence} is below the Welch bound {floor:.4f} for {atoms} atoms "
                f"in d={d}: no dictionary of that shape has it"
            )
        if coherence >= mu0:
            D = _raise_coherence(D, coherence, rng)
            info["kind"] = "gaussian + shared direction"
        else:
            D = _lower_coherence(D, coherence)
            info["kind"] = "gaussian, decorrelated"
        info["target_coherence"] = float(coherence)
    info["coherence"] = mutual_coherence(D.astype(np.float32))
    return D, info


def correlation_blocks(atoms: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n_blocks, 2k] atom ids: a seeded random order cut into blocks (leftovers unused)."""
    size = min(atoms, 2 * k)
    perm = rng.permutation(atoms)
    n = atoms // size
    return perm[: n * size].reshape(n, size)


def sample_supports(
    rng: np.random.Generator,
    n: int,
    p: np.ndarray,
    k: int,
    blocks: np.ndarray | None = None,
    correlation: float = 0.0,
) -> np.ndarray:
    """[n, k] int64 distinct atom ids per row, sorted (see the module docstring)."""
    atoms = p.shape[0]
    corr = np.zeros(n, bool)
    if correlation > 0 and blocks is not None and len(blocks):
        corr = rng.random(n) < correlation
    idx = np.empty((n, k), np.int64)
    free = np.flatnonzero(~corr)
    if len(free):
        keys = rng.standard_exponential((len(free), atoms)) / p
        idx[free] = np.argpartition(keys, k - 1, axis=1)[:, :k]
    tied = np.flatnonzero(corr)
    if len(tied):
        wb = p[blocks]  # [n_blocks, size]
        pick = rng.choice(len(blocks), size=len(tied), p=wb.sum(1) / wb.sum())
        keys = rng.standard_exponential((len(tied), blocks.shape[1])) / wb[pick]
        col = np.argpartition(keys, k - 1, axis=1)[:, :k]
        idx[tied] = blocks[pick[:, None], col]
    return np.sort(idx, axis=1)


def sample_rows(
    rng: np.random.Generator,
    n: int,
    D32: np.ndarray,
    p: np.ndarray,
    k: int,
    noise: float,
    blocks: np.ndarray | None = None,
    correlation: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of rows: (x [n, d] float64, z_idx [n, k] int32, z_val [n, k] float32)."""
    idx = sample_supports(rng, n, p, k, blocks, correlation)
    sign = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0)
    val = (sign * (np.abs(rng.standard_normal((n, k))) + 0.5)).astype(np.float32)
    x = np.einsum("nk,nkd->nd", val.astype(np.float64), D32[idx].astype(np.float64))
    if noise > 0:
        x += noise * rng.standard_normal(x.shape)
    return x, idx.astype(np.int32), val


def block_rows(d: int, atoms: int, k: int) -> int:
    """Rows per generator block: a multiple of GROUP_ROWS keeping block arrays ~4M elements."""
    n = _BLOCK_ELEMENTS // max(atoms, k * d)
    return int(min(max(n // GROUP_ROWS, 1), 4096 // GROUP_ROWS) * GROUP_ROWS)


# ----------------------------------------------------------------------------- the stage


def _validate(d, atoms, k, rows, noise, zipf, coherence, correlation, heldout_fraction,
              rows_per_shard, seed) -> None:
    if not 1 <= d <= MAX_D_IN:
        raise UserError(f"--d must be in [1, {MAX_D_IN}], got {d}")
    if not 2 <= atoms <= MAX_WIDTH:
        raise UserError(f"--atoms must be in [2, {MAX_WIDTH}], got {atoms}")
    if not 1 <= k < atoms:
        raise UserError(f"--k must satisfy 1 <= k < atoms; got k={k}, atoms={atoms}")
    if rows < 1:
        raise UserError(f"--rows must be >= 1, got {rows}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise UserError(f"--noise must be a finite number >= 0, got {noise}")
    if not (zipf >= 0 and math.isfinite(zipf)):
        raise UserError(f"--zipf must be a finite number >= 0, got {zipf}")
    if not 0.0 <= correlation <= 1.0:
        raise UserError(f"--correlation must be in [0, 1], got {correlation}")
    if coherence is not None and not 0.0 < coherence < 1.0:
        raise UserError(f"--coherence must be in (0, 1), got {coherence}")
    check_layout(heldout_fraction, rows_per_shard, seed)


def check_fits(out: str, d: int, atoms: int, rows: int, dtype: str) -> None:
    """Before anything is drawn: the true dictionary in float64 and float32 (atoms x d) in
    the host's memory, and the rows' activations (stored uncompressed) on the disk."""
    check_memory({"the true dictionary in float64 and float32": 12 * atoms * d}, "cpu",
                 "lower --atoms or --d")
    itemsize = 2 if dtype == "float16" else 4
    check_disk(rows * d * itemsize, Path(out).parent, "lower --rows, or write elsewhere")


def _write_truth(stage: Path, meta: dict, D32: np.ndarray, k: int, seed: int, gen: dict) -> None:
    atoms, d = D32.shape
    cfg = SAEConfig(d_in=d, d_sae=atoms, k=k, arch="truth", kind="dl", signed=True, tied=True,
                    bias="none", seed=seed)
    model = SparseCoder(cfg)
    with torch.no_grad():
        model.W_dec.copy_(torch.from_numpy(D32))
    norm = Normalizer(mean=np.asarray(meta["mean"], np.float32), scale=float(meta["scale"]))
    checkpoint.save(model, stage / "truth", norm, extra={"source": "synthetic", "generator": gen})


def extract(
    out: str,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    rows_per_shard: int = 16384,
    dtype: str = "float32",
    *,
    d: int,
    atoms: int,
    k: int,
    rows: int,
    noise: float = 0.0,
    zipf: float = 1.0,
    coherence: float | None = None,
    correlation: float = 0.0,
    force: bool = False,
) -> dict:
    """Write a synthetic activation set with its ``truth/`` checkpoint; return the summary.
    An existing ``out`` is replaced only if it is an activation set, or with ``force``."""
    _validate(d, atoms, k, rows, noise, zipf, coherence, correlation, heldout_fraction,
              rows_per_shard, seed)
    check_extract_out(out, [], force)
    check_fits(out, d, atoms, rows, dtype)
    t0 = time.perf_counter()
    dict_rng = np.random.default_rng([seed, 0])
    D, dict_info = make_dictionary(d, atoms, dict_rng, coherence)
    D32 = D.astype(np.float32)
    p = zipf_weights(atoms, zipf)
    blocks = correlation_blocks(atoms, k, dict_rng) if correlation > 0 else None
    n_block = block_rows(d, atoms, k)
    gen = {
        "d": d, "atoms": atoms, "k": k, "rows": rows, "noise": noise, "zipf": zipf,
        "coherence": coherence, "correlation": correlation,
        "correlation_block_size": None if blocks is None else int(blocks.shape[1]),
        "magnitude": MAGNITUDE, "frequency": "p_j ∝ (j+1)^-zipf, k raced without replacement",
        "dictionary": dict_info, "group_rows": GROUP_ROWS, "block_rows": n_block,
    }
    meta = {
        "generator": gen,
        "seed": seed,
        "columns": {"row": "row id", "doc": f"row // {GROUP_ROWS}, the split unit",
                    "z_idx": "true support (sorted)", "z_val": "true coefficients"},
        "versions": package_versions("isae", "numpy", "pyarrow", "torch"),
    }
    heldout_info = {"by": "doc", "group_rows": GROUP_ROWS, "fraction": heldout_fraction,
                    "seed": seed}
    log.info("synthetic: d=%d atoms=%d k=%d rows=%d coherence=%.3f", d, atoms, k, rows,
             dict_info["coherence"])
    writer = ActivationWriter(
        out, d, dtype=dtype, rows_per_shard=rows_per_shard, source="synthetic", meta=meta,
        heldout=heldout_info,
        on_close=lambda stage, m: _write_truth(stage, m, D32, k, seed, gen), force=force,
    )
    with writer, progress(total=rows, desc="synthetic", unit="row") as bar:
        for b, start in enumerate(range(0, rows, n_block)):
            n = min(n_block, rows - start)
            rng = np.random.default_rng([seed, 1, b])
            # Always a whole block, cut afterwards: a longer set starts with this one's rows.
            x, z_idx, z_val = sample_rows(rng, n_block, D32, p, k, noise, blocks, correlation)
            x, z_idx, z_val = x[:n], z_idx[:n], z_val[:n]
            row = np.arange(start, start + n, dtype=np.int64)
            doc = row // GROUP_ROWS
            writer.add(x, heldout_mask(doc, heldout_fraction, seed), row=row, doc=doc,
                       z_idx=z_idx, z_val=z_val)
            bar.update(n)
    return {
        "source": "synthetic",
        "out": str(writer.out),
        "d": d,
        "rows": writer.rows,
        "train_rows": writer.rows - writer.heldout_rows,
        "heldout_rows": writer.heldout_rows,
        "shards": writer._shards,
        "atoms": atoms,
        "k": k,
        "coherence": dict_info["coherence"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
