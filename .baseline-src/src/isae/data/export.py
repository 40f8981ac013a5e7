"""Write a checkpoint in SAELens's or sparsify's own folder layout (no dependency on either).

Both libraries feed *raw* activations to the SAE, so the normalisation stored in cfg.json
(x_n = (x - mean) / scale) is folded into the weights:
    W_enc' = W_enc / scale,  W_dec' = scale * W_dec,  b_dec' = scale * b_dec + mean,
which gives the same codes and raw reconstructions. The decoder rows then have norm
``scale`` instead of 1; both formats allow it.

What each library computes from the files it loads:

* SAELens: ``standard`` (ReLU), ``topk`` (ReLU-TopK) and ``abstopk`` (the k largest |pre|
  with their signs), so a ``relu``, ``topk`` or signed TopK (``isae``) checkpoint is exact;
* sparsify: ReLU-TopK only, so only ``topk`` is exact;
* neither runs iterative-thresholding steps after the encoder (``encoder_steps`` > 0, e.g.
  ``isae-iter``) or orthogonal matching pursuit (``dl``).

An export that a library would compute differently is refused (``unrepresentable`` says
why) unless asked for as lossy; ``target_coder`` is the library's forward pass on the
exported tensors in plain torch, so the loss can be measured. ``cfg.json`` carries the
checkpoint's whole cfg under ``isae`` and what the export lost under ``isae_export``.

A SAELens export also carries the metadata SAELens's own tools read: ``model_name`` and
``hook_name``, and, from the language-model activation set the checkpoint was trained on,
``context_size`` and ``prepend_bos`` (``ActivationsStore.from_sae`` refuses an SAE without
them) and ``disable_concat_sequences`` (an isae context holds one document).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from isae.data.atomic import check_out, publish, staging_folder
from isae.data.checkpoints import Checkpoint
from isae.errors import UserError
from isae.models.foreign import ForeignCoder, ForeignConfig
from isae.models.sparse_coder import SparseCoder

log = logging.getLogger(__name__)

FORMATS = ("saelens", "sparsify")
LIBRARY = {"saelens": "SAELens", "sparsify": "sparsify"}


# ----------------------------------------------------------------------------- what survives


def saelens_architecture(ckpt: Checkpoint) -> str:
    """The SAELens architecture whose forward pass is this checkpoint's amortised encoder."""
    c = ckpt.model.cfg
    if c.kind == "relu":
        return "standard"
    return "abstopk" if c.signed else "topk"


def unrepresentable(ckpt: Checkpoint, fmt: str) -> list[str]:
    """Why ``fmt``'s library would not compute what this checkpoint computes: one reason per
    lost feature, empty when the export is exact."""
    c = ckpt.model.cfg
    lib = LIBRARY[fmt]
    why = []
    if c.kind == "dl":
        why.append(f"dl codes come from orthogonal matching pursuit, which {lib} does not run "
                   "(its encoder would be W_dec transposed)")
    if c.encoder_steps > 0:
        why.append(f"the encoder refines its TopK codes with {c.encoder_steps} "
                   f"iterative-thresholding steps, which {lib} does not run")
    if fmt == "sparsify" and c.signed:
        why.append("the codes are signed; sparsify applies ReLU before TopK, so every negative "
                   "code would become 0 (SAELens's abstopk keeps them: --format saelens)")
    return why


