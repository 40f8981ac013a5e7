"""Checkpoint folders written by other libraries, read without importing them.

Three layouts are told apart by their files:

* **isae** — ``cfg.json`` + ``sae.safetensors`` holding ``W_dec`` (``isae.data.checkpoints``);
* **SAELens** — ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc`` [D, N], ``W_dec`` [N, D],
  ``b_enc``, ``b_dec``, and ``threshold`` for JumpReLU), as ``SAE.save_model`` writes it;
* **sparsify** — ``cfg.json`` + ``sae.safetensors`` holding ``encoder.weight`` [N, D],
  ``encoder.bias``, ``W_dec`` [N, D], ``b_dec``, as ``SparseCoder.save_to_disk`` writes it.
  A folder of several hookpoints (one sub-folder each) must be narrowed to one:
  ``FOLDER/HOOKPOINT``.

A foreign SAE acts on raw activations, so its checkpoint gets the identity normalisation
(mean 0, scale 1): its MSE is in raw units, its FVU is comparable with any other. Its codes
are the coefficients of unit-norm atoms (``isae.models.foreign``). What a library computes
that is not an affine encoder, one nonlinearity and a linear decoder (gated SAEs, transcoders,
skip connections, per-row normalisation of the input) is refused with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from isae.errors import UserError
from isae.models.foreign import ForeignCoder, ForeignConfig

CFG = "cfg.json"
ISAE_TENSORS = "sae.safetensors"
SAELENS_TENSORS = "sae_weights.safetensors"
SPARSIFY_TENSORS = "sae.safetensors"

#: SAELens architecture -> ForeignCoder activation.
SAELENS_ARCHS = {"standard": "relu", "topk": "topk", "abstopk": "abstopk", "jumprelu": "jumprelu"}
#: SAELens input normalisations that are the identity at inference (the second is folded
#: into the weights when SAELens saves a trained SAE).
SAELENS_IDENTITY_NORMS = ("none", "expected_average_only_in")

LAYOUTS = "an isae checkpoint (cfg.json + sae.safetensors), a SAELens folder (cfg.json + " \
    "sae_weights.safetensors) or a sparsify folder (cfg.json + sae.safetensors)"


def _json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return cfg


def _tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None


def _is_sparsify_folder(path: Path) -> bool:
    return (path / CFG).is_file() and (path / SPARSIFY_TENSORS).is_file() and (
        "encoder.weight" in _tensor_names(path / SPARSIFY_TENSORS)
    )


def sparsify_hookpoints(path: Path) -> list[str]:
    """The sub-folders of ``path`` that are sparsify checkpoints (one per hookpoint)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _is_sparsify_folder(p))


