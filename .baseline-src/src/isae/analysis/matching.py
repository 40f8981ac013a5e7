"""Dictionary matching: which atom of one dictionary is which atom of another.

The |cosine| matrix of decoder rows, a Hungarian assignment on it (a
signed permutation: the sign of each matched pair's cosine), mean matched |cos|, the fraction
of matched pairs above 0.9 and 0.7, and MMCS (mean over the rows of one dictionary of the
best |cos| in the other, no bijection) in both directions.

Pure functions on tensors; no I/O. Works for dictionaries of different widths (rectangular
assignment: min(N_a, N_b) pairs, the rest reported unmatched).

The assignment is ``isae.analysis.assignment``'s: exact, found on a sparse graph of each
atom's best partners and proved optimal on the full |cos| matrix by LP duality (the
``Certificate`` on the Matching says how, and the gap it proved), with scipy's dense
Hungarian solver as the fallback. The cosines are computed in row blocks on the chosen
device (float32); no dense float64 matrix is built unless the fallback runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from isae.analysis.assignment import Certificate, assign_abs_cos
from isae.errors import UserError


@dataclass(frozen=True)
class Matching:
    """A signed partial permutation between the atoms of A and the atoms of B."""

    a: np.ndarray
    """[M] int64 indices into A of the matched pairs (M = min(N_a, N_b)), ascending."""
    b: np.ndarray
    """[M] int64 indices into B: A's atom a[i] is B's atom b[i]."""
    sign: np.ndarray
    """[M] int8, +1 or -1: A[a[i]] ~ sign[i] * B[b[i]]."""
    abs_cos: np.ndarray
    """[M] float64 |cos| of the matched pairs."""
    best_ab: np.ndarray
    """[N_a] float64: for each atom of A, the best |cos| over all atoms of B."""
    best_ba: np.ndarray
    """[N_b] float64: for each atom of B, the best |cos| over all atoms of A."""
    certificate: Certificate | None = None
    """How the assignment was found and the optimality gap proved for it."""

    @property
    def n_a(self) -> int:
        return len(self.best_ab)

    @property
    def n_b(self) -> int:
        return len(self.best_ba)

    def summary(self) -> dict:
        """The stability numbers (fractions are over the matched pairs)."""
        c = self.abs_cos
        return {
            "n_a": self.n_a,
            "n_b": self.n_b,
            "n_matched": len(c),
            "mean_abs_cos": float(c.mean()) if len(c) else float("nan"),
            "frac_gt_0.9": float((c > 0.9).mean()) if len(c) else float("nan"),
            "frac_gt_0.7": float((c > 0.7).mean()) if len(c) else float("nan"),
            "mmcs_ab": float(self.best_ab.mean()),
            "mmcs_ba": float(self.best_ba.mean()),
        }

    def b_to_a(self) -> np.ndarray:
        """[N_b] int64: the A index that each B atom maps to, -1 where unmatched."""
        out = np.full(self.n_b, -1, np.int64)
        out[self.b] = self.a
        return out

    def b_sign(self) -> np.ndarray:
        """[N_b] float64: the sign each B atom takes when mapped onto A (0 where unmatched)."""
        out = np.zeros(self.n_b, np.float64)
        out[self.b] = self.sign
        return out

    def table(self) -> pd.DataFrame:
        """One row per atom of A and per unmatched atom of B: a, b (-1 = unmatched), sign
        (0 = unmatched), abs_cos (NaN = unmatched), and best_abs_cos (the atom's MMCS term,
        from A's side for rows with an A atom, from B's side for B-only rows)."""

        a_un = np.setdiff1d(np.arange(self.n_a), self.a)
        b_un = np.setdiff1d(np.arange(self.n_b), self.b)
        a = np.concatenate([self.a, a_un, np.full(len(b_un), -1)])
        b = np.concatenate([self.b, np.full(len(a_un), -1), b_un])
        sign = np.concatenate([self.sign, np.zeros(len(a_un) + len(b_un), np.int8)])
        nan = np.full(len(a_un) + len(b_un), np.nan)
        abs_cos = np.concatenate([self.abs_cos, nan])
        best = np.concatenate([self.best_ab[self.a], self.best_ab[a_un], self.best_ba[b_un]])
        # A's atoms in index order, then B's unmatched atoms.
        order = np.lexsort((b, np.where(a >= 0, a, self.n_a)))
        return pd.DataFrame(
            {
                "a": a[order].astype(np.int64),
                "b": b[order].astype(np.int64),
                "sign": sign[order].astype(np.int8),
                "abs_cos": abs_cos[order],
                "matched": (np.arange(len(a)) < len(self.a))[order],
                "best_abs_cos": best[order],
            }
        )


def _unit_rows(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _unit_pair(W_a, W_b, device, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both dictionaries as float32 unit rows on ``device``; UserError on bad shapes."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UserError(f"--block must be a positive integer, not {block!r}")
    A = _unit_rows(torch.as_tensor(W_a).detach().to(device=device, dtype=torch.float32))
    B = _unit_rows(torch.as_tensor(W_b).detach().to(device=device, dtype=torch.float32))
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise UserError(
            f"cannot match dictionaries of shapes {tuple(A.shape)} and {tuple(B.shape)}: "
            "decoder rows must have the same dimension d_in"
        )
    return A, B


@torch.no_grad()
def abs_cos_cost(
    W_a: torch.Tensor | np.ndarray,
    W_b: torch.Tensor | np.ndarray,
    device: str | torch.device = "cpu",
    block: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The negated |cosine| matrix as a dense float64 CPU array (the cost scipy's dense
    Hungarian solver takes; a reference, not what ``match_dictionaries`` builds), computed in
    blocks of ``block`` rows of A on ``device`` with the same float32 values as the matcher,
    and the row / column maxima of |cos|.

    (W_a: [N_a, D], W_b: [N_b, D]) -> (cost [N_a, N_b] = -|cos|, best_ab [N_a], best_ba [N_b]).
    """
    A, B = _unit_pair(W_a, W_b, device, block)
    n_a, n_b = A.shape[0], B.shape[0]
    cost = np.empty((n_a, n_b), np.float64)
    best_ab = np.empty(n_a, np.float64)
    best_ba = torch.zeros(n_b, device=device)
    for i in range(0, n_a, block):
        c = (A[i : i + block] @ B.T).abs_()
        best_ab[i : i + block] = c.max(dim=1).values.double().cpu().numpy()
        best_ba = torch.maximum(best_ba, c.max(dim=0).values)
        np.negative(c.cpu().numpy(), out=cost[i : i + block], dtype=np.float64)
        del c
    return cost, best_ab, best_ba.double().cpu().numpy()