def check_exportable(ckpt: Checkpoint, fmt: str) -> None:
    """UserError for what no export can do, lossy or not."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not isinstance(ckpt.model, SparseCoder):
        raise UserError(f"{ckpt.path} is already a {ckpt.cfg['source']['format']} folder; "
                        "isae export takes an isae checkpoint")
    if fmt == "sparsify" and ckpt.model.cfg.kind == "relu":
        raise UserError("sparsify has no relu architecture (a ReLU SAE has no k for its TopK); "
                        "export it with --format saelens")


def target_coder(ckpt: Checkpoint, fmt: str) -> ForeignCoder:
    """What ``fmt``'s library computes from the exported tensors, as a ForeignCoder on raw
    activations."""
    check_exportable(ckpt, fmt)
    t = raw_space_tensors(ckpt)
    act = "topk"
    if fmt == "saelens":
        act = {"standard": "relu", "topk": "topk", "abstopk": "abstopk"}[saelens_architecture(ckpt)]
    c = ckpt.model.cfg
    fc = ForeignConfig(d_in=c.d_in, d_sae=c.d_sae, activation=act,
                       k=None if act == "relu" else c.k)
    return ForeignCoder(fc, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"])


def export_record(ckpt: Checkpoint, fmt: str) -> dict:
    """The cfg.json entries that keep every isae setting: ``isae`` (the checkpoint's cfg)
    and ``isae_export`` (what the target computes differently, empty when exact)."""
    lost = unrepresentable(ckpt, fmt)
    return {"isae": ckpt.cfg, "isae_export": {"format": fmt, "exact": not lost, "lost": lost}}


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


def trained_on(ckpt: Checkpoint, meta: dict | None = None) -> dict | None:
    """The meta.json of the activation set ``ckpt`` was trained on: ``meta`` (a set the
    caller names) or the set at the path its cfg.json records, when it is still there;
    None when neither is known, or when the set's model or hook is not the checkpoint's
    (its framing would describe other activations)."""
    act = ckpt.cfg.get("activations") if isinstance(ckpt.cfg.get("activations"), dict) else {}
    if meta is None:
        recorded = act.get("path")
        if not isinstance(recorded, str) or not (Path(recorded) / "meta.json").is_file():
            return None
        try:
            meta = json.loads((Path(recorded) / "meta.json").read_text())
        except (OSError, ValueError, RecursionError):
            return None
    if not isinstance(meta, dict):
        return None
    for key in ("model", "hook"):
        if act.get(key) is not None and meta.get(key) is not None and act[key] != meta[key]:
            log.warning("the activation set's %s %r is not the checkpoint's %r: its framing is "
                        "not written into the export", key, meta[key], act[key])
            return None
    return meta


def saelens_metadata(ckpt: Checkpoint, set_meta: dict | None = None) -> dict:
    """cfg.json ``metadata`` for SAELens: the names the checkpoint records, and the framing
    of the language-model set it was trained on (``trained_on``): ``context_size`` (tokens
    per context, special tokens included), ``prepend_bos`` (the tokenizer adds a token in
    front: BOS, or BERT's [CLS]) and ``disable_concat_sequences``."""
    act = ckpt.cfg.get("activations") if isinstance(ckpt.cfg.get("activations"), dict) else {}
    meta = {k: v for k, v in (("model_name", act.get("model")), ("hook_name", act.get("hook")))
            if v is not None}
    lm = trained_on(ckpt, set_meta)
    context = (lm or {}).get("context")
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        meta.update(context_size=context, prepend_bos=bool(lm.get("special_prefix")),
                    disable_concat_sequences=True)
    elif lm is None and "hook_name" in meta:  # a set without contexts (vision) has none
        log.warning("the export names no context_size or prepend_bos (SAELens's "
                    "ActivationsStore.from_sae needs both): pass --activations with the "
                    "language-model set the checkpoint was trained on")
    return meta


def _refuse_lossy(ckpt: Checkpoint, fmt: str, lossy: bool) -> None:
    check_exportable(ckpt, fmt)
    lost = unrepresentable(ckpt, fmt)
    if lost and not lossy:
        raise UserError(f"{LIBRARY[fmt]} cannot represent {ckpt.path}: {'; '.join(lost)} "
                        "(--lossy exports anyway)")


def export_saelens(ckpt: Checkpoint, out: str | os.PathLike, lossy: bool = False,
                   force: bool = False, set_meta: dict | None = None) -> Path:
    """SAELens layout: ``sae_weights.safetensors`` + ``cfg.json``. ``architecture`` and
    ``activation_fn_str`` agree, because SAELens turns a config without a version-6 stamp
    whose activation is ``topk`` into a ``topk`` SAE whatever its architecture says.
    ``set_meta``: meta.json of the set the checkpoint was trained on (default: the set its
    cfg.json records, if it is still there), for ``saelens_metadata``. An existing ``out``
    is replaced only when it is a SAELens export already, or with ``force``."""
    _refuse_lossy(ckpt, "saelens", lossy)
    out = Path(out)
    t = raw_space_tensors(ckpt)
    m = ckpt.model.cfg  # validated at load; the raw cfg.json may lack defaulted fields
    arch = saelens_architecture(ckpt)
    cfg = {
        "architecture": arch,
        "d_in": ckpt.d_in,
        "d_sae": ckpt.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "activation_fn_str": "relu" if arch == "standard" else arch,
        "activation_fn_kwargs": {} if arch == "standard" else {"k": m.k},
        "k": None if arch == "standard" else m.k,
        "reshape_activations": "none",
        **export_record(ckpt, "saelens"),
    }
    # Names only when known: SAELens's reading of a config without a version stamp fails on
    # a null hook_name.
    meta = saelens_metadata(ckpt, set_meta)
    cfg.update({k: meta[k] for k in ("model_name", "hook_name", "context_size", "prepend_bos")
                if k in meta}, metadata=meta)

    def fill(stage: Path) -> None:
        save_file(t, str(stage / "sae_weights.safetensors"))
        (stage / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")

    return _write(ckpt, out, "saelens", force, fill)


def export_sparsify(ckpt: Checkpoint, out: str | os.PathLike, lossy: bool = False,
                    force: bool = False) -> Path:
    """sparsify layout: ``<out>/<hookpoint>/cfg.json`` + ``sae.safetensors`` with
    ``encoder.weight`` [N, D], ``encoder.bias`` [N], ``W_dec`` [N, D], ``b_dec`` [D].
    The hookpoint is the hook recorded in the checkpoint's cfg.json, refused unless it is one
    plain folder name."""
    _refuse_lossy(ckpt, "sparsify", lossy)
    out = Path(out)
    c = ckpt.cfg
    m = ckpt.model.cfg
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
        **export_record(ckpt, "sparsify"),
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
