"""``isae extract lm``: activations of a language model at one hook, over a text source.

One row per content token (special tokens and padding dropped), with provenance columns
``doc``, ``pos`` (index in the document's token stream) and ``token_id``; held out by document
through ``activations.heldout_mask``. Model booting, text sources and the cutting of documents
into contexts live in ``isae.data.language_models`` (shared with downstream fidelity).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from isae.data import language_models as lm
from isae.data.activations import ActivationWriter, heldout_mask
from isae.data.atomic import write_json_atomic
from isae.data.sources import check_extract_out, check_layout, local_inputs, package_versions
from isae.errors import UserError
from isae.progress import progress

log = logging.getLogger(__name__)

MAX_DOC_NAMES = 100_000  # list document names in meta.json for local sources up to this many


def extract(
    out: str,
    model: str,
    hook: str,
    text: str = "pydoc",
    context: int = 128,
    max_tokens: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
    heldout_fraction: float = 0.1,
    rows_per_shard: int = 16384,
    dtype: str = "float32",
    force: bool = False,
) -> dict:
    """Write the activation set of ``model`` at ``hook`` over ``text`` to ``out``.

    An existing ``out`` is replaced only if it is an activation set, or with ``force``;
    never the text or model folder. Returns the one-line summary (rows, tokens, documents,
    d, seconds, tokens/s).
    """
    if context < 2:
        raise UserError(f"--context must be at least 2, not {context}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, not {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, not {max_tokens}")
    check_layout(heldout_fraction, rows_per_shard, seed)
    inputs = local_inputs(text, model)
    check_extract_out(out, inputs, force)

    source = lm.open_text(text)  # before booting: a bad text source fails in milliseconds
    if source.local and not source.documents:
        raise UserError(f"text source {text!r} is empty: no documents with text")
    loaded = lm.boot(model, device=device)
    bridge = loaded.bridge
    native = lm.check_hook(bridge, hook, model=f"model {model!r}")
    fr = lm.framing(loaded.tokenizer)
    content_len = lm.check_context(context, fr, loaded.n_ctx)

    tokenized = lm.tokenize_documents(loaded.tokenizer, source.documents)
    total = max_tokens
    if source.local:
        tokenized = list(tokenized)
        total = lm.count_tokens(tokenized, max_tokens)
        if total == 0:
            raise UserError(f"text source {text!r} is empty: it tokenises to no tokens")
    chunks = lm.chunk_documents(tokenized, content_len, max_tokens)

    meta = {
        "model": model,
        "model_path": loaded.path,
        "architecture": bridge.cfg.architecture,
        "model_kind": loaded.kind,
        "hook": hook,
        "text": text,
        "text_source": source.meta,
        "context": context,
        "content_per_context": content_len,
        "special_prefix": list(fr.prefix),
        "special_suffix": list(fr.suffix),
        "partial_contexts": "kept: a document's last chunk is right-padded and masked",
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "versions": package_versions("isae", "torch", "transformer_lens", "transformers", "tokenizers"),
    }
    heldout = {"by": "doc", "fraction": heldout_fraction, "seed": seed}

    t0 = time.perf_counter()
    tokens = 0
    docs_seen: list[int] = []
    writer: ActivationWriter | None = None
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress(total, desc=f"extract {hook}", unit="tok"))
        for batch in lm.batches(chunks, fr, context, batch_size):
            rows = lm.capture(bridge, batch.to(device), native).float().cpu().numpy()
            if writer is None:
                # d is known after the first forward pass (per-head hooks are flattened).
                writer = stack.enter_context(ActivationWriter(
                    out, rows.shape[1], dtype=dtype, rows_per_shard=rows_per_shard,
                    source="lm", meta=meta, heldout=heldout,
                    on_close=_write_source_files(source.files), inputs=inputs, force=force,
                ))
            held = heldout_mask(batch.doc, heldout_fraction, seed)
            writer.add(rows, held, doc=batch.doc, pos=batch.pos, token_id=batch.token_id)
            for d in np.unique(batch.doc):  # documents arrive in increasing id order
                if not docs_seen or d != docs_seen[-1]:
                    docs_seen.append(int(d))
            tokens += batch.tokens
            bar.update(batch.tokens)
        if writer is None:
            raise UserError(f"text source {text!r} is empty: it tokenises to no tokens")
        # Filled in before the writer's close() (leaving the with block) writes meta.json.
        writer.meta.update(tokens=tokens, documents=len(docs_seen))
        if source.local and len(docs_seen) <= MAX_DOC_NAMES:
            writer.meta["doc_names"] = [source.documents[i][0] for i in docs_seen]
    seconds = time.perf_counter() - t0
    log.info("extracted %d tokens from %d documents in %.1f s", tokens, len(docs_seen), seconds)
    return {
        "out": str(out),
        "source": "lm",
        "model": model,
        "hook": hook,
        "rows": writer.rows,
        "train_rows": writer.rows - writer.heldout_rows,
        "heldout_rows": writer.heldout_rows,
        "d": writer.d,
        "tokens": tokens,
        "documents": len(docs_seen),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }


def _write_source_files(files: dict) -> Callable[[Path, dict], None]:
    """The text source's long provenance (e.g. the stdlib file list), written into the staged
    set so that it appears with the shards or not at all."""

    def write(stage: Path, meta: dict) -> None:
        for name, content in files.items():
            write_json_atomic(stage / name, content)

    return write
