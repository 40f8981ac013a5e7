"""Language models and text, shared by the ``lm`` activation source and downstream fidelity.

Four jobs, one module each:

* ``model``    — resolving a model name to weights, booting it with transformer-lens, and
  its hooks (``boot``, ``resolve_model``, ``check_hook``, ``model_kind``);
* ``corpora``  — the text sources: ordered documents with their provenance
  (``open_text``: pydoc, stdlib, a file, a folder, a cached Hugging Face dataset);
* ``chunking`` — documents -> tokens -> framed, padded contexts (``framing``,
  ``chunk_documents``, ``batches``);
* ``capture``  — activations at a hook for the content positions of a batch (``capture``).

The names below are re-exported, so ``from isae.data import language_models as lm`` reads
``lm.boot``, ``lm.open_text``, ``lm.batches`` and ``lm.capture`` as one namespace.
"""

from isae.data.language_models.capture import capture, stop_after
from isae.data.language_models.chunking import (
    Batch,
    Chunk,
    Framing,
    batches,
    check_context,
    chunk_documents,
    count_tokens,
    frame,
    framing,
    tokenize,
    tokenize_documents,
)
from isae.data.language_models.corpora import (
    STDLIB_FILE_LIST,
    STDLIB_SKIP_DIRS,
    TextSource,
    open_stdlib,
    open_text,
    stdlib_files,
    stdlib_root,
)
from isae.data.language_models.model import (
    MINILM_ALIAS,
    WEIGHT_PATTERNS,
    LoadedModel,
    boot,
    check_hook,
    final_hook,
    hook_names,
    load_tokenizer,
    minilm_path,
    model_kind,
    resolve_hook,
    resolve_model,
)

__all__ = [
    "MINILM_ALIAS", "STDLIB_FILE_LIST", "STDLIB_SKIP_DIRS", "WEIGHT_PATTERNS", "Batch",
    "Chunk", "Framing", "LoadedModel", "TextSource", "batches", "boot", "capture",
    "check_context", "check_hook", "chunk_documents", "count_tokens", "final_hook", "frame",
    "framing", "hook_names", "load_tokenizer", "minilm_path", "model_kind", "open_stdlib",
    "open_text", "resolve_hook", "resolve_model", "stdlib_files", "stdlib_root",
    "stop_after", "tokenize", "tokenize_documents",
]
