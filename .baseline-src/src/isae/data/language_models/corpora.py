"""Text corpora: ordered streams of documents, with their provenance.

``pydoc`` (CPython's ``pydoc_data.topics``, one document per topic, in sorted topic order),
``stdlib`` (the running interpreter's standard-library ``.py`` files, tests excluded, one
document per file, sorted by relative path; see ``stdlib_files``), a text file (documents
separated by blank lines), a folder (one file per document, sorted by relative path), or a
Hugging Face dataset in the local cache (``NAME``, ``NAME:SPLIT`` or ``NAME:CONFIG:SPLIT``;
one row of column ``text`` per document, streamed). A document's id is its index in that
order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isae.errors import UserError

log = logging.getLogger(__name__)


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
