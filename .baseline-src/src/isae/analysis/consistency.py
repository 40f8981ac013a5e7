"""Code consistency between two sparse coders (or a coder and the true codes) on the same rows.

After mapping B's latents onto A's by the matching and its signs:
the mean per-latent Pearson correlation of the codes, the support agreement (Jaccard of the
mapped supports) and the relative code distance ||z_A - P S z_B|| / ||z_A||.

Precise choices, made once here:

* Support = entries with a nonzero value. Codes are handled as sparse (row, latent, value)
  triples, so nothing dense [rows, N] is ever built, whatever the width.
* Pearson is per matched pair (A latent a, B latent b mapped with its sign), over all rows
  and over the rows where either of the two is active. Both use the same sums, because a
  latent is zero on the rows where it is inactive; only the row count differs. A pair that
  is inactive on every row is left out of the mean (its correlation is undefined). If exactly
  one side has zero variance on the row set (e.g. one latent never fires while the other
  does) the pair counts as 0; if both have zero variance it counts as 1 when the two columns
  are equal and 0 otherwise.
* Jaccard is per row, |S_A ∩ π(S_B)| / |S_A ∪ π(S_B)|, averaged over rows; B's unmatched
  latents (rectangular matchings) never intersect; a row where both supports are empty
  counts as agreement (1).
* Relative code distance is over all rows at once (Frobenius norms), with B's unmatched
  latents kept: they are part of z_B and have no partner, so they count fully.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from isae.analysis.matching import Matching


@dataclass(frozen=True)
class Consistency:
    """Code consistency of A and mapped B, with per-pair detail for the matching table."""

    rows: int
    """Rows the codes were computed on."""
    pearson_all: np.ndarray
    """[M] Pearson over all rows of each matched pair (NaN: pair never active), in the
    order of ``Matching.a``."""
    pearson_active: np.ndarray
    """[M] Pearson over the rows where either latent of the pair is active."""
    active_a: np.ndarray
    """[M] rows where A's latent is active."""
    active_b: np.ndarray
    """[M] rows where B's latent is active."""
    active_both: np.ndarray
    """[M] rows where both are active."""
    jaccard: float
    """Mean over rows of the support Jaccard after mapping."""
    rel_dist: float
    """||z_A - P S z_B||_F / ||z_A||_F over all rows."""

    def summary(self) -> dict:
        ok = ~np.isnan(self.pearson_all)
        return {
            "rows": self.rows,
            "n_pairs_active": int(ok.sum()),
            "pearson_active": _nanmean(self.pearson_active),
            "pearson_all": _nanmean(self.pearson_all),
            "jaccard": self.jaccard,
            "rel_dist": self.rel_dist,
        }


