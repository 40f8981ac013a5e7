"""Restricted isometry on observed supports.

For sampled pairs of held-out rows i, j with encoder supports S_i, S_j, U = S_i ∪ S_j and
D_U the unit-norm decoder rows in U (a |U| x d matrix):

    δ_U = max(σ_max(D_U)² − 1, 1 − σ_min(D_U)²),

computed as the extreme eigenvalues of the |U| x |U| Gram matrix D_U D_Uᵀ (σ² of D_U are the
eigenvalues of the Gram; for |U| > d the smallest is 0 and δ_U ≥ 1).

and its two sides apart, which say different things:

* the lower side 1 − σ_min(D_U)² — below 1 means D_U is injective, which uniqueness of a
  code on |U| ≤ 2k needs; 1 (σ_min = 0) means two codes on U give the same x;
* the upper side σ_max(D_U)² − 1 — large when U holds coherent, near-duplicate atoms.

Calibrations, on the same sizes: random supports on the same dictionary, and a random
Gaussian dictionary with unit rows of the same shape, whose Gram eigenvalues for s random
rows fill the Marchenko–Pastur interval [(1−√(s/d))², (1+√(s/d))²]: lower side ≈ 2√r − r,
upper side ≈ 2√r + r with r = s/d, δ ≈ the upper side.

Two properties of the dictionary alone go with them: the fraction of atoms with a
near-duplicate (another atom at |cos| > 0.95), and its mutual coherence.

The largest δ sampled at |U| = 2k is reported as what it is: a lower bound on the restricted
isometry constant δ_2k, a maximum over all C(N, 2k) supports (NP-hard to compute exactly).

Pure functions on arrays (``delta_of_supports`` is the kernel: float64 eigenvalues on the
CPU, repeated squaring in float32 on a GPU), and one entrance that reads:
``ric_of_checkpoint``, the study of a checkpoint on an activation set's held-out rows.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from isae.analysis.truth import (
    TRUE_CODE_COLUMNS,
    check_activations,
    has_true_codes,
    is_truth,
    true_codes_columns,
)
from isae.data.activations import ActivationSet
from isae.data.checkpoints import Checkpoint, load, load_decoder
from isae.errors import UserError
from isae.models.config import MAX_SEED, check_int

log = logging.getLogger(__name__)

THRESHOLDS = {"1/3": 1.0 / 3.0, "sqrt2-1": math.sqrt(2.0) - 1.0}
#: A union is near-singular when its lower side 1 − σ_min² exceeds this (σ_min < 0.1): two
#: codes on it that differ by a unit vector give reconstructions less than 0.1 apart.
NEAR_SINGULAR = 0.99
#: Two atoms with |cos| above this are near-duplicates.
NEAR_DUPLICATE = 0.95


# ----------------------------------------------------------------------------- the kernel


@torch.no_grad()
def gram_extremes(
    W_dec: torch.Tensor | np.ndarray,
    supports: torch.Tensor | np.ndarray,
    sizes: torch.Tensor | np.ndarray,
    max_elems: int = 1 << 24,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest eigenvalue of the Gram D_U D_Uᵀ of each support, float64.

    (W_dec: [N, D]) rows are normalised here (unit decoder rows);
    (supports: [P, S_max] int) row p lists its atoms in the first ``sizes[p]`` entries, the
    rest is padding and never read; (sizes: [P] int). -> (λ_min [P], λ_max [P]) on the CPU,
    both 1 for |U| ≤ 1 (a single unit row, or nothing, is an isometry). For |U| > D the
    Gram is singular and λ_min is 0 up to rounding.

    Supports are grouped by size so each group is one batched Gram + ``eigvalsh`` (on
    ``device``, in float64); groups are cut into chunks of at most ``max_elems`` gathered
    entries (bounded memory).
    """
    dev = torch.device(device)
    W = torch.as_tensor(W_dec).detach().to(dev)
    supports = torch.as_tensor(supports).to("cpu", torch.int64)
    sizes = torch.as_tensor(sizes).to("cpu", torch.int64)
    P = supports.shape[0]
    assert sizes.shape == (P,), f"sizes {tuple(sizes.shape)} vs supports {tuple(supports.shape)}"
    D = W.shape[1]
    lo = torch.ones(P, dtype=torch.float64)
    hi = torch.ones(P, dtype=torch.float64)
    for s in torch.unique(sizes).tolist():
        if s <= 1:
            continue
        where = torch.nonzero(sizes == s).squeeze(1)
        step = max(1, max_elems // (s * D))
        for c in range(0, len(where), step):
            rows = where[c : c + step]
            Du = W[supports[rows, :s].to(dev)].double()  # [p, s, D]
            Du = Du / Du.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            lam = torch.linalg.eigvalsh(Du @ Du.transpose(1, 2)).cpu()  # ascending, [p, s]
            lo[rows] = lam[:, 0]
            hi[rows] = lam[:, -1]
    return lo, hi


def isometry_sides(lam_min: torch.Tensor | np.ndarray, lam_max: torch.Tensor | np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(λ_min, λ_max) of Grams -> (lower side 1 − λ_min, upper side λ_max − 1, δ = their max),
    float64 arrays. λ_min is clipped at 0 (a singular Gram's rounding), so the lower side is
    at most 1."""
    lo = np.clip(np.asarray(lam_min, np.float64), 0.0, None)
    hi = np.asarray(lam_max, np.float64)
    lower, upper = 1.0 - lo, hi - 1.0
    return lower, upper, np.maximum(lower, upper)


@torch.no_grad()
def delta_of_supports(
    W_dec: torch.Tensor | np.ndarray,
    supports: torch.Tensor | np.ndarray,
    sizes: torch.Tensor | np.ndarray,
    max_elems: int = 1 << 24,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """δ_U for a batch of supports, in float64 on the CPU (on CUDA: float32, delta_by_squaring).

    Shapes as in ``gram_extremes``. -> [P] float64 δ (0 for |U| ≤ 1).
    """
    if torch.device(device).type == "cuda":
        W = torch.as_tensor(W_dec).detach().to(device)
        out = delta_by_squaring(W, torch.as_tensor(supports), torch.as_tensor(sizes))
        return out.double().cpu()
    lo, hi = gram_extremes(W_dec, supports, sizes, max_elems=max_elems)
    return torch.maximum(hi - 1.0, 1.0 - lo)


@torch.no_grad()
def delta_by_squaring(
    W: Tensor, supports: Tensor, sizes: Tensor, squarings: int = 14, chunk: int = 16384
) -> Tensor:
    """δ_U = ||D_U D_U^T - I||_2 for a batch of supports, float32 on the GPU.

    Because G_U = D_U D_U^T has a unit diagonal, max(σ_max² - 1, 1 - σ_min²) is the spectral
    norm of the symmetric M = G_U - I. Squaring M ``squarings`` times (renormalising each
    time) leaves only its eigenvectors of largest |eigenvalue| (to the power 2^squarings);
    the largest column v of that power then gives |λ|max = ||M v|| / ||v||. An eigenvalue
    within a relative ε of the top one can leak in with weight ~exp(-2^squarings ε), so the
    error is below ~1/(e 2^squarings) relative (4e-5 at 14), far inside the 1e-4 target;
    the GPU test checks it against float64 SVD.

    (W: [N, D] on the GPU), (supports: [P, S] int, padding past sizes[p]), (sizes: [P]).
    Padded rows are masked out of M, so one batch holds supports of every size.
    """
    Wn = W.float() / W.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = torch.empty(supports.shape[0], device=W.device, dtype=torch.float32)
    S = supports.shape[1]
    ar = torch.arange(S, device=W.device)
    eye = torch.eye(S, device=W.device)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32: the 1e-4 check needs it
    try:
        for c in range(0, supports.shape[0], chunk):
            sup = supports[c : c + chunk].to(W.device, torch.long)
            mask = (ar[None, :] < sizes[c : c + chunk].to(W.device)[:, None]).float()  # [p, S]
            Du = Wn[sup.clamp(0, Wn.shape[0] - 1)] * mask[..., None]
            M = (Du @ Du.transpose(1, 2) - eye) * (mask[:, :, None] * mask[:, None, :])
            A = M
            for _ in range(squarings):
                A = A @ A
                A = A / A.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
            col = A.norm(dim=1).argmax(dim=1)  # [p]
            v = A.gather(2, col[:, None, None].expand(-1, S, 1))  # [p, S, 1]
            Mv = M @ v
            out[c : c + chunk] = Mv.norm(dim=(1, 2)) / v.norm(dim=(1, 2)).clamp_min(1e-30)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return out


def mp_delta(s: np.ndarray | float, d: int) -> np.ndarray:
    """Marchenko–Pastur prediction of δ for s random unit rows in dimension d."""
    return np.maximum(mp_upper(s, d), mp_lower(s, d))


def mp_lower(s: np.ndarray | float, d: int) -> np.ndarray:
    """Marchenko–Pastur prediction of the lower side 1 − λ_min for s random unit rows in
    dimension d: 1 − (1 − √r)² = 2√r − r for r = s/d ≤ 1, and 1 past it (a singular Gram)."""
    r = np.asarray(s, np.float64) / d
    return np.where(r <= 1, 1 - (1 - np.sqrt(np.minimum(r, 1))) ** 2, 1.0)


def mp_upper(s: np.ndarray | float, d: int) -> np.ndarray:
    """Marchenko–Pastur prediction of the upper side λ_max − 1: (1 + √r)² − 1 = 2√r + r."""
    r = np.asarray(s, np.float64) / d
    return (1 + np.sqrt(r)) ** 2 - 1


# ----------------------------------------------------------------------------- the dictionary


@torch.no_grad()
def nearest_atom_cos(W: torch.Tensor | np.ndarray, block: int = 4096) -> np.ndarray:
    """[N] float64: for each atom (row of W [N, D]), the largest |cos| with any *other* atom.

    Built in row blocks of the float64 |cos| matrix (memory block x N)."""
    A = torch.as_tensor(np.asarray(W) if not isinstance(W, torch.Tensor) else W).detach()
    A = A.to("cpu", torch.float64)
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-300)
    N = A.shape[0]
    out = np.zeros(N, np.float64)
    if N < 2:
        return out
    for i in range(0, N, block):
        c = (A[i : i + block] @ A.T).abs_()
        rows = torch.arange(i, min(i + block, N))
        c[rows - i, rows] = -1.0  # not the atom itself
        out[i : i + block] = c.max(dim=1).values.numpy()
    return out


def dictionary_summary(W: torch.Tensor | np.ndarray, duplicate: float = NEAR_DUPLICATE) -> dict:
    """The dictionary's own geometry: ``coherence`` (largest |cos| between two atoms) and
    ``dup_frac`` (fraction of atoms with another atom at |cos| > ``duplicate``)."""
    best = nearest_atom_cos(W)
    return {"coherence": float(best.max(initial=0.0)), "dup_frac": float((best > duplicate).mean())}


# ----------------------------------------------------------------------------- sampling


def n_possible_pairs(n_rows: int) -> int:
    return n_rows * (n_rows - 1) // 2


def sample_pairs(n_rows: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n_pairs distinct unordered pairs i < j of rows, uniformly without replacement.

    Raises UserError when more pairs are asked for than C(n_rows, 2) exist.
    """
    M = n_possible_pairs(n_rows)
    if n_pairs < 1:
        raise UserError(f"--pairs must be at least 1, not {n_pairs}")
    if n_pairs > M:
        raise UserError(
            f"--pairs {n_pairs} is more than the {M} distinct pairs of the {n_rows} held-out rows"
        )
    t = np.sort(rng.choice(M, size=n_pairs, replace=False)).astype(np.int64)
    # Invert the triangular numbering: row i owns t in [off(i), off(i+1)), off(i) = i(2n-i-1)/2.
    n = n_rows

    def off(i: np.ndarray) -> np.ndarray:
        return i * (2 * n - i - 1) // 2

    i = np.floor(((2 * n - 1) - np.sqrt((2.0 * n - 1) ** 2 - 8.0 * t)) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    for _ in range(2):  # float rounding can put i one off either way
        i = np.where(off(i + 1) <= t, i + 1, i)
        i = np.where(off(i) > t, i - 1, i)
    j = t - off(i) + i + 1
    return i, j


def row_supports(val: torch.Tensor | np.ndarray, idx: torch.Tensor | np.ndarray, n_atoms: int) -> np.ndarray:
    """(val [R, K], idx [R, K]) codes -> [R, K'] int64 supports (idx where val != 0), sorted,
    the inactive slots set to the sentinel ``n_atoms``; K' = the largest support size (dense
    relu codes, K = N, shrink to their actual L0)."""
    val = val.detach().cpu().numpy() if isinstance(val, torch.Tensor) else np.asarray(val)
    idx = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    S = np.sort(np.where(val != 0, idx, n_atoms).astype(np.int64), axis=1)
    width = int((S < n_atoms).sum(1).max(initial=0))
    return S[:, : max(width, 1)]


def union_supports(
    S_i: np.ndarray, S_j: np.ndarray, n_atoms: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise unions. (S_i: [P, K_i], S_j: [P, K_j]) with sentinel ``n_atoms`` for empty
    slots -> (supports [P, K_i + K_j] sorted, sentinel-padded; sizes [P])."""
    U = np.sort(np.concatenate([S_i, S_j], axis=1), axis=1)
    dup = np.zeros_like(U, dtype=bool)
    dup[:, 1:] = U[:, 1:] == U[:, :-1]
    U = np.sort(np.where(dup, n_atoms, U), axis=1)
    return U, (U < n_atoms).sum(1)


def random_supports(sizes: np.ndarray, n_atoms: int, rng: np.random.Generator) -> np.ndarray:
    """For each size s, s distinct atoms uniformly at random. -> [P, max(sizes)] padded with
    the sentinel ``n_atoms``."""
    sizes = np.asarray(sizes, np.int64)
    if len(sizes) and sizes.max() > n_atoms:
        raise ValueError(f"cannot draw {sizes.max()} distinct atoms out of {n_atoms}")
    S = np.full((len(sizes), max(int(sizes.max(initial=0)), 1)), n_atoms, np.int64)
    for s in np.unique(sizes).tolist():
        if s == 0:
            continue
        where = np.nonzero(sizes == s)[0]
        if s * s <= n_atoms:
            # Few collisions (birthday bound < 1/2): draw with replacement, redraw bad rows.
            draw = rng.integers(0, n_atoms, size=(len(where), s))
            while True:
                srt = np.sort(draw, axis=1)
                bad = (srt[:, 1:] == srt[:, :-1]).any(1)
                if not bad.any():
                    break
                draw[bad] = rng.integers(0, n_atoms, size=(int(bad.sum()), s))
        else:
            # Large supports: the s smallest of random keys, in chunks of bounded memory.
            step = max(1, (1 << 22) // n_atoms)
            draw = np.concatenate(
                [
                    np.argpartition(rng.random((min(step, len(where) - c), n_atoms)), s - 1, axis=1)[:, :s]
                    for c in range(0, len(where), step)
                ]
            )
        S[where, :s] = draw
    return S


def gaussian_dictionary(n_atoms: int, d: int, seed: int) -> torch.Tensor:
    """A random Gaussian dictionary with unit rows, [N, D] float32 (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n_atoms, d, generator=gen, dtype=torch.float32)
    return W / W.norm(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- the report


def summarize(deltas: np.ndarray, sizes: np.ndarray, prefix: str,
              lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> dict:
    """Quantiles 50/90/99/max of δ, fractions under 1/3 and under √2−1, mean |U|; with the
    two sides, their quantiles 50/90/99 (``<prefix>_lower_q50``, ``<prefix>_upper_q50``, …)
    and the fraction of near-singular unions (lower side > NEAR_SINGULAR)."""
    d = np.asarray(deltas, np.float64)
    nan = float("nan")
    q = np.quantile(d, [0.5, 0.9, 0.99]) if len(d) else [nan] * 3
    out = {
        f"{prefix}_q50": float(q[0]),
        f"{prefix}_q90": float(q[1]),
        f"{prefix}_q99": float(q[2]),
        f"{prefix}_max": float(d.max()) if len(d) else nan,
    }
    for name, t in THRESHOLDS.items():
        out[f"{prefix}_frac_lt_{name}"] = float((d < t).mean()) if len(d) else nan
    out[f"{prefix}_mean_size"] = float(np.mean(sizes)) if len(d) else nan
    for side, v in (("lower", lower), ("upper", upper)):
        if v is None:
            continue
        qs = np.quantile(v, [0.5, 0.9, 0.99]) if len(v) else [nan] * 3
        out.update({f"{prefix}_{side}_q{p}": float(x) for p, x in zip((50, 90, 99), qs)})
    if lower is not None:
        out[f"{prefix}_frac_singular"] = float((lower > NEAR_SINGULAR).mean()) if len(d) else nan
    return out


def ric_report(
    W_dec: torch.Tensor | np.ndarray,
    supports: np.ndarray,
    n_pairs: int,
    seed: int,
    k: int | None = None,
    truth: tuple[torch.Tensor | np.ndarray, np.ndarray] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[pd.DataFrame, dict]:
    """The restricted-isometry study of one dictionary on its observed supports.

    (W_dec: [N, D]); (supports: [R, K] per held-out row, sentinel N where inactive, see
    ``row_supports``); ``k``: the coder's k, for the |U| = 2k lower bound on δ_2k;
    ``truth``: optional (W_true [N_t, D], true supports [R, K_t] with sentinel N_t) on the
    same rows, evaluated on the same pairs as a further calibration.

    -> (per-pair table: pair, kind observed | random_support | gaussian | truth, size, delta,
    lower, upper (the two sides), mp = Marchenko–Pastur δ at that size; one-row summary
    dict: ``summarize`` of each kind, and ``dict_coherence`` / ``dict_dup_frac`` of the
    dictionary (``truth_coherence`` / ``truth_dup_frac`` of the true one)).
    """
    seed = check_int("--seed", seed, 0, MAX_SEED)
    W = torch.as_tensor(W_dec).detach().cpu()
    N, D = W.shape
    supports = np.asarray(supports, np.int64)
    R = supports.shape[0]
    rng = np.random.default_rng(seed)
    i, j = sample_pairs(R, n_pairs, rng)
    U, sizes = union_supports(supports[i], supports[j], N)

    def sides(W_, S_, sz):
        return isometry_sides(*gram_extremes(W_, S_, sz, device=device))

    rnd_S = random_supports(sizes, N, rng)
    # Its own stream (not seed + 1: a coder initialised from Gaussian rows with that seed
    # would *be* this dictionary).
    g_seed = int(rng.integers(2**62))
    kinds = {
        "observed": (sides(W, U, sizes), sizes),
        "random_support": (sides(W, rnd_S, sizes), sizes),
        "gaussian": (sides(gaussian_dictionary(N, D, g_seed), rnd_S, sizes), sizes),
    }
    summary: dict = {"d": D, "n_atoms": N, "k": k, "pairs": n_pairs, "heldout_rows": R, "seed": seed}
    summary.update({f"dict_{k_}": v for k_, v in dictionary_summary(W).items()})
    if truth is not None:
        W_t = torch.as_tensor(truth[0]).detach().cpu()
        S_t = np.asarray(truth[1], np.int64)
        if S_t.shape[0] != R:
            raise ValueError("true supports must be on the same rows as the observed ones")
        Ut, sizes_t = union_supports(S_t[i], S_t[j], W_t.shape[0])
        kinds["truth"] = (sides(W_t, Ut, sizes_t), sizes_t)
        summary.update({f"truth_{k_}": v for k_, v in dictionary_summary(W_t).items()})

    table = pd.concat(
        [
            pd.DataFrame(
                {
                    "pair": np.arange(n_pairs, dtype=np.int64),
                    "kind": kind,
                    "size": sz.astype(np.int64),
                    "delta": dl,
                    "lower": lo,
                    "upper": up,
                    "mp": mp_delta(sz, D),
                }
            )
            for kind, ((lo, up, dl), sz) in kinds.items()
        ],
        ignore_index=True,
    )

    for kind, ((lo, up, dl), sz) in kinds.items():
        summary.update(summarize(dl, sz, kind, lower=lo, upper=up))
    # Asymptotic: at small |U| the sampled Gaussian median sits well below it (Tracy–Widom
    # fluctuations of the edge); the ``gaussian`` rows are the calibration, this the theory.
    summary["mp_q50"] = float(np.median(mp_delta(sizes, D)))
    summary["mp_lower_q50"] = float(np.median(mp_lower(sizes, D)))
    summary["mp_upper_q50"] = float(np.median(mp_upper(sizes, D)))
    if k is not None:
        at = sizes == 2 * k
        obs = kinds["observed"][0][2]
        summary["n_pairs_size_2k"] = int(at.sum())
        # Not δ_2k itself: the max over the supports we happened to sample.
        summary["delta_2k_lower_bound"] = float(obs[at].max()) if at.any() else float("nan")
    return table, summary


# ----------------------------------------------------------------------------- a checkpoint


def ric_of_checkpoint(
    ckpt: Checkpoint | str | os.PathLike,
    activations: ActivationSet | str | os.PathLike,
    pairs: int = 10000,
    seed: int = 0,
    max_rows: int = 50000,
    device: str = "cpu",
) -> tuple[pd.DataFrame, dict]:
    """ric_report of a checkpoint's dictionary on the supports of its own codes on the first
    ``max_rows`` held-out rows of ``activations`` (a synthetic set's truth: its true codes).

    When the set has a truth and the checkpoint is a model, the true dictionary on its own
    true supports of the same sampled pairs is one more calibration (kind ``truth``).
    -> (per-pair table, one-row summary).
    """
    check_int("--seed", seed, 0, MAX_SEED)  # before the (long) encoding
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else load(ckpt, device=device)
    acts = activations if isinstance(activations, ActivationSet) else ActivationSet(activations)
    check_activations(acts, ckpt)
    if max_rows < 2:
        raise UserError("--max-rows must be at least 2")
    truth_here = not is_truth(ckpt) and has_true_codes(acts)
    cols = true_codes_columns(acts, ckpt) if is_truth(ckpt) else (list(TRUE_CODE_COLUMNS) if truth_here else [])

    # Count the rows before encoding anything, so an impossible number of pairs fails at once.
    rows = min(max_rows, acts.meta.get("heldout_rows", max_rows))
    if "heldout_rows" in acts.meta and pairs > n_possible_pairs(rows):
        raise UserError(
            f"--pairs {pairs} is more than the {n_possible_pairs(rows)} distinct pairs of "
            f"the {rows} held-out rows of {acts.path}"
        )
    data = acts.load("heldout", columns=cols, max_rows=max_rows)
    x = data["x"]
    if is_truth(ckpt):
        S = row_supports(data["z_val"], data["z_idx"], ckpt.d_sae)
        source = "true codes"
    else:
        log.info("encoding %d held-out rows", len(x))
        c = ckpt.encode_raw(x)
        S = row_supports(c.val, c.idx, ckpt.d_sae)
        source = "encoder"
    truth = None
    if truth_here:
        W_t = load_decoder(acts.path / "truth")
        truth = (W_t, row_supports(data["z_val"], data["z_idx"], W_t.shape[0]))

    table, summary = ric_report(ckpt.W_dec, S, pairs, seed, k=ckpt.cfg.get("k"), truth=truth,
                                device=device)
    summary = {
        "ckpt": str(ckpt.path),
        "arch": ckpt.cfg.get("arch"),
        "width": ckpt.d_sae,
        "ckpt_seed": ckpt.cfg.get("seed"),
        "support_source": source,
        **summary,
    }
    log.info(
        "δ_U median %.3f (random supports %.3f, Gaussian %.3f, MP %.3f)",
        summary["observed_q50"], summary["random_support_q50"], summary["gaussian_q50"],
        summary["mp_q50"],
    )
    return table, summary