def match_dictionaries(
    W_a: torch.Tensor | np.ndarray,
    W_b: torch.Tensor | np.ndarray,
    device: str | torch.device = "cpu",
    block: int = 4096,
) -> Matching:
    """The optimal signed matching of decoder rows by |cos| (the Hungarian optimum, proved).

    (W_a: [N_a, D], W_b: [N_b, D]) -> Matching. Rows need not be unit norm (cosines are
    taken); the matched |cos| and signs are recomputed in float64 from the rows.
    """
    A, B = _unit_pair(W_a, W_b, device, block)
    got = assign_abs_cos(A, B, block=block)
    del A, B
    a = torch.as_tensor(got.rows, dtype=torch.int64)
    b = torch.as_tensor(got.cols, dtype=torch.int64)
    Ua = _unit_rows(torch.as_tensor(W_a).detach()[a.to(_device_of(W_a))].cpu().double())
    Ub = _unit_rows(torch.as_tensor(W_b).detach()[b.to(_device_of(W_b))].cpu().double())
    cos = (Ua * Ub).sum(1).numpy()
    sign = np.where(cos < 0, -1, 1).astype(np.int8)
    return Matching(
        a=got.rows,
        b=got.cols,
        sign=sign,
        abs_cos=np.abs(cos),
        best_ab=got.best_row,
        best_ba=got.best_col,
        certificate=got.certificate,
    )


def _device_of(W: torch.Tensor | np.ndarray) -> torch.device:
    return W.device if isinstance(W, torch.Tensor) else torch.device("cpu")


