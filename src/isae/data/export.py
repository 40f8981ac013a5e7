"""Write a checkpoint in SAELens's or sparsify's own folder layout (no dependency on either).

Both libraries feed *raw* activations to the SAE, so the normalisation stored in cfg.json
(x_n = (x - mean) / scale) is folded into the weights:
    W_enc' = W_enc / scale,  W_dec' = scale * W_dec,  b_dec' = scale * b_dec + mean,
which gives the same codes and raw reconstructions. The decoder rows then have norm
``scale`` instead of 1; both formats allow it. Signed TopK (iSAE) codes have no counterpart
activation in either library: the files load, but their libraries apply ReLU-TopK, so
``cfg.json`` records ``isae_signed`` to warn a reader.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from isae.data.atomic import writable_parent
from isae.data.checkpoints import Checkpoint
from isae.errors import UserError


def raw_space_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """W_enc [D, N], W_dec [N, D], b_enc [N], b_dec [D] acting on raw activations."""
    t = ckpt.model.export_tensors()
    mean = torch.as_tensor(ckpt.norm.mean, dtype=torch.float32)
    s = float(ckpt.norm.scale)
    return {
        "W_enc": (t["W_enc"] / s).contiguous(),
        "W_dec": (t["W_dec"] * s).contiguous(),
        "b_enc": t["b_enc"].contiguous(),
        "b_dec": (t["b_dec"] * s + mean).contiguous(),
    }


def _stage(out: Path) -> Path:
    writable_parent(out)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def _publish(stage: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)


def export_saelens(ckpt: Checkpoint, out: str | os.PathLike) -> Path:
    """SAELens layout: ``sae_weights.safetensors`` + ``cfg.json``."""
    out = Path(out)
    c = ckpt.cfg
    t = raw_space_tensors(ckpt)
    act = c.get("activations", {})
    arch = "standard" if c.get("kind") == "relu" else "topk"
    cfg = {
        "architecture": arch,
        "d_in": ckpt.d_in,
        "d_sae": ckpt.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "activation_fn_str": "relu" if arch == "standard" else "topk",
        "activation_fn_kwargs": {} if arch == "standard" else {"k": c.get("k")},
        "k": None if arch == "standard" else c.get("k"),
        "model_name": act.get("model"),
        "hook_name": act.get("hook"),
        "metadata": {"model_name": act.get("model"), "hook_name": act.get("hook"),
                     "isae_arch": c.get("arch"), "isae_signed": bool(c.get("signed"))},
        "isae_signed": bool(c.get("signed")),
    }
    stage = _stage(out)
    save_file(t, str(stage / "sae_weights.safetensors"))
    (stage / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")
    _publish(stage, out)
    return out


def export_sparsify(ckpt: Checkpoint, out: str | os.PathLike) -> Path:
    """sparsify layout: ``<out>/<hookpoint>/cfg.json`` + ``sae.safetensors`` with
    ``encoder.weight`` [N, D], ``encoder.bias`` [N], ``W_dec`` [N, D], ``b_dec`` [D]."""
    out = Path(out)
    c = ckpt.cfg
    if c.get("kind") != "topk" and c.get("kind") != "dl":
        raise UserError(f"sparsify has no {c.get('kind')} architecture; export it with --format saelens")
    t = raw_space_tensors(ckpt)
    hook = (c.get("activations", {}) or {}).get("hook") or "layer"
    cfg = {
        "activation": "topk",
        "expansion_factor": max(ckpt.d_sae // ckpt.d_in, 1),
        "normalize_decoder": False,
        "num_latents": ckpt.d_sae,
        "k": c.get("k"),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": ckpt.d_in,
        "isae_signed": bool(c.get("signed")),
    }
    stage = _stage(out)
    (stage / hook).mkdir()
    save_file(
        {
            "encoder.weight": t["W_enc"].T.contiguous(),
            "encoder.bias": t["b_enc"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
        },
        str(stage / hook / "sae.safetensors"),
    )
    (stage / hook / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")
    _publish(stage, out)
    return out