def detect(path: str | os.PathLike) -> str:
    """``isae`` | ``saelens`` | ``sparsify`` for a checkpoint folder; UserError otherwise
    (a multi-hookpoint sparsify folder: the error names its hookpoints)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a checkpoint folder: it does not exist" if not path.exists()
                        else f"{path} is a file; a checkpoint is a folder ({LAYOUTS})")
    if (path / CFG).is_file() and (path / SAELENS_TENSORS).is_file():
        return "saelens"
    if (path / CFG).is_file() and (path / ISAE_TENSORS).is_file():
        names = _tensor_names(path / ISAE_TENSORS)
        if "encoder.weight" in names:
            return "sparsify"
        if "W_dec" in names:
            return "isae"
        raise UserError(f"{path / ISAE_TENSORS} has neither W_dec (isae) nor encoder.weight "
                        "(sparsify)")
    hooks = sparsify_hookpoints(path)
    if len(hooks) == 1:
        return "sparsify"
    if hooks:
        shown = ", ".join(hooks[:8]) + (", ..." if len(hooks) > 8 else "")
        raise UserError(f"{path} holds sparsify SAEs for {len(hooks)} hookpoints ({shown}); "
                        f"name one: {path / hooks[0]}")
    raise UserError(f"{path} is not a checkpoint: expected {LAYOUTS}")


# ----------------------------------------------------------------------------- SAELens


def _saelens_version_major(cfg: dict) -> int | None:
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return int(str(v).split(".")[0]) if v else None
    except ValueError:
        return None


def saelens_settings(cfg: dict) -> dict:
    """What SAELens 6 makes of a cfg.json: architecture, k, apply_b_dec_to_input,
    normalize_activations, rescale_acts_by_decoder_norm, hook and model names.

    A cfg without a version 6 ``sae_lens_version`` goes through SAELens's conversion of old
    configs, reproduced here: ``activation_fn_str`` is the activation, and an activation of
    ``topk`` with a ``k`` in ``activation_fn_kwargs`` makes the architecture ``topk`` whatever
    ``architecture`` says (why an exporter must write both fields).
    """
    meta = cfg.get("metadata") or {}
    major = _saelens_version_major(cfg)
    arch = cfg.get("architecture")
    k = cfg.get("k")
    norm = cfg.get("normalize_activations")
    if major is None or major < 6:
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        arch = arch or "standard"
        kw = cfg.get("activation_fn_kwargs") or {}
        if act == "topk" and kw.get("k") is not None:
            arch, k = "topk", kw["k"]
        if isinstance(norm, bool):
            norm = "expected_average_only_in" if norm else "none"
    if norm is None:
        norm = "none"
    return {
        "architecture": arch or "standard",
        "k": k,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": norm,
        "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        "hook": meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point"))),
        "model": meta.get("model_name", cfg.get("model_name")),
    }


def _need(tensors: dict, names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{where} lacks tensor(s) {', '.join(missing)}")


def read_saelens(path: str | os.PathLike) -> tuple[ForeignCoder, dict]:
    """A SAELens folder -> (its forward pass, the isae-style cfg describing it)."""
    path = Path(path)
    raw = _json(path / CFG)
    s = saelens_settings(raw)
    arch = s["architecture"]
    if arch not in SAELENS_ARCHS:
        raise UserError(f"{path}: SAELens architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SAELENS_ARCHS)})")
    if s["normalize_activations"] not in SAELENS_IDENTITY_NORMS:
        raise UserError(f"{path}: normalize_activations {s['normalize_activations']!r} rescales "
                        "each input row inside the SAE; only 'none' is supported")
    t = load_file(str(path / SAELENS_TENSORS))
    if "threshold" not in t and "log_threshold" in t:
        t["threshold"] = torch.exp(t.pop("log_threshold"))
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if arch == "jumprelu" else ()),
          path / SAELENS_TENSORS)
    t = {k: v.float() for k, v in t.items()}
    W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise UserError(f"{path}: W_enc and W_dec must be matrices")
    d_in, d_sae = W_enc.shape
    if arch in ("topk", "abstopk") and s["rescale_acts_by_decoder_norm"]:
        # Selection on pre * ||W_dec row||, decode with unit rows: the norms fold into the
        # encoder exactly (what SAELens does itself when it saves a trained TopK SAE).
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n[None, :], b_enc * n, W_dec / n[:, None]
    k = s["k"]
    try:
        fc = ForeignConfig(d_in=d_in, d_sae=d_sae, activation=SAELENS_ARCHS[arch],
                           k=int(k) if arch in ("topk", "abstopk") and k is not None else None,
                           center_input=s["apply_b_dec_to_input"])
        model = ForeignCoder(fc, W_enc, b_enc, W_dec, t["b_dec"], t.get("threshold"))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    cfg = _foreign_cfg("saelens", arch, fc, raw, hook=s["hook"], model=s["model"])
    return model, cfg


# ----------------------------------------------------------------------------- sparsify


def read_sparsify(path: str | os.PathLike) -> tuple[ForeignCoder, dict]:
    """A sparsify folder (one hookpoint, or a folder holding exactly one) -> (forward pass,
    isae-style cfg)."""
    path = Path(path)
    if not (path / CFG).is_file():
        hooks = sparsify_hookpoints(path)
        if len(hooks) != 1:
            detect(path)  # raises the error that names the hookpoints
        path = path / hooks[0]
    raw = _json(path / CFG)
    for flag, why in (("transcode", "a transcoder predicts another module's output"),
                      ("skip_connection", "its skip connection adds a dense linear map")):
        if raw.get(flag):
            raise UserError(f"{path}: {flag} is set: {why}; only plain autoencoders are supported")
    act = raw.get("activation", "topk")
    if act != "topk":
        raise UserError(f"{path}: sparsify activation {act!r} is not supported (only topk)")
    t = load_file(str(path / SPARSIFY_TENSORS))
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / SPARSIFY_TENSORS)
    t = {k: v.float() for k, v in t.items()}
    d_sae, d_in = t["encoder.weight"].shape
    try:
        fc = ForeignConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=int(raw.get("k", 32)))
        model = ForeignCoder(fc, t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"])
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    cfg = _foreign_cfg("sparsify", "topk", fc, raw, hook=path.name, model=None)
    return model, cfg


# ----------------------------------------------------------------------------- both


def _foreign_cfg(fmt: str, arch: str, fc: ForeignConfig, raw: dict, hook, model) -> dict:
    """The cfg.json-like dict a foreign checkpoint is described by (``describe``, tables)."""
    return {
        "d_in": fc.d_in,
        "d_sae": fc.d_sae,
        "k": fc.k,
        "arch": f"{fmt}:{arch}",
        # A folder that isae exported carries its own cfg: its seed names the run.
        "seed": (raw.get("isae") or {}).get("seed"),
        "tokens_seen": (raw.get("isae") or {}).get("tokens_seen"),
        "activations": {"model": model, "hook": hook},
        "source": {"format": fmt, "architecture": arch, "cfg": raw},
    }


def read(path: str | os.PathLike) -> tuple[ForeignCoder, dict]:
    """A SAELens or sparsify folder -> (its forward pass, cfg)."""
    fmt = detect(path)
    if fmt == "saelens":
        return read_saelens(path)
    if fmt == "sparsify":
        return read_sparsify(path)
    raise UserError(f"{path} is an isae checkpoint, not a foreign one")
