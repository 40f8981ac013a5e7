"""Small activation sets for the library's own tests (independent of the extract stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isae.data.activations import ActivationWriter, heldout_mask


def signed_sparse_set(
    out: Path, d: int = 32, atoms: int = 128, k: int = 3, rows: int = 20000, noise: float = 0.01,
    seed: int = 0, rows_per_shard: int = 4096,
) -> np.ndarray:
    """Rows = signed k-sparse combinations of a random unit dictionary + noise. Returns it."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    idx = np.stack([rng.choice(atoms, k, replace=False) for _ in range(rows)])
    val = (rng.random((rows, k)) + 0.5) * rng.choice([-1.0, 1.0], (rows, k))
    x = np.einsum("rk,rkd->rd", val, D[idx]) + noise * rng.standard_normal((rows, d))
    with ActivationWriter(out, d, source="test", rows_per_shard=rows_per_shard) as w:
        w.add(x, heldout_mask(np.arange(rows) // 64, 0.1), z_idx=idx.astype(np.int32),
              z_val=val.astype(np.float32))
    return D


def matched_abs_cos(A: np.ndarray, B: np.ndarray) -> float:
    """Hungarian-matched mean |cos| between unit-row dictionaries (test-side reference)."""
    from scipy.optimize import linear_sum_assignment

    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    C = np.abs(A.astype(np.float64) @ B.T.astype(np.float64))
    r, c = linear_sum_assignment(-C)
    return float(C[r, c].mean())
