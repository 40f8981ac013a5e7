"""Documents -> framed contexts for a forward pass.

Every document is tokenised without special tokens (literal strings such as ``[SEP]`` in
the text are split into ordinary tokens, so text never produces a special token) and cut
into chunks of ``context - len(prefix) - len(suffix)`` tokens; each chunk is framed by the
tokenizer's own special tokens (``[CLS] … [SEP]`` for BERT, ``BOS …`` for a causal LM booted
by transformer-lens). The last, partial chunk of a document is *kept*: it is right-padded to
``context`` and masked, so every token of the text is used once. Only the content positions
become rows; prefix, suffix and padding positions are dropped. ``pos`` is a token's index
in its document's token stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from isae.errors import UserError


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