def chance_mean_abs_cos(n_a: int, n_b: int, d: int, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Mean matched |cos| of two independent random Gaussian dictionaries of these shapes.

    The floor a stability number has to clear before it says anything: two unrelated
    dictionaries of 1536 atoms in d = 384 already match at about 0.17.
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_a, d, generator=g)
    B = torch.randn(n_b, d, generator=g)
    return float(match_dictionaries(A, B, device=device).summary()["mean_abs_cos"])


# ----------------------------------------------------------------------------- chance levels

#: The random dictionaries a matched |cos| is read against. ``gaussian``: isotropic, the
#: floor of two unrelated dictionaries; ``data_cov``: Gaussian with the data's covariance,
#: which already lines atoms up with the data's top principal directions; ``data_rows``:
#: random (normalised, centred) training rows, which is where dictionary learning starts.
#: The data-shaped two are the reference for trained dictionaries.
CHANCE_KINDS = ("gaussian", "data_cov", "data_rows")


def random_dictionary(kind: str, n: int, d: int, gen: torch.Generator,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """One random dictionary [n, d] float64 with unit rows.

    ``rows`` [R, d]: centred data rows (``data_cov`` uses their covariance, ``data_rows``
    draws n of them without replacement; R >= n).
    """
    if kind == "gaussian":
        W = torch.randn(n, d, generator=gen, dtype=torch.float64)
    elif kind in ("data_cov", "data_rows"):
        if rows is None:
            raise ValueError(f"chance kind {kind!r} needs data rows")
        X = torch.as_tensor(rows).to(torch.float64)
        if kind == "data_rows":
            if X.shape[0] < n:
                raise UserError(f"{n} random training rows asked for, only {X.shape[0]} exist")
            W = X[torch.randperm(X.shape[0], generator=gen)[:n]]
        else:
            # z Σ^½ with Σ^½ from the eigendecomposition (Σ may be singular).
            cov = X.T @ X / max(X.shape[0] - 1, 1)
            lam, V = torch.linalg.eigh(cov)
            # Rounding leaves ~1e-16 eigenvalues on the null directions: drop them, so a
            # rank-deficient covariance gives atoms inside the data's span.
            lam = torch.where(lam > lam.max() * 1e-12, lam, torch.zeros_like(lam))
            root = V * lam.sqrt()
            W = torch.randn(n, d, generator=gen, dtype=torch.float64) @ root.T
    else:
        raise ValueError(f"unknown chance kind {kind!r}; known: {', '.join(CHANCE_KINDS)}")
    return _unit_rows(W)


def chance_levels(
    width: int,
    d: int,
    rows: torch.Tensor | np.ndarray | None = None,
    truth: torch.Tensor | np.ndarray | None = None,
    draws: int = 3,
    seed: int = 0,
    kinds: tuple[str, ...] = CHANCE_KINDS,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Matched |cos| of random dictionaries of ``width`` atoms: between two independent draws
    of each kind (``target = "seed"``, the chance level of seed stability), and, given the
    ``truth`` [N_t, d], between one draw and the truth (``target = "truth"``, the chance
    level of truth recovery). Each repeated ``draws`` times with fresh draws.

    ``rows``: centred training rows [R, d] for the data-shaped kinds (skipped without them).
    -> one row per (kind, target, draw): kind, target, draw, mean_abs_cos, frac_gt_0.9.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for kind in kinds:
        if kind != "gaussian" and rows is None:
            continue
        for draw in range(draws):
            A = random_dictionary(kind, width, d, gen, rows)
            B = random_dictionary(kind, width, d, gen, rows)
            targets = [("seed", B)] + ([("truth", truth)] if truth is not None else [])
            for target, other in targets:
                s = match_dictionaries(A, other, device=device).summary()
                out.append({"kind": kind, "target": target, "draw": draw,
                            "mean_abs_cos": s["mean_abs_cos"], "frac_gt_0.9": s["frac_gt_0.9"]})
    return pd.DataFrame(out, columns=["kind", "target", "draw", "mean_abs_cos", "frac_gt_0.9"])
