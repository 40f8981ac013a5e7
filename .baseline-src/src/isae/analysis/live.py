"""Live latents, and dictionary stability that does not count dead latents as instability.

A latent is *live* when it fires (a nonzero code) at least once on the held-out rows
measured, and *dead* otherwise: the complement of the dead fraction of
isae.analysis.reconstruction. A dead latent's decoder row stays wherever training left it,
often near its random initialisation, so it matches the other seed's atoms at about chance;
at 32 x d, where a third of the latents can be dead, an all-latent matched |cos| then
measures the dead fraction as much as the dictionary.

Live stability matches the live atoms of A against the live atoms of B alone: a Hungarian
assignment on the |cos| matrix restricted to them (min(n_a, n_b) pairs). This is not the
same as matching every atom and keeping the pairs whose two members are live: there a live
atom can be assigned to a dead partner (or lose its partner to a dead atom that happens to
lie near it) and drop out, so the number would still depend on the dead atoms. Matching the
live atoms alone asks only whether the latents each seed uses agree.

Its chance level is computed on the same shapes: two random dictionaries of n_a and n_b
atoms (for a seed pair, random training rows, ``live_chance``), since a matching of fewer
atoms in the same dimension sits higher by chance.

Pure functions on arrays and tensors, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from isae.analysis.matching import Matching, match_dictionaries, random_dictionary

#: The keys of ``live_summary``, in the order the tables list them.
LIVE_KEYS = ("live_n_a", "live_n_b", "live_n_matched", "live_mean_abs_cos",
             "live_frac_gt_0.9", "live_frac_gt_0.7")


def fired_latents(val, idx, width: int) -> np.ndarray:
    """[N] bool: the latents with a nonzero code on some row. (val, idx: [B, K]) sparse codes
    (for a dense code, idx = arange(N) on every row)."""
    val = torch.as_tensor(val)
    idx = torch.as_tensor(idx).long()
    fired = torch.zeros(width, dtype=torch.bool, device=idx.device)
    fired[idx[val != 0]] = True
    return fired.cpu().numpy()


def live_matching(W_a, W_b, live_a, live_b, device: str | torch.device = "cpu",
                  block: int = 4096) -> tuple[Matching | None, np.ndarray, np.ndarray]:
    """The matching of A's live atoms with B's live atoms only.

    (W_a: [N_a, D], W_b: [N_b, D], live_a: [N_a] bool, live_b: [N_b] bool) -> (Matching of
    the restricted dictionaries, or None when one side has no live atom; the live indices
    of A and of B, into which the Matching's ``a`` and ``b`` index).
    """
    ia = np.flatnonzero(np.asarray(live_a, bool))
    ib = np.flatnonzero(np.asarray(live_b, bool))
    if len(ia) == 0 or len(ib) == 0:
        return None, ia, ib
    A = torch.as_tensor(W_a)[torch.as_tensor(ia)]
    B = torch.as_tensor(W_b)[torch.as_tensor(ib)]
    return match_dictionaries(A, B, device=device, block=block), ia, ib


def live_summary(W_a, W_b, live_a, live_b, device: str | torch.device = "cpu",
                 block: int = 4096, matching: Matching | None = None) -> dict:
    """The stability numbers over the latents live in both dictionaries (``LIVE_KEYS``):
    the live counts of A and B, the matched pairs, their mean |cos| and the fractions above
    0.9 and 0.7 (NaN when one side has no live atom).

    ``matching``: the all-latent matching of W_a and W_b, reused when every atom of both is
    live (the restricted matching is then the same problem).
    """
    live_a = np.asarray(live_a, bool)
    live_b = np.asarray(live_b, bool)
    if matching is not None and live_a.all() and live_b.all():
        m = matching
    else:
        m, _, _ = live_matching(W_a, W_b, live_a, live_b, device=device, block=block)
    out = {"live_n_a": int(live_a.sum()), "live_n_b": int(live_b.sum())}
    if m is None:
        return {**out, "live_n_matched": 0, "live_mean_abs_cos": math.nan,
                "live_frac_gt_0.9": math.nan, "live_frac_gt_0.7": math.nan}
    s = m.summary()
    return {**out, "live_n_matched": s["n_matched"], "live_mean_abs_cos": s["mean_abs_cos"],
            "live_frac_gt_0.9": s["frac_gt_0.9"], "live_frac_gt_0.7": s["frac_gt_0.7"]}


def live_chance(n_a: int, n_b: int, d: int, gen: torch.Generator, rows=None,
                device: str | torch.device = "cpu") -> float:
    """Matched |cos| of two random dictionaries of n_a and n_b atoms in dimension d, the
    chance level of a live stability number over those counts: random training rows
    (``rows`` [R, d], centred and scaled as in training; R >= max(n_a, n_b)), or isotropic
    Gaussian atoms without rows. NaN when a side is empty."""
    if n_a < 1 or n_b < 1:
        return math.nan
    kind = "gaussian" if rows is None else "data_rows"
    A = random_dictionary(kind, n_a, d, gen, rows)
    B = random_dictionary(kind, n_b, d, gen, rows)
    return float(match_dictionaries(A, B, device=device).summary()["mean_abs_cos"])
