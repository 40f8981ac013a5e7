"""Downstream fidelity: the SAE reconstruction spliced into the model at its hook.

At every content position (not special tokens, not padding) the activation at the hook is
replaced, through a transformer-lens forward hook, by

* ``spliced`` — the checkpoint's reconstruction ``ckpt.reconstruct_raw(act)``;
* ``zero``    — zeros (zero-ablation);
* ``mean``    — the activation set's mean vector (mean-ablation; by default the mean stored
  in the checkpoint's normalisation, which is the training set's mean).

What is compared depends on the model (``isae.data.language_models.model_kind``):

* causal LM (``kind = "lm"``): mean next-token cross-entropy over the content tokens,
  clean / spliced / zero / mean, and the fraction of loss recovered
  ``(CE_abl - CE_spliced) / (CE_abl - CE_clean)`` against each ablation;
* encoder without a usable LM head (``kind = "encoder"``, the embedded MiniLM): the sentence
  embedding of each context (mean of the final block's states over its non-pad tokens, as
  sentence-transformers pools), cosine between the clean and the modified embedding,
  averaged over contexts, and the fraction recovered ``(sim_spliced - sim_abl) /
  (1 - sim_abl)`` — the same formula with loss = -similarity and a clean similarity of 1.

Contexts come from the same text source and the same cutting as the activation set
(``isae.data.language_models``); by default only held-out documents are used.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from isae.data import language_models as lm
from isae.data.activations import ActivationSet, heldout_mask
from isae.errors import UserError

log = logging.getLogger(__name__)

Replace = Callable[[torch.Tensor], torch.Tensor]
"""Rows of activations [n, d] -> replacement rows [n, d]."""

VARIANTS = ("spliced", "zero", "mean")


# ----------------------------------------------------------------------------- pure math


def fraction_recovered(clean: float, spliced: float, ablated: float) -> float:
    """Fraction of the ablation's damage that the splice undoes, on a loss (lower = better):
    ``(ablated - spliced) / (ablated - clean)``. 1: as good as clean; 0: as bad as the
    ablation. NaN when the ablation does no damage."""
    den = ablated - clean
    if den == 0 or not math.isfinite(den):
        return float("nan")
    return float((ablated - spliced) / den)


def similarity_recovered(sim_spliced: float, sim_ablated: float) -> float:
    """``(sim_spliced - sim_ablated) / (1 - sim_ablated)``: ``fraction_recovered`` on the loss
    ``-cos`` whose clean value is -1 (the clean embedding matches itself)."""
    return fraction_recovered(-1.0, -sim_spliced, -sim_ablated)


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[float, int]:
    """Summed next-token cross-entropy and its count.

    (logits: [B, T, V]); (input_ids: [B, T]); (target_mask: [B, T] bool) marks the tokens
    that count as targets: position t's logits are scored on token t+1 where
    ``target_mask[:, t+1]``.
    """
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    tgt = input_ids[:, 1:]
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    m = target_mask[:, 1:]
    return float(nll[m].sum()), int(m.sum())


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(states: [B, T, D]), (mask: [B, T] 0/1) -> [B, D] mean over the masked-in positions."""
    w = mask.to(states.dtype).unsqueeze(-1)
    return (states * w).sum(1) / w.sum(1).clamp_min(1.0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of [B, D] tensors, in float64 -> [B]."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


# ----------------------------------------------------------------------------- running


class _Stop(Exception):
    """Raised by the capture hook once the final states are in hand: an encoder's LM head
    (MiniLM's is random) need not run."""


def splice_hook(replace: Replace, content: torch.Tensor | None = None):
    """A transformer-lens forward hook that replaces the activation rows at the positions
    ``content`` ([B, T] bool; None: every position) by ``replace(rows)``. Per-head hooks
    ([B, T, H, d_head]) are replaced as flattened rows."""
    def fn(act: torch.Tensor, hook) -> torch.Tensor:
        B, T = act.shape[:2]
        mask = content if content is not None else torch.ones(B, T, dtype=torch.bool)
        mask = mask.to(act.device)
        flat = act.reshape(B, T, -1)
        rows = flat[mask]
        new = flat.clone()
        new[mask] = replace(rows).to(dtype=act.dtype, device=act.device).reshape(rows.shape)
        return new.reshape(act.shape)

    return fn


@torch.inference_mode()
def run_variant(loaded_bridge, hook: str, batch: lm.Batch, kind: str, replace: Replace | None):
    """One forward pass with ``replace`` spliced in at ``hook`` (None: clean).

    Returns logits [B, T, V] for an LM, final-block states [B, T, D] for an encoder.
    """
    bridge = loaded_bridge
    hooks = [] if replace is None else [(hook, splice_hook(replace, batch.content))]
    if kind == "lm":
        return bridge.run_with_hooks(
            batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks
        )
    box: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> None:
        box["final"] = act.detach().clone()
        raise _Stop

    # Registered after the splice: when the splice is at the final hook itself, the
    # captured states are the spliced ones.
    hooks.append((lm.final_hook(bridge), grab))
    try:
        bridge.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    except _Stop:
        pass
    if "final" not in box:
        raise RuntimeError(f"hook {lm.final_hook(bridge)} did not fire")
    return box["final"]


def measure(
    bridge,
    hook: str,
    batches,
    replacements: dict[str, Replace],
    kind: str,
) -> dict[str, float]:
    """Clean and modified runs over ``batches``; ``replacements`` maps a variant name
    (spliced, zero, mean, …) to its Replace.

    LM: ``ce_clean`` and ``ce_<name>`` (mean nats per target token, float64 sums).
    Encoder: ``sim_<name>`` (mean over contexts of cos(clean, modified embedding)).
    Also ``tokens`` (content tokens seen) and ``contexts``.
    """
    sums = {name: 0.0 for name in ["clean", *replacements]}
    count, tokens, contexts = 0, 0, 0
    for batch in batches:
        clean = run_variant(bridge, hook, batch, kind, None)
        if kind == "lm":
            s, n = next_token_ce(clean, batch.input_ids, batch.content)
            sums["clean"] += s
            count += n
            for name, rep in replacements.items():
                out = run_variant(bridge, hook, batch, kind, rep)
                sums[name] += next_token_ce(out, batch.input_ids, batch.content)[0]
        else:
            emb = mean_pool(clean, batch.attention_mask)
            count += emb.shape[0]
            for name, rep in replacements.items():
                out = mean_pool(run_variant(bridge, hook, batch, kind, rep), batch.attention_mask)
                sums[name] += float(cosine(emb, out).sum())
        tokens += batch.tokens
        contexts += batch.input_ids.shape[0]
    if count == 0:
        raise UserError("no text to measure fidelity on (no content tokens in the chosen split)")
    out: dict[str, float] = {"tokens": tokens, "contexts": contexts}
    if kind == "lm":
        out["ce_clean"] = sums["clean"] / count
        out.update({f"ce_{k}": v / count for k, v in sums.items() if k != "clean"})
    else:
        out.update({f"sim_{k}": v / count for k, v in sums.items() if k != "clean"})
    return out


def fractions(metrics: dict[str, float], kind: str) -> dict[str, float]:
    """``frac_recovered_zero`` / ``frac_recovered_mean`` from ``measure``'s output."""
    if kind == "lm":
        c, s = metrics["ce_clean"], metrics["ce_spliced"]
        return {
            "frac_recovered_zero": fraction_recovered(c, s, metrics["ce_zero"]),
            "frac_recovered_mean": fraction_recovered(c, s, metrics["ce_mean"]),
        }
    s = metrics["sim_spliced"]
    return {
        "frac_recovered_zero": similarity_recovered(s, metrics["sim_zero"]),
        "frac_recovered_mean": similarity_recovered(s, metrics["sim_mean"]),
    }


# ----------------------------------------------------------------------------- the API


def fidelity(
    checkpoint: str | os.PathLike,
    model: str | None = None,
    hook: str | None = None,
    text: str | None = None,
    context: int | None = None,
    max_tokens: int | None = 8192,
    device: str = "cpu",
    batch_size: int = 16,
    *,
    activations: str | os.PathLike | None = None,
    split: str = "heldout",
    heldout_fraction: float | None = None,
    seed: int | None = None,
) -> dict:
    """One row of the fidelity table for one checkpoint.

    ``model``, ``hook``, ``text``, ``context``, the split and the mean vector default to the
    activation set the checkpoint was trained on (``activations``); explicit arguments win.
    ``split``: ``heldout`` (documents the SAE never saw), ``train`` or ``all``.

    Keys: ckpt, kind ("lm" | "encoder"), model, hook, l0 (mean active latents on the spliced
    positions), tokens, contexts, ce_clean, ce_spliced, ce_zero, ce_mean, sim_spliced,
    sim_zero, sim_mean (NaN where they do not apply to the kind), frac_recovered_zero,
    frac_recovered_mean.
    """
    from isae.data.checkpoints import load

    meta = ActivationSet(activations).meta if activations is not None else {}
    model = model or meta.get("model")
    hook = hook or meta.get("hook")
    text = text or meta.get("text") or "pydoc"
    context = context or meta.get("context") or 128
    split_meta = meta.get("heldout") or {}
    fraction = heldout_fraction if heldout_fraction is not None else split_meta.get("fraction", 0.1)
    seed = seed if seed is not None else split_meta.get("seed", 0)
    if model is None or hook is None:
        raise UserError("fidelity needs --model and --hook, or --activations to read them from")
    if split not in ("heldout", "train", "all"):
        raise UserError(f"split must be heldout, train or all, not {split!r}")
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise UserError("batch_size and max_tokens must be positive")

    ckpt = load(checkpoint, device=device)
    mean_vec = np.asarray(meta["mean"], np.float32) if "mean" in meta else ckpt.norm.mean
    source = lm.open_text(text)
    loaded = lm.boot(model, device=device)
    native = lm.check_hook(loaded.bridge, hook, model=f"model {model!r}")
    fr = lm.framing(loaded.tokenizer)
    content_len = lm.check_context(context, fr, loaded.n_ctx)

    def keep(doc: int) -> bool:
        if split == "all":
            return True
        held = bool(heldout_mask(np.array([doc]), fraction, seed)[0])
        return held if split == "heldout" else not held

    chunks = lm.chunk_documents(lm.tokenize_documents(loaded.tokenizer, source.documents, keep),
                                content_len, max_tokens)
    batches = (b.to(device) for b in lm.batches(chunks, fr, context, batch_size))

    if mean_vec.shape != (ckpt.d_in,):
        raise UserError(f"mean vector has shape {mean_vec.shape}, the checkpoint d_in is {ckpt.d_in}")
    mean_t = torch.as_tensor(mean_vec, device=device)
    l0 = {"sum": 0.0, "n": 0}

    def spliced(rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[-1] != ckpt.d_in:
            raise UserError(f"hook {hook!r} has width {rows.shape[-1]}, checkpoint d_in {ckpt.d_in}")
        codes = ckpt.encode_raw(rows)
        l0["sum"] += float((codes.val != 0).sum())
        l0["n"] += rows.shape[0]
        return ckpt.reconstruct_raw(rows)

    reps: dict[str, Replace] = {
        "spliced": spliced,
        "zero": torch.zeros_like,
        "mean": lambda rows: mean_t.to(rows.dtype).expand_as(rows),
    }
    kind = loaded.kind
    metrics = measure(loaded.bridge, native, batches, reps, kind)
    nan = float("nan")
    row = {
        "ckpt": str(Path(checkpoint)),
        "kind": kind,
        "model": model,
        "hook": hook,
        "split": split,
        "l0": l0["sum"] / l0["n"] if l0["n"] else nan,
        "tokens": metrics["tokens"],
        "contexts": metrics["contexts"],
        **{k: metrics.get(k, nan) for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean")},
        **{k: metrics.get(k, nan) for k in ("sim_spliced", "sim_zero", "sim_mean")},
        **fractions(metrics, kind),
    }
    log.info("fidelity %s: %s", checkpoint, {k: row[k] for k in ("kind", "l0", "frac_recovered_zero")})
    return row