def _nanmean(x: np.ndarray) -> float:
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def sparse_triples(
    val: torch.Tensor | np.ndarray, idx: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(val [R, K], idx [R, K]) codes -> (row, latent, value) of the nonzero entries, float64,
    with repeated (row, latent) entries summed."""
    val = val.detach().cpu().numpy() if isinstance(val, torch.Tensor) else np.asarray(val)
    idx = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if val.shape != idx.shape or val.ndim != 2:
        raise ValueError(f"codes need val and idx of one shape [R, K]; got {val.shape}, {idx.shape}")
    R, K = val.shape
    rows = np.repeat(np.arange(R, dtype=np.int64), K)
    lat = idx.reshape(-1).astype(np.int64)
    v = val.reshape(-1).astype(np.float64)
    nz = v != 0
    rows, lat, v = rows[nz], lat[nz], v[nz]
    width = int(lat.max()) + 1 if len(lat) else 1
    key = rows * width + lat
    uniq, inv = np.unique(key, return_inverse=True)
    if len(uniq) < len(key):
        v = np.bincount(inv, weights=v, minlength=len(uniq))
        rows, lat = uniq // width, uniq % width
        keep = v != 0
        rows, lat, v = rows[keep], lat[keep], v[keep]
    return rows, lat, v


def _pearson(s_a, s_b, s_aa, s_bb, s_ab, n, present) -> np.ndarray:
    """Pearson from sums over n rows, with the zero-variance rules of the module docstring."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = n.astype(np.float64)
        var_a = s_aa - s_a**2 / n
        var_b = s_bb - s_b**2 / n
        cov = s_ab - s_a * s_b / n
        # Relative thresholds: cancellation leaves ~1e-16 * s_aa where the variance is zero.
        zero_a = var_a <= 1e-10 * s_aa
        zero_b = var_b <= 1e-10 * s_bb
        r = cov / np.sqrt(var_a * var_b)
        equal = (s_aa + s_bb - 2 * s_ab) <= 1e-10 * (s_aa + s_bb)
        r = np.where(zero_a | zero_b, 0.0, r)
        r = np.where(zero_a & zero_b & equal, 1.0, r)
    r = np.clip(r, -1.0, 1.0)
    return np.where(present, r, np.nan)


def code_consistency(
    codes_a: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    codes_b: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    matching: Matching,
) -> Consistency:
    """Consistency of A's codes and B's codes mapped onto A by ``matching``.

    codes_a: (val [R, K_a], idx [R, K_a]) on the same R rows as codes_b (val [R, K_b],
    idx [R, K_b]); an ``isae.models.sparse_coder.Codes`` works as is. Latent indices must be < N_a, N_b.
    """
    R = int(np.shape(codes_a[0])[0])
    if int(np.shape(codes_b[0])[0]) != R:
        raise ValueError("codes_a and codes_b must be computed on the same rows")
    n_a, n_b = matching.n_a, matching.n_b
    ra, la, va = sparse_triples(*codes_a)
    rb, lb, vb = sparse_triples(*codes_b)
    if (len(la) and la.max() >= n_a) or (len(lb) and lb.max() >= n_b):
        raise ValueError("code indices exceed the matched dictionaries' widths")

    # B's latents in A's index space; unmatched B latents get ids n_a + j that no A latent has.
    to_a = matching.b_to_a()
    sgn = matching.b_sign()
    mb = np.where(to_a[lb] >= 0, to_a[lb], n_a + lb)
    wb = vb * np.where(to_a[lb] >= 0, sgn[lb], 1.0)
    width = n_a + n_b
    key_a = ra * width + la
    key_b = rb * width + mb
    _, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)

    # Per-latent sums in A's index space (length n_a; unmatched B ids are dropped here).
    ma = mb < n_a
    s_a = np.bincount(la, weights=va, minlength=n_a)
    s_aa = np.bincount(la, weights=va * va, minlength=n_a)
    c_a = np.bincount(la, minlength=n_a)
    s_b = np.bincount(mb[ma], weights=wb[ma], minlength=n_a)
    s_bb = np.bincount(mb[ma], weights=wb[ma] ** 2, minlength=n_a)
    c_b = np.bincount(mb[ma], minlength=n_a)
    s_ab = np.bincount(la[ia], weights=va[ia] * wb[ib], minlength=n_a)
    c_ab = np.bincount(la[ia], minlength=n_a)

    pairs = matching.a
    c_either = c_a + c_b - c_ab
    present = c_either[pairs] > 0
    sums = (s_a[pairs], s_b[pairs], s_aa[pairs], s_bb[pairs], s_ab[pairs])
    p_all = _pearson(*sums, np.full(len(pairs), R), present)
    p_act = _pearson(*sums, c_either[pairs], present)

    # Support Jaccard per row.
    cnt_a = np.bincount(ra, minlength=R)
    cnt_b = np.bincount(rb, minlength=R)
    inter = np.bincount(ra[ia], minlength=R)
    union = cnt_a + cnt_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, 1.0)

    # ||z_A - P S z_B||^2 summed term by term (no cancellation between large sums).
    only_a = np.ones(len(va), bool)
    only_a[ia] = False
    only_b = np.ones(len(vb), bool)
    only_b[ib] = False
    diff2 = (va[only_a] ** 2).sum() + (wb[only_b] ** 2).sum() + ((va[ia] - wb[ib]) ** 2).sum()
    norm2 = (va**2).sum()
    rel = float(np.sqrt(diff2 / norm2)) if norm2 > 0 else float("nan")

    return Consistency(
        rows=R,
        pearson_all=p_all,
        pearson_active=p_act,
        active_a=c_a[pairs],
        active_b=c_b[pairs],
        active_both=c_ab[pairs],
        jaccard=float(jac.mean()) if R else float("nan"),
        rel_dist=rel,
    )
