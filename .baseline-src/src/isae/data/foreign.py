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
skip connections, per-row normalisation of the input) is refused with the reason, and so is
a folder whose cfg.json contradicts its tensors (shapes, a non-integer k) or that holds a
tensor this reader does not know: nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
from numbers import Integral
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from isae.data.json_files import read_json
from isae.errors import UserError
from isae.models.foreign import ForeignCoder, ForeignConfig

CFG = "cfg.json"
ISAE_TENSORS = "sae.safetensors"
SAELENS_TENSORS = "sae_weights.safetensors"
SPARSIFY_TENSORS = "sae.safetensors"

log = logging.getLogger(__name__)

#: SAELens architecture -> ForeignCoder activation.
SAELENS_ARCHS = {"standard": "relu", "topk": "topk", "abstopk": "abstopk", "jumprelu": "jumprelu"}
#: SAELens training architectures without an inference class of their own: the trainer's
#: ``save_inference_model`` writes them as a JumpReLU SAE (the batch threshold per latent).
SAELENS_TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")
#: SAELens input normalisations that are the identity at inference (the second is folded
#: into the weights when SAELens saves a trained SAE).
SAELENS_IDENTITY_NORMS = ("none", "expected_average_only_in")
#: The tensors of a SAELens folder this reader understands (``threshold`` / its log for
#: JumpReLU; ``scaling_factor``, SAELens < 6's per-latent factor on the codes before decoding).
SAELENS_TENSOR_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "log_threshold",
                        "scaling_factor")
#: The tensors of a sparsify folder (no skip connection).
SPARSIFY_TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

LAYOUTS = "an isae checkpoint (cfg.json + sae.safetensors), a SAELens folder (cfg.json + " \
    "sae_weights.safetensors) or a sparsify folder (cfg.json + sae.safetensors)"


def _json(path: Path) -> dict:
    cfg = read_json(path)
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


def _only(tensors: dict, known: tuple[str, ...], where: Path, what: str) -> None:
    """UserError for a tensor this reader does not know: what it does is unknown, so
    reading the folder without it could compute something else than the library."""
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise UserError(f"{where} holds tensor(s) {', '.join(unknown)} that isae does not "
                        f"know for {what} (known: {', '.join(known)}); refusing rather than "
                        "ignoring them")


def _integer_k(k, where: Path) -> int:
    """``k`` read from a cfg.json: an integer (bools and 2.7 refused, not rounded)."""
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise UserError(f"{where}: k must be an integer, not {k!r}")
    return int(k)


def _cfg_size(raw: dict, key: str, found: int, where: Path) -> None:
    """UserError when cfg.json states a dimension that the tensors do not have."""
    v = raw.get(key)
    if v is not None and (isinstance(v, bool) or v != found):
        raise UserError(f"{where}: cfg.json says {key} {v!r} but the tensors have {found}")


def _apply_scaling_factor(t: dict, raw: dict, where: Path) -> None:
    """SAELens < 6's ``scaling_factor`` [d_sae]: its forward multiplied the codes by it
    before the decoder when ``finetuning_scaling_factor`` was set, which is the same as
    scaling the decoder rows (done here, in place). All ones is dropped, as SAELens 6 does;
    other values without the flag are refused, as SAELens 6 refuses them."""
    sf = t.pop("scaling_factor", None)
    if sf is None or bool(torch.all(sf == 1)):
        return
    if not raw.get("finetuning_scaling_factor"):
        raise UserError(f"{where}: tensor scaling_factor is not all ones but cfg.json does not "
                        "set finetuning_scaling_factor, so what it scales is unknown (SAELens 6 "
                        "refuses such a folder too)")
    if tuple(sf.shape) != (t["W_dec"].shape[0],):
        raise UserError(f"{where}: scaling_factor has shape {list(sf.shape)}, expected "
                        f"[{t['W_dec'].shape[0]}] (one factor per latent)")
    t["W_dec"] = t["W_dec"] * sf[:, None]


