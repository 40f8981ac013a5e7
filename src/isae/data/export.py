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
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from isae.data.atomic import check_out, publish, staging_folder
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


def _write(ckpt: Checkpoint, out: Path, kind: str, force: bool, fill: Callable[[Path], None]) -> Path:
    """Check ``out`` (isae.data.atomic.check_out), let ``fill`` write the staged folder, then
    publish it; the staged folder is removed on any failure."""
    check_out(out, kind, inputs=[ckpt.path], force=force)
    stage = staging_folder(out)
    try:
        fill(stage)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def folder_name(name, what: str) -> str:
    """``name`` (read from a file) as one folder name inside the output, or a UserError: no
    separators, no ``..``, nothing absolute, so that nothing is written outside ``--out``."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} {name!r} cannot name a folder")
    if (name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or name != name.strip()):
        raise UserError(f"{what} {name!r} cannot name a folder inside --out (it must be one "
                        "plain name: no '/', '\\' or '..')")
    return name


def export_saelens(ckpt: Checkpoint, out: str | os.PathLike, force: bool = False) -> Path:
    """SAELens layout: ``sae_weights.safetensors`` + ``cfg.json``. An existing ``out`` is
    replaced only when it is a SAELens export already, or with ``force``."""
    out = Path(out)
    c = ckpt.cfg
    t = raw_space_tensors(ckpt)
    m = ckpt.model.cfg  # validated at load; the raw cfg.json may lack defaulted fields
    act = c.get("activations") if isinstance(c.get("activations"), dict) else {}
    arch = "standard" if m.kind == "relu" else "topk"
    cfg = {
        "architecture": arch,
        "d_in": ckpt.d_in,
        "d_sae": ckpt.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "activation_fn_str": "relu" if arch == "standard" else "topk",
        "activation_fn_kwargs": {} if arch == "standard" else {"k": m.k},
        "k": None if arch == "standard" else m.k,
        "model_name": act.get("model"),
        "hook_name": act.get("hook"),
        "metadata": {"model_name": act.get("model"), "hook_name": act.get("hook"),
                     "isae_arch": m.arch, "isae_signed": m.signed},
        "isae_signed": m.signed,
    }

    def fill(stage: Path) -> None:
        save_file(t, str(stage / "sae_weights.safetensors"))
        (stage / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")

    return _write(ckpt, out, "saelens", force, fill)


def export_sparsify(ckpt: Checkpoint, out: str | os.PathLike, force: bool = False) -> Path:
    """sparsify layout: ``<out>/<hookpoint>/cfg.json`` + ``sae.safetensors`` with
    ``encoder.weight`` [N, D], ``encoder.bias`` [N], ``W_dec`` [N, D], ``b_dec`` [D].
    The hookpoint is the hook recorded in the checkpoint's cfg.json, refused unless it is one
    plain folder name."""
    out = Path(out)
    c = ckpt.cfg
    m = ckpt.model.cfg
    if m.kind not in ("topk", "dl"):
        raise UserError(f"sparsify has no {m.kind} architecture; export it with --format saelens")
    t = raw_space_tensors(ckpt)
    act = c.get("activations")
    hook = (act.get("hook") if isinstance(act, dict) else None) or "layer"
    hook = folder_name(hook, f"hook name in {ckpt.path / 'cfg.json'}")
    cfg = {
        "activation": "topk",
        "expansion_factor": max(ckpt.d_sae // ckpt.d_in, 1),
        "normalize_decoder": False,
        "num_latents": ckpt.d_sae,
        "k": m.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": ckpt.d_in,
        "isae_signed": m.signed,
    }

    def fill(stage: Path) -> None:
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

    return _write(ckpt, out, "sparsify", force, fill)
