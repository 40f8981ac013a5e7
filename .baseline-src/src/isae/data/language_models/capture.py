"""Activations at a hook, for the content positions of a framed batch."""

from __future__ import annotations

import re

import torch

from isae.data.language_models.chunking import Batch
from isae.errors import UserError


def stop_after(bridge, hook: str) -> dict:
    """``{"stop_at_layer": L + 1}`` for a hook inside block L (not the last): the blocks
    after it and the unembedding do not change its value, and skipping them makes
    extraction several times faster (MiniLM block 3: ~5x on CPU)."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m is None:
        return {}
    nxt = int(m.group(1)) + 1
    return {"stop_at_layer": nxt} if nxt < bridge.cfg.n_layers else {}


@torch.inference_mode()
def capture(bridge, batch: Batch, hook: str) -> torch.Tensor:
    """Activations at ``hook`` for the content positions of a batch -> [rows, d] (device).

    Hooks with per-head outputs ([B, T, H, d_head]) are flattened to [B, T, H*d_head];
    hooks that are not per position (attention patterns) are refused.
    """
    _, cache = bridge.run_with_cache(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        names_filter=lambda n: n == hook,
        **stop_after(bridge, hook),
    )
    act = cache[hook]
    B, T = batch.input_ids.shape
    if act.ndim < 3 or tuple(act.shape[:2]) != (B, T):
        raise UserError(
            f"hook {hook!r} gives shape {tuple(act.shape)}, not [batch, position, ...]; "
            "pick a per-token hook such as blocks.L.hook_resid_post"
        )
    return act.reshape(B, T, -1)[batch.content]
