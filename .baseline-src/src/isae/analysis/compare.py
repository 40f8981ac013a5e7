"""Two checkpoints compared: dictionary stability (matching) and, on an activation set's
held-out rows, code consistency.

Either side may be a synthetic set's ``truth/`` checkpoint: then the comparison is
ground-truth recovery, and with an activation set the truth's codes are the set's own true
codes. Codes are compared in the units of the raw activations: a model's codes live in its
normalised space (x - mean) / scale and are multiplied by its scale. Either side may also be
a SAELens or sparsify folder (``isae.data.checkpoints.load`` reads them).

With an activation set, the stability is also given over the latents live in both (those
that fire on some of the held-out rows compared; a truth atom is live where some row's
true code uses it), matched among themselves (isae.analysis.live), with the isotropic
chance level of those counts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from isae.analysis.consistency import code_consistency
from isae.analysis.live import fired_latents, live_chance, live_summary
from isae.analysis.matching import chance_mean_abs_cos, match_dictionaries
from isae.analysis.truth import check_activations, is_truth, true_codes_columns
from isae.data.activations import ActivationSet
from isae.data.checkpoints import Checkpoint, load
from isae.errors import UserError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def compare_checkpoints(
    a: Checkpoint | PathLike,
    b: Checkpoint | PathLike,
    activations: ActivationSet | PathLike | None = None,
    max_rows: int = 50000,
    device: str = "cpu",
    block: int = 4096,
) -> tuple[pd.DataFrame, dict]:
    """Match B's dictionary to A's; with ``activations``, compare their codes on its first
    ``max_rows`` held-out rows. ``block``: rows of A per cosine block.

    -> (per-atom table of A: its match in B, |cos|, sign, and with activations the codes'
    agreement per matched pair and whether each side's atom is live; one-row summary dict).
    """
    A, B = (c if isinstance(c, Checkpoint) else load(c, device=device) for c in (a, b))
    if A.d_in != B.d_in:
        raise UserError(f"{A.path} has d_in={A.d_in} but {B.path} has d_in={B.d_in}: not comparable")
    if max_rows < 1:
        raise UserError("--max-rows must be at least 1")
    acts = None
    if activations is not None:
        # Fail on bad input before the (long) matching.
        acts = activations if isinstance(activations, ActivationSet) else ActivationSet(activations)
        for c in (A, B):
            check_activations(acts, c)
        cols = sorted({col for c in (A, B) if is_truth(c) for col in true_codes_columns(acts, c)})

    log.info("matching %s (%d atoms) with %s (%d atoms)", A.path, A.d_sae, B.path, B.d_sae)
    m = match_dictionaries(A.W_dec, B.W_dec, device=device, block=block)
    summary = {**_describe(A, "a"), **_describe(B, "b"), "d_in": A.d_in, **m.summary(),
               **m.certificate.summary(),
               "chance_mean_abs_cos": chance_mean_abs_cos(A.d_sae, B.d_sae, A.d_in, device=device)}
    table = m.table()

    if acts is not None:
        data = acts.load("heldout", columns=cols, max_rows=max_rows)
        log.info("codes on %d held-out rows of %s", len(data["x"]), acts.path)
        codes = [_codes(c, data) for c in (A, B)]
        live_a, live_b = (fired_latents(*z, c.d_sae) for z, c in zip(codes, (A, B)))
        summary.update(live_summary(A.W_dec, B.W_dec, live_a, live_b, device=device,
                                    block=block, matching=m))
        summary["live_chance_mean_abs_cos"] = live_chance(
            summary["live_n_a"], summary["live_n_b"], A.d_in, torch.Generator().manual_seed(0),
            device=device)
        cons = code_consistency(codes[0], codes[1], m)
        summary.update({f"code_{k}": v for k, v in cons.summary().items()})
        per_pair = pd.DataFrame(
            {
                "a": m.a,
                "pearson_all": cons.pearson_all,
                "pearson_active": cons.pearson_active,
                "active_a": cons.active_a,
                "active_b": cons.active_b,
                "active_both": cons.active_both,
            }
        )
        table = table.merge(per_pair.assign(matched=True), on=["a", "matched"], how="left")
        # Per row of the table: its A atom's and its B atom's liveness (False where none).
        table["live_a"] = np.where(table["a"] >= 0, live_a[table["a"].clip(lower=0)], False)
        table["live_b"] = np.where(table["b"] >= 0, live_b[table["b"].clip(lower=0)], False)
    return table, summary


def _describe(ckpt: Checkpoint, side: str) -> dict:
    c = ckpt.cfg
    return {
        side: str(Path(ckpt.path)),
        f"arch_{side}": c.get("arch"),
        f"k_{side}": c.get("k"),
        f"width_{side}": ckpt.d_sae,
        f"seed_{side}": c.get("seed"),
        f"truth_{side}": is_truth(ckpt),
    }


def _codes(ckpt: Checkpoint, data: dict):
    """(val, idx) codes of ``ckpt`` on the loaded rows, in the units of the raw activations:
    the true codes for a truth checkpoint, the encoder's (which live in the checkpoint's
    normalised space) times its scale otherwise. Two checkpoints with different
    normalisations (an isae checkpoint and a SAELens SAE, whose normalisation is the
    identity) are then compared in the same units; for equal scales nothing changes."""
    if is_truth(ckpt):
        return np.asarray(data["z_val"], np.float64), np.asarray(data["z_idx"], np.int64)
    c = ckpt.encode_raw(data["x"])
    return c.val.double() * float(ckpt.norm.scale), c.idx
