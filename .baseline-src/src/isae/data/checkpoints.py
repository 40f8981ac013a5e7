"""Checkpoint folders: ``sae.safetensors`` (SAELens tensor layout) + ``cfg.json``.

``load`` also reads SAELens's and sparsify's own folders (``isae.data.foreign``), so every
command that takes a checkpoint takes theirs. A finished checkpoint is staged under a temporary name and renamed into place, so a folder
named like a checkpoint is always complete. Resume state lives elsewhere (isae.training.trainer).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from isae.data import foreign
from isae.data.activations import Normalizer
from isae.data.atomic import check_out, publish, staging_folder, write_json_atomic
from isae.data.json_files import read_json_object
from isae.errors import UserError
from isae.models.compute import select_ops
from isae.models.config import SAEConfig
from isae.models.foreign import ForeignCoder
from isae.models.sparse_coder import Codes, SparseCoder

FORMAT_VERSION = 1
TENSORS = "sae.safetensors"
CFG = "cfg.json"
#: Written by the trainer beside the two: the training log, and the initial decoder (how far
#: each atom moved from where the seed put it is a convergence control).
TRAIN_LOG = "train_log.parquet"
INIT_FILE = "init.safetensors"
#: The tensors of sae.safetensors (SAELens's names and shapes).
CHECKPOINT_TENSORS = ("W_dec", "W_enc", "b_enc", "b_dec")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its normalisation and its cfg.json (for a SAELens or
    sparsify folder: a ForeignCoder, the identity normalisation and a cfg made from theirs)."""

    model: SparseCoder | ForeignCoder
    norm: Normalizer
    cfg: dict
    path: Path

    @property
    def d_in(self) -> int:
        return self.model.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.model.cfg.d_sae

    @property
    def W_dec(self) -> torch.Tensor:
        """[N, D] unit-norm decoder rows."""
        return self.model.W_dec.detach()

    @torch.no_grad()
    def encode_raw(self, x: np.ndarray | torch.Tensor, batch_size: int = 8192) -> Codes:
        """Raw activations [B, D] -> Codes (on the model's device), in batches."""
        vals, idxs = [], []
        for xb in _batches(x, batch_size, self.model.device):
            c = self.model.encode(self.normalize(xb))
            vals.append(c.val)
            idxs.append(c.idx)
        # A foreign ReLU / JumpReLU coder's width is each batch's largest L0: pad with
        # value-0 slots, which every reader of codes treats as inactive.
        width = max((v.shape[1] for v in vals), default=0)
        vals = [F.pad(v, (0, width - v.shape[1])) for v in vals]
        idxs = [F.pad(i, (0, width - i.shape[1])) for i in idxs]
        return Codes(torch.cat(vals), torch.cat(idxs))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [B, D] (on the model's device) -> the model's normalised space."""
        return self.norm.forward(x)

    @torch.no_grad()
    def reconstruct_raw(self, x: np.ndarray | torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Raw activations [B, D] -> raw reconstructions [B, D]."""
        out = []
        for xb in _batches(x, batch_size, self.model.device):
            x_hat = self.model.decode(self.model.encode(self.normalize(xb)))
            out.append(self.norm.inverse(x_hat))
        return torch.cat(out)


def _batches(x, batch_size: int, device):
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size].to(device=device, dtype=torch.float32)


def save(
    model: SparseCoder,
    out: str | os.PathLike,
    norm: Normalizer,
    extra: dict | None = None,
    files: dict[str, bytes] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> Path:
    """Write a checkpoint folder atomically. ``files``: further files (e.g. train_log).

    An existing ``out`` is replaced only if it is a checkpoint, or with ``force``; never one
    of the ``inputs`` (see isae.data.atomic.check_out).
    """
    out = Path(out)
    check_out(out, "checkpoint", inputs=inputs, force=force)
    stage = staging_folder(out)
    try:
        save_file(model.export_tensors(), str(stage / TENSORS))
        cfg = {
            "version": FORMAT_VERSION,
            **model.cfg.to_dict(),
            "normalization": {"mean": [float(v) for v in norm.mean], "scale": float(norm.scale)},
            **(extra or {}),
        }
        write_json_atomic(stage / CFG, cfg)
        for name, data in (files or {}).items():
            (stage / name).write_bytes(data)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def copy(src: str | os.PathLike, out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
         force: bool = False) -> Path:
    """Copy the checkpoint folder ``src`` (with its train log and initial decoder) to ``out``,
    atomically, under the same rules as ``save``."""
    src, out = Path(src), Path(out)
    read_cfg(src)
    check_out(out, "checkpoint", inputs=[*inputs, src], force=force)
    stage = staging_folder(out)
    try:
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, stage / f.name)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def read_cfg(path: str | os.PathLike) -> dict:
    """A checkpoint's cfg.json as a dict; UserError when it is missing or not a JSON object."""
    path = Path(path)
    cfg_path = path / CFG
    if not (path / TENSORS).is_file() or not cfg_path.is_file():
        raise UserError(f"{path} is not a checkpoint (needs {TENSORS} and {CFG})")
    return read_json_object(cfg_path)


