"""Checkpoint folders: ``sae.safetensors`` (SAELens tensor layout) + ``cfg.json``.

``load`` also reads SAELens's and sparsify's own folders (``isae.data.foreign``), so every
command that takes a checkpoint takes theirs. A finished checkpoint is staged under a temporary name and renamed into place, so a folder
named like a checkpoint is always complete. Resume state lives elsewhere (isae.training.trainer).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from isae.data import foreign
from isae.data.activations import Normalizer
from isae.data.atomic import writable_parent, write_json_atomic
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
        mean = torch.as_tensor(self.norm.mean, device=x.device)
        return (x - mean) / self.norm.scale

    @torch.no_grad()
    def reconstruct_raw(self, x: np.ndarray | torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Raw activations [B, D] -> raw reconstructions [B, D]."""
        mean = torch.as_tensor(self.norm.mean, device=self.model.device)
        out = []
        for xb in _batches(x, batch_size, self.model.device):
            x_hat = self.model.decode(self.model.encode(self.normalize(xb)))
            out.append(x_hat * self.norm.scale + mean)
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
) -> Path:
    """Write a checkpoint folder atomically. ``files``: further files (e.g. train_log)."""
    out = Path(out)
    writable_parent(out)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def read_cfg(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_path = path / CFG
    if not (path / TENSORS).is_file() or not cfg_path.is_file():
        raise UserError(f"{path} is not a checkpoint (needs {TENSORS} and {CFG})")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e.msg}") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder (also a synthetic set's ``truth/``, encoded by OMP), or a
    SAELens or sparsify folder."""
    path = Path(path)
    if foreign.detect(path) != "isae":
        return load_foreign(path, device)
    cfg = read_cfg(path)
    tensors = load_file(str(path / TENSORS))
    if "W_dec" not in tensors:
        raise UserError(f"{path / TENSORS} has no W_dec tensor")
    n, d = tensors["W_dec"].shape
    fields = dict(cfg)
    fields.setdefault("d_in", d)
    fields.setdefault("d_sae", n)
    if fields.get("arch") == "truth":
        fields.update(kind="dl", signed=True, tied=True, bias="none", encoder_steps=0)
    if (fields["d_sae"], fields["d_in"]) != (n, d):
        raise UserError(f"{path}: cfg.json says {fields['d_sae']}x{fields['d_in']}, tensors {n}x{d}")
    if "k" not in fields:  # no default here: a checkpoint says what it was trained with
        raise UserError(f"{path / CFG} has no k")
    sae_cfg = SAEConfig.from_dict(fields)
    model = SparseCoder(sae_cfg, device=device, ops=select_ops(device))
    zeros = {"W_enc": tensors["W_dec"].T, "b_enc": torch.zeros(n), "b_dec": torch.zeros(d)}
    model.load_exported({k: tensors.get(k, zeros.get(k)) for k in ("W_dec", "W_enc", "b_enc", "b_dec")})
    model.eval()
    nz = cfg.get("normalization") or {}
    norm = Normalizer(
        mean=np.asarray(nz.get("mean", np.zeros(d)), np.float32), scale=float(nz.get("scale", 1.0))
    )
    return Checkpoint(model=model, norm=norm, cfg=cfg, path=path)


def load_foreign(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A SAELens or sparsify folder as a Checkpoint with the identity normalisation."""
    model, cfg = foreign.read(path)
    d = model.cfg.d_in
    norm = Normalizer(mean=np.zeros(d, np.float32), scale=1.0)
    return Checkpoint(model=model.to(device).eval(), norm=norm, cfg=cfg, path=Path(path))


def load_decoder(path: str | os.PathLike) -> torch.Tensor:
    """Just W_dec [N, D] (float32, CPU, unit rows): what matching needs."""
    path = Path(path)
    if foreign.detect(path) != "isae":
        return foreign.read(path)[0].W_dec
    read_cfg(path)
    tensors = load_file(str(path / TENSORS))
    return tensors["W_dec"].float()
