"""A synthetic set's truth as one side of a comparison.

A synthetic activation set carries its true dictionary as a checkpoint (``truth/``, arch
``truth``) and each row's true code (columns ``z_idx``, ``z_val``). Matching or restricted
isometry against the truth reads those codes, and only from the set the truth belongs to.
"""

from __future__ import annotations

import torch

from isae.data.activations import ActivationSet
from isae.data.checkpoints import Checkpoint, load_decoder
from isae.errors import UserError

#: The columns of a synthetic set that hold each row's true code.
TRUE_CODE_COLUMNS = ["z_idx", "z_val"]


def is_truth(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` is a synthetic set's true dictionary."""
    return ckpt.cfg.get("arch") == "truth"


def has_true_codes(acts: ActivationSet) -> bool:
    """Whether ``acts`` holds a truth and its rows' true codes."""
    return acts.has_truth and set(TRUE_CODE_COLUMNS) <= set(acts.columns())


def check_activations(acts: ActivationSet, ckpt: Checkpoint) -> None:
    """UserError unless the set's rows have the checkpoint's dimension."""
    if acts.d != ckpt.d_in:
        raise UserError(
            f"activation set {acts.path} has d={acts.d}, checkpoint {ckpt.path} has d_in={ckpt.d_in}"
        )


def true_codes_columns(acts: ActivationSet, truth_ckpt: Checkpoint) -> list[str]:
    """The columns holding ``truth_ckpt``'s codes in ``acts``; UserError when there are none
    or when the truth is not this set's truth (its codes would mean nothing)."""
    if not set(TRUE_CODE_COLUMNS) <= set(acts.columns()):
        raise UserError(
            f"{truth_ckpt.path} is a truth checkpoint but activation set {acts.path} has no true "
            "codes (columns z_idx, z_val): pass the synthetic set it belongs to"
        )
    if not acts.has_truth or not torch.equal(load_decoder(acts.path / "truth"), truth_ckpt.W_dec.cpu()):
        raise UserError(f"{truth_ckpt.path} is not the truth of activation set {acts.path}")
    return TRUE_CODE_COLUMNS