def read_train_log(path: str | os.PathLike) -> pd.DataFrame:
    """A checkpoint's ``train_log.parquet`` with numeric ``step`` and ``fvu`` columns (what
    the convergence control reads); UserError naming the file when it is corrupt or another
    table."""
    file = Path(path) / TRAIN_LOG
    try:
        table = pd.read_parquet(file)
    except (OSError, ValueError, pa.ArrowException) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{file} is not a readable Parquet table ({first})") from None
    for col in ("step", "fvu"):
        if (col not in table.columns or not pd.api.types.is_numeric_dtype(table[col])
                or pd.api.types.is_bool_dtype(table[col])):
            raise UserError(f"{file} has no numeric column {col!r}: not a train log isae wrote")
    return table


def read_initial_decoder(path: str | os.PathLike) -> torch.Tensor:
    """``init.safetensors``'s W_dec (the decoder the seed drew); UserError when it is corrupt."""
    file = Path(path) / INIT_FILE
    try:
        W = load_file(str(file))["W_dec"]
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{file} is not a readable initial decoder ({first})") from None
    if W.ndim != 2 or not W.is_floating_point():
        raise UserError(f"{file}: W_dec has shape {list(W.shape)} and dtype {W.dtype}, expected "
                        "a float [d_sae, d_in] matrix")
    return W


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``sae.safetensors`` of a checkpoint folder, every tensor floating and finite;
    UserError for a truncated or corrupt file (naming it)."""
    file = Path(path) / TENSORS
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{file} is not a readable safetensors file ({first})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UserError(f"{file}: tensor {name} has dtype {t.dtype}, expected a float type")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{file}: tensor {name} holds NaN or Inf values")
    if "W_dec" not in tensors:
        raise UserError(f"{file} has no W_dec tensor")
    if tensors["W_dec"].ndim != 2 or 0 in tensors["W_dec"].shape:
        raise UserError(f"{file}: W_dec has shape {list(tensors['W_dec'].shape)}, expected [d_sae, d_in]")
    return tensors


def _check_shapes(file: Path, tensors: dict[str, torch.Tensor], n: int, d: int) -> None:
    want = {"W_dec": (n, d), "W_enc": (d, n), "b_enc": (n,), "b_dec": (d,)}
    for name, shape in want.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise UserError(f"{file}: {name} has shape {list(tensors[name].shape)}, "
                            f"expected {list(shape)} for W_dec of shape [{n}, {d}]")


def check_tensors_match(cfg: SAEConfig, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """UserError where ``sae.safetensors`` holds what ``cfg`` says the model has not, or
    lacks what it needs: a tensor isae does not know, a W_enc other than W_dec transposed
    for a tied (or dl) model, non-zero biases for ``bias: none`` (or dl), a missing W_enc
    or bias that the model learns. Loading would otherwise drop or invent weights silently."""
    unknown = sorted(set(tensors) - set(CHECKPOINT_TENSORS))
    if unknown:
        raise UserError(f"{file} holds tensor(s) {', '.join(unknown)} that an isae checkpoint "
                        f"does not have (only {', '.join(CHECKPOINT_TENSORS)})")
    what = f"arch {cfg.arch!r} ({'dl' if cfg.kind == 'dl' else 'tied'})"
    W_dec = tensors["W_dec"].float()
    if cfg.tied or cfg.kind == "dl":
        W_enc = tensors.get("W_enc")
        if W_enc is not None and not torch.allclose(W_enc.float(), W_dec.T, rtol=1e-5, atol=1e-6):
            diff = float((W_enc.float() - W_dec.T).abs().max())
            raise UserError(f"{file}: W_enc is not W_dec transposed (largest difference {diff:.3g}) "
                            f"but the cfg says {what}, whose encoder is W_dec transposed; "
                            "loading it would drop W_enc")
    elif "W_enc" not in tensors:
        raise UserError(f"{file} has no W_enc, which the untied arch {cfg.arch!r} needs")
    no_bias = cfg.bias == "none" or cfg.kind == "dl"
    for name in ("b_enc", "b_dec"):
        b = tensors.get(name)
        if b is None and not no_bias:
            raise UserError(f"{file} has no {name}, which arch {cfg.arch!r} (bias learned) needs")
        if b is not None and no_bias and bool((b != 0).any()):
            raise UserError(f"{file}: {name} is not zero (largest |value| "
                            f"{float(b.abs().max()):.3g}) but the cfg says bias none")


def read_normalizer(cfg: dict, d: int, where: Path) -> Normalizer:
    """The ``normalization`` entry of a cfg.json (mean: d finite numbers, scale: finite and
    positive); the identity when there is none."""
    nz = cfg.get("normalization")
    if nz is None:
        return Normalizer(mean=np.zeros(d, np.float32), scale=1.0)
    if not isinstance(nz, dict):
        raise UserError(f"{where}: normalization must be an object with mean and scale")
    mean = nz.get("mean", [0.0] * d)
    if not isinstance(mean, list) or len(mean) != d:
        n = len(mean) if isinstance(mean, list) else type(mean).__name__
        raise UserError(f"{where}: normalization mean must be a list of d_in={d} numbers, got {n}")
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in mean):
        raise UserError(f"{where}: normalization mean must hold numbers only")
    try:
        mean_arr = np.asarray(mean, np.float64)
    except OverflowError:
        raise UserError(f"{where}: normalization mean holds a number too large") from None
    # float32 is what the model uses; a value beyond its range would become Inf there.
    if not np.isfinite(mean_arr).all() or np.abs(mean_arr).max(initial=0) > 1e30:
        raise UserError(f"{where}: normalization mean holds non-finite or huge values")
    scale = nz.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise UserError(f"{where}: normalization scale must be a number, not {scale!r}")
    try:
        scale = float(scale)
    except OverflowError:
        scale = math.inf
    if not (math.isfinite(scale) and 1e-30 < scale < 1e30):
        raise UserError(f"{where}: normalization scale must be a positive finite number, got {scale}")
    return Normalizer(mean=mean_arr.astype(np.float32), scale=scale)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder (also a synthetic set's ``truth/``, encoded by OMP), or a
    SAELens or sparsify folder.

    Everything read is checked (cfg fields' types and bounds, tensor shapes, finite values,
    the normalisation), so a corrupt or hand-edited checkpoint fails with one UserError
    naming the file instead of failing later, or running for ever.
    """
    from isae.models.config import check_device

    path = Path(path)
    if not isinstance(device, torch.device):
        check_device(device)
    if foreign.detect(path) != "isae":
        return load_foreign(path, device)
    cfg = read_cfg(path)
    tensors = read_tensors(path)
    n, d = tensors["W_dec"].shape
    cfg_path = path / CFG
    # The arch name decides the kind and switches (SAEConfig derives them and refuses a
    # cfg.json whose fields contradict it).
    fields = dict(cfg)
    fields.setdefault("d_in", d)
    fields.setdefault("d_sae", n)
    if "k" not in fields:  # no default here: a checkpoint says what it was trained with
        raise UserError(f"{cfg_path} lacks the required key 'k'")
    version = cfg.get("version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"{cfg_path}: format version {version!r} is not one this isae reads "
                        f"(1 to {FORMAT_VERSION})")
    try:
        sae_cfg = SAEConfig.from_dict(fields)
    except UserError as e:
        raise UserError(f"{cfg_path}: {e}") from None
    if (sae_cfg.d_sae, sae_cfg.d_in) != (n, d):
        raise UserError(f"{path}: cfg.json says {sae_cfg.d_sae}x{sae_cfg.d_in}, tensors {n}x{d}")
    _check_shapes(path / TENSORS, tensors, n, d)
    check_tensors_match(sae_cfg, tensors, path / TENSORS)
    if "activations" in cfg and not isinstance(cfg["activations"], dict):
        raise UserError(f"{cfg_path}: activations must be an object")
    norm = read_normalizer(cfg, d, cfg_path)
    model = SparseCoder(sae_cfg, device=device, ops=select_ops(device))
    # What is absent is what the cfg says is absent (check_tensors_match).
    zeros = {"W_enc": tensors["W_dec"].T, "b_enc": torch.zeros(n), "b_dec": torch.zeros(d)}
    model.load_exported({k: tensors.get(k, zeros.get(k)) for k in CHECKPOINT_TENSORS})
    model.eval()
    return Checkpoint(model=model, norm=norm, cfg=cfg, path=path)


def load_foreign(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A SAELens or sparsify folder as a Checkpoint with the identity normalisation."""
    model, cfg = _read_foreign(Path(path))
    d = model.cfg.d_in
    norm = Normalizer(mean=np.zeros(d, np.float32), scale=1.0)
    return Checkpoint(model=model.to(device).eval(), norm=norm, cfg=cfg, path=Path(path))


def _read_foreign(path: Path):
    """foreign.read, with what its parsers raise on a corrupt file (a truncated safetensors,
    a cfg field of the wrong type) and non-finite weights turned into one UserError."""
    try:
        model, cfg = foreign.read(path)
    except UserError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, AttributeError,
            RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a readable SAELens or sparsify checkpoint ({first})") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: tensor {name} holds NaN or Inf values")
    return model, cfg


def load_decoder(path: str | os.PathLike) -> torch.Tensor:
    """Just W_dec [N, D] (float32, CPU, unit rows): what matching needs."""
    path = Path(path)
    if foreign.detect(path) != "isae":
        return _read_foreign(path)[0].W_dec
    read_cfg(path)
    return read_tensors(path)["W_dec"].float()