def read_saelens(path: str | os.PathLike) -> tuple[ForeignCoder, dict]:
    """A SAELens folder -> (its forward pass, the isae-style cfg describing it)."""
    path = Path(path)
    raw = _json(path / CFG)
    s = saelens_settings(raw)
    arch = s["architecture"]
    if arch in SAELENS_TRAINING_ONLY:
        raise UserError(f"{path}: SAELens architecture {arch!r} is a training folder (the "
                        "trainer's save_model); save it with the training SAE's "
                        "save_inference_model, which writes the JumpReLU SAE it runs as at "
                        "inference, and read that folder")
    if arch not in SAELENS_ARCHS:
        raise UserError(f"{path}: SAELens architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SAELENS_ARCHS)})")
    norm = s["normalize_activations"]
    if norm == "covariance_whitening":
        raise UserError(f"{path}: normalize_activations 'covariance_whitening': SAELens's forward "
                        "pass applies no whitening at inference (it is the identity there), so "
                        "these weights see raw inputs only once the trainer has folded the "
                        "whitening into them, which sets normalize_activations to 'none'; this "
                        "folder was saved before that")
    if norm not in SAELENS_IDENTITY_NORMS:
        raise UserError(f"{path}: normalize_activations {norm!r} rescales each input row inside "
                        "the SAE; only 'none' is supported")
    t = load_file(str(path / SAELENS_TENSORS))
    _only(t, SAELENS_TENSOR_NAMES if arch == "jumprelu" else
          ("W_enc", "W_dec", "b_enc", "b_dec", "scaling_factor"), path / SAELENS_TENSORS,
          f"a SAELens {arch} SAE")
    if "threshold" in t and "log_threshold" in t:
        raise UserError(f"{path / SAELENS_TENSORS} holds both threshold and log_threshold")
    if "log_threshold" in t:
        t["threshold"] = torch.exp(t.pop("log_threshold"))
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if arch == "jumprelu" else ()),
          path / SAELENS_TENSORS)
    t = {k: v.float() for k, v in t.items()}
    if t["W_enc"].ndim != 2 or t["W_dec"].ndim != 2:
        raise UserError(f"{path}: W_enc and W_dec must be matrices")
    _apply_scaling_factor(t, raw, path)
    W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    d_in, d_sae = W_enc.shape
    _cfg_size(raw, "d_in", d_in, path / CFG)
    _cfg_size(raw, "d_sae", d_sae, path / CFG)
    if arch in ("topk", "abstopk") and s["rescale_acts_by_decoder_norm"]:
        # Selection on pre * ||W_dec row||, decode with unit rows: the norms fold into the
        # encoder exactly (what SAELens does itself when it saves a trained TopK SAE).
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n[None, :], b_enc * n, W_dec / n[:, None]
    k = s["k"]
    if arch in ("topk", "abstopk"):
        if k is None:
            raise UserError(f"{path / CFG}: a SAELens {arch} SAE needs k")
        k = _integer_k(k, path / CFG)
    try:
        fc = ForeignConfig(d_in=d_in, d_sae=d_sae, activation=SAELENS_ARCHS[arch],
                           k=k if arch in ("topk", "abstopk") else None,
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
    _only(t, SPARSIFY_TENSOR_NAMES, path / SPARSIFY_TENSORS, "a sparsify SparseCoder")
    _need(t, SPARSIFY_TENSOR_NAMES, path / SPARSIFY_TENSORS)
    t = {k: v.float() for k, v in t.items()}
    if t["encoder.weight"].ndim != 2:
        raise UserError(f"{path}: encoder.weight must be a matrix")
    d_sae, d_in = t["encoder.weight"].shape
    _cfg_size(raw, "d_in", d_in, path / CFG)
    # sparsify's width: num_latents, or expansion_factor * d_in when num_latents is 0
    if raw.get("num_latents"):
        _cfg_size(raw, "num_latents", d_sae, path / CFG)
    elif isinstance(raw.get("expansion_factor"), int) and raw["expansion_factor"] * d_in != d_sae:
        raise UserError(f"{path / CFG}: expansion_factor {raw['expansion_factor']} x d_in {d_in} "
                        f"is {raw['expansion_factor'] * d_in} latents, but the tensors have {d_sae}")
    k = _integer_k(raw.get("k", 32), path / CFG)
    if raw.get("multi_topk"):
        log.warning("%s: multi_topk is set: sparsify's own forward() then returns the "
                    "reconstruction from the top 4k = %d latents (its Multi-TopK loss), while "
                    "encode() keeps k = %d; isae evaluates the k-sparse code, as sparsify's "
                    "own fvu does", path, 4 * k, k)
    try:
        fc = ForeignConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k)
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


def library_of(obj) -> str | None:
    """``saelens`` for a ``sae_lens`` SAE object, ``sparsify`` for a sparsify SparseCoder,
    None for anything else (told apart by module and save method: neither library is
    imported here)."""
    module = type(obj).__module__.split(".")[0]
    if module == "sae_lens" and callable(getattr(obj, "save_model", None)):
        return "saelens"
    if module == "sparsify" and callable(getattr(obj, "save_to_disk", None)):
        return "sparsify"
    return None


def save_library_object(obj, folder: str | os.PathLike) -> str:
    """Write a library's SAE object into ``folder`` with the library's own save function
    (a SAELens training SAE through ``save_inference_model``, the SAE it runs as at
    inference), so that ``read`` sees exactly what the library would write; -> the format.
    UserError for an object of neither library."""
    lib = library_of(obj)
    if lib == "saelens":
        save = getattr(obj, "save_inference_model", None) or obj.save_model
        save(str(folder))
    elif lib == "sparsify":
        obj.save_to_disk(folder)
    else:
        raise UserError(f"{type(obj).__module__}.{type(obj).__qualname__} is not an SAE isae "
                        "reads: pass an isae.SAE, a checkpoint folder, a sae_lens SAE or a "
                        "sparsify SparseCoder")
    return lib


def read(path: str | os.PathLike) -> tuple[ForeignCoder, dict]:
    """A SAELens or sparsify folder -> (its forward pass, cfg)."""
    fmt = detect(path)
    if fmt == "saelens":
        return read_saelens(path)
    if fmt == "sparsify":
        return read_sparsify(path)
    raise UserError(f"{path} is an isae checkpoint, not a foreign one")
