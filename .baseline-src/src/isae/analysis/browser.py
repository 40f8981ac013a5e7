"""The data of the cross-seed feature browser: matched latent pairs of two checkpoints and
each latent's top-activating held-out contexts.

Two checkpoints trained on one language-model activation set are matched by the signed
Hungarian assignment of their decoder rows (``isae.analysis.matching``). For every latent,
its firing frequency (fraction of held-out rows where its code is non-zero) and its
top-activating contexts are collected in one pass over the held-out rows: each checkpoint
encodes every batch once, and a streaming top-k keeps, per latent, the ``k`` rows with the
largest |code| (the absolute value, so that a signed latent's negative pole counts too; the
shown value keeps its sign; ties go to the earlier row).

Codes are shown in one unit for both sides, that of the raw activations (``CODE_UNITS``):
the coefficient of a unit-norm atom in raw space, i.e. a checkpoint's code in its normalised
space times its scale (as ``isae match`` compares codes). A checkpoint and its own SAELens
export (identity normalisation) then show the same values.

A context is rebuilt from the set's own provenance columns: the held-out rows of one
document, ordered by ``pos``, carry its ``token_id`` sequence (the split is by document, so a
held-out row's neighbours are held out as well), and the model's tokenizer decodes a window
of tokens either side of the row. Nothing here renders HTML (``isae.study.browser_html``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from isae.analysis.matching import Matching
from isae.data.activations import ActivationSet
from isae.data.checkpoints import Checkpoint
from isae.errors import UserError
from isae.progress import progress

log = logging.getLogger(__name__)

PROVENANCE = ["doc", "pos", "token_id"]
#: Bins of the page's histogram of matched |cos| over [0, 1].
HIST_BINS = 20
#: Largest N_a * N_b for which the chance level (two random dictionaries) is computed.
CHANCE_MAX_CELLS = 8192 * 8192
#: The unit of every code value the browser shows (see the module docstring).
CODE_UNITS = "raw activation units: each code is the coefficient of a unit-norm atom on " \
    "the raw activations (a checkpoint's normalised code times its scale)"


# ----------------------------------------------------------------------------- top-k


class StreamingTopK:
    """Per latent, the ``k`` entries with the largest score seen so far.

    Entries arrive as flat arrays (latent, row, value); the score is |value|. Equal scores
    keep the smaller row, so the result equals sorting all entries of a latent by
    (-|value|, row) and taking the first k, whatever the batching.
    """

    def __init__(self, n_latents: int, k: int) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k
        self.score = np.full((n_latents, k), -np.inf)
        """[N, k] float64 |value|, descending per latent; -inf = empty slot."""
        self.value = np.zeros((n_latents, k), np.float64)
        """[N, k] the signed values."""
        self.row = np.full((n_latents, k), -1, np.int64)
        """[N, k] row ids; -1 = empty slot."""

    def update(self, latent: np.ndarray, row: np.ndarray, value: np.ndarray) -> None:
        """Offer entries (latent: [E] int, row: [E] int, value: [E] float)."""
        latent = np.asarray(latent, np.int64)
        row = np.asarray(row, np.int64)
        value = np.asarray(value, np.float64)
        score = np.abs(value)
        # Most entries cannot enter: keep those at least as large as the latent's k-th best
        # (equal ones too: an equal score with a smaller row must win the tie).
        keep = score >= self.score[latent, -1]
        if not keep.any():
            return
        latent, row, value, score = latent[keep], row[keep], value[keep], score[keep]
        touched = np.unique(latent)
        k = self.k
        lat = np.concatenate([np.repeat(touched, k), latent])
        sc = np.concatenate([self.score[touched].ravel(), score])
        rw = np.concatenate([self.row[touched].ravel(), row])
        val = np.concatenate([self.value[touched].ravel(), value])
        # Empty slots (row -1, score -inf) sort last within their latent.
        tie = np.where(rw < 0, np.iinfo(np.int64).max, rw)
        order = np.lexsort((tie, -sc, lat))
        lat, sc, rw, val = lat[order], sc[order], rw[order], val[order]
        first = np.searchsorted(lat, lat, side="left")
        rank = np.arange(len(lat)) - first
        top = rank < k  # every touched latent has k entries (its old slots), so ranks fill
        self.score[lat[top], rank[top]] = sc[top]
        self.row[lat[top], rank[top]] = rw[top]
        self.value[lat[top], rank[top]] = val[top]


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairRef:
    """One row of the browser: a matched pair, or an atom of one side without a partner."""

    a: int
    """Latent of A, -1 when this is an unmatched latent of B."""
    b: int
    """Latent of B, -1 when this is an unmatched latent of A."""
    abs_cos: float
    """|cos| of the two decoder rows (NaN when unmatched)."""
    sign: int
    """+1 / -1: A's latent ~ sign * B's latent; 0 when unmatched."""
    best_abs_cos: float
    """The latent's best |cos| with any latent of the other side (no bijection)."""

    @property
    def matched(self) -> bool:
        return self.a >= 0 and self.b >= 0


def pair_list(m: Matching) -> list[PairRef]:
    """Matched pairs by descending |cos| (ties by A's index), then A's unmatched latents,
    then B's."""
    order = np.lexsort((m.a, -m.abs_cos))
    out = [PairRef(int(m.a[i]), int(m.b[i]), float(m.abs_cos[i]), int(m.sign[i]),
                   float(m.best_ab[m.a[i]])) for i in order]
    nan = float("nan")
    out += [PairRef(int(a), -1, nan, 0, float(m.best_ab[a]))
            for a in np.setdiff1d(np.arange(m.n_a), m.a)]
    out += [PairRef(-1, int(b), nan, 0, float(m.best_ba[b]))
            for b in np.setdiff1d(np.arange(m.n_b), m.b)]
    return out


def select_ranks(total: int, n: int | None) -> np.ndarray:
    """Indices of ``n`` of ``total`` ranked rows, ascending: the best ``n // 2`` matches,
    then the other half spread evenly over the rest of the ranking down to its last row
    (the worst match, or the last unmatched latent). None or 0 = all."""
    if not n or n >= total:
        return np.arange(total)
    head = n // 2
    tail = np.round(np.linspace(head, total - 1, n - head)).astype(np.int64)
    return np.unique(np.concatenate([np.arange(head), tail]))


# ----------------------------------------------------------------------------- encoding


@dataclass
class LatentStats:
    """Per latent of one checkpoint, over the held-out rows used."""

    freq: np.ndarray
    """[N] fraction of rows with a non-zero code."""
    top: StreamingTopK
    """Top-activating rows (held-out row ids, in the order read)."""


def check_activations(acts: ActivationSet, ckpts: Sequence[Checkpoint]) -> None:
    """UserError unless ``acts`` has token provenance and the checkpoints' dimension."""
    missing = [c for c in PROVENANCE if c not in acts.columns()]
    if missing:
        raise UserError(
            f"activation set {acts.path} has no column {missing[0]!r}: the browser needs a "
            "language-model set (columns doc, pos, token_id)"
        )
    for c in ckpts:
        if c.d_in != acts.d:
            raise UserError(f"activation set {acts.path} has d={acts.d}, checkpoint {c.path} "
                            f"has d_in={c.d_in}")


@torch.no_grad()
def scan_heldout(
    ckpts: Sequence[Checkpoint],
    acts: ActivationSet,
    k: int,
    max_rows: int | None = None,
    batch_size: int = 4096,
) -> tuple[list[LatentStats], dict[str, np.ndarray]]:
    """One pass over the held-out rows: every checkpoint encodes each batch once. Code values
    are in raw activation units (``CODE_UNITS``): one positive factor per checkpoint, so the
    ranking of a latent's rows is that of its normalised codes.

    -> (one LatentStats per checkpoint, the provenance columns ``doc``/``pos``/``token_id``
    of the rows used, [rows] each; a row id is an index into them).
    """
    check_activations(acts, ckpts)
    tops = [StreamingTopK(c.d_sae, k) for c in ckpts]
    counts = [np.zeros(c.d_sae, np.int64) for c in ckpts]
    prov: dict[str, list[np.ndarray]] = {c: [] for c in PROVENANCE}
    n = 0
    total = acts.meta.get("heldout_rows")
    if max_rows is not None and total is not None:
        total = min(total, max_rows)
    with progress(total, desc="encode held-out rows", unit="row") as bar:
        for part in acts.iter_shards("heldout", columns=PROVENANCE):
            x_all = part["x"]
            if max_rows is not None:
                x_all = x_all[: max_rows - n]
            for c in PROVENANCE:
                prov[c].append(part[c][: len(x_all)])
            for s in range(0, len(x_all), batch_size):
                xb = torch.from_numpy(x_all[s : s + batch_size])
                rows = n + s + np.arange(len(xb))
                for ckpt, top, count in zip(ckpts, tops, counts):
                    codes = ckpt.model.encode(ckpt.normalize(xb.to(ckpt.model.device)))
                    # Only the active entries leave the device (relu codes come dense).
                    r, j = (codes.val != 0).nonzero(as_tuple=True)
                    lat = codes.idx[r, j].cpu().numpy()
                    count += np.bincount(lat, minlength=len(count))
                    raw = codes.val[r, j].double().cpu().numpy() * float(ckpt.norm.scale)
                    top.update(lat, rows[r.cpu().numpy()], raw)
            n += len(x_all)
            bar.update(len(x_all))
            if max_rows is not None and n >= max_rows:
                break
    if n == 0:
        raise UserError(f"activation set {acts.path} has no held-out rows")
    stats = [LatentStats(freq=count / n, top=top) for count, top in zip(counts, tops)]
    return stats, {c: np.concatenate(v) for c, v in prov.items()}


# ----------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class Context:
    """One top-activating row, as text: left, the token, right."""

    value: float
    """The latent's code on this row (signed; raw activation units, ``CODE_UNITS``)."""
    doc: int
    pos: int
    left: str
    token: str
    right: str
    cut_left: bool
    """True when the document goes on to the left of the window."""
    cut_right: bool


class DocumentIndex:
    """Token windows around held-out rows, from the rows' own doc/pos/token_id."""

    def __init__(self, doc: np.ndarray, pos: np.ndarray, token_id: np.ndarray) -> None:
        self.order = np.lexsort((pos, doc))  # sorted position -> row id
        self.doc = np.asarray(doc)[self.order]
        self.pos = np.asarray(pos)[self.order]
        self.tok = np.asarray(token_id)[self.order]
        self.where = np.empty(len(self.order), np.int64)  # row id -> sorted position
        self.where[self.order] = np.arange(len(self.order))

    def window(self, row: int, width: int) -> tuple[np.ndarray, int, bool, bool]:
        """Token ids of up to ``width`` tokens either side of ``row`` in its document, the
        index of the row's token in them, and whether the document continues beyond each
        end. Stops early at a gap in ``pos`` (tokens the set does not hold)."""
        i = int(self.where[row])
        d = self.doc[i]
        lo = i
        while lo > 0 and i - lo < width and self.doc[lo - 1] == d and self.pos[lo - 1] == self.pos[lo] - 1:
            lo -= 1
        hi = i
        n = len(self.doc)
        while hi + 1 < n and hi - i < width and self.doc[hi + 1] == d and self.pos[hi + 1] == self.pos[hi] + 1:
            hi += 1
        cut_left = self.pos[lo] > 0
        cut_right = hi + 1 < n and self.doc[hi + 1] == d
        return self.tok[lo : hi + 1], i - lo, bool(cut_left), bool(cut_right)


def split_text(tokenizer, ids: Sequence[int], target: int) -> tuple[str, str, str]:
    """(left, token, right) of a token window, decoded as one piece of text so that the
    tokenizer's own spacing rules apply (word pieces join, punctuation attaches); falls back
    to tokens decoded one by one where a prefix does not decode to a prefix."""
    ids = [int(t) for t in ids]

    def dec(x):
        return tokenizer.decode(x, clean_up_tokenization_spaces=False)

    left = dec(ids[:target])
    upto = dec(ids[: target + 1])
    full = dec(ids)
    if upto.startswith(left) and full.startswith(upto):
        return left, upto[len(left):], full[len(upto):]
    pieces = [dec([t]) for t in ids]
    return " ".join(pieces[:target]), pieces[target], " ".join(pieces[target + 1 :])


# ----------------------------------------------------------------------------- the page's data


@dataclass
class LatentView:
    side: str
    """a or b."""
    index: int
    freq: float
    contexts: list[Context] = field(default_factory=list)


@dataclass
class PairView:
    rank: int
    """Position in the full ranking by |cos| (0 = best match)."""
    ref: PairRef
    a: LatentView | None
    b: LatentView | None


@dataclass
class BrowserData:
    pairs: list[PairView]
    summary: dict
    """The matching's summary (mean |cos|, fractions above 0.9 / 0.7, MMCS), rows used, chance."""
    about: dict
    """What was compared: the two checkpoints and the activation set."""


def latent_view(side: str, j: int, stats: LatentStats, docs: DocumentIndex, tokenizer,
                width: int) -> LatentView:
    view = LatentView(side, j, float(stats.freq[j]))
    for row, value in zip(stats.top.row[j], stats.top.value[j]):
        if row < 0:
            break
        ids, t, cut_l, cut_r = docs.window(int(row), width)
        left, token, right = split_text(tokenizer, ids, t)
        i = docs.where[row]
        view.contexts.append(Context(float(value), int(docs.doc[i]), int(docs.pos[i]),
                                     left, token, right, cut_l, cut_r))
    return view


def build(
    pairs: Sequence[PairRef],
    ranks: Sequence[int],
    stats: Sequence[LatentStats],
    prov: dict[str, np.ndarray],
    tokenizer,
    width: int = 8,
) -> list[PairView]:
    """The rows of the page: both latents of each pair with their contexts as text."""
    docs = DocumentIndex(prov["doc"], prov["pos"], prov["token_id"])
    out = []
    for rank, p in zip(ranks, pairs):
        a = latent_view("a", p.a, stats[0], docs, tokenizer, width) if p.a >= 0 else None
        b = latent_view("b", p.b, stats[1], docs, tokenizer, width) if p.b >= 0 else None
        out.append(PairView(int(rank), p, a, b))
    return out


def tokenizer_for(acts: ActivationSet, model: str | None = None):
    """The tokenizer that decodes the set's ``token_id``: ``model``, else the set's own
    model (meta.json ``model``)."""
    from isae.data.language_models import load_tokenizer

    name = model or acts.meta.get("model")
    if not name:
        raise UserError(f"activation set {acts.path} names no model in meta.json; pass the "
                        "model whose tokenizer made its token_id column (--model)")
    return load_tokenizer(name)


def browse(
    ckpt_a: Checkpoint,
    ckpt_b: Checkpoint,
    acts: ActivationSet,
    tokenizer,
    pairs: int | None = 200,
    contexts: int = 8,
    window: int = 8,
    max_rows: int | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
) -> BrowserData:
    """Everything the page shows, for ``pairs`` rows spread over the |cos| ranking."""
    from isae.analysis.matching import chance_mean_abs_cos, match_dictionaries

    if contexts < 1:
        raise UserError(f"--contexts must be >= 1, got {contexts}")
    if window < 0:
        raise UserError(f"--window must be >= 0, got {window}")
    if pairs is not None and pairs < 0:
        raise UserError(f"--pairs must be >= 0 (0 = all), got {pairs}")
    if max_rows is not None and max_rows < 1:
        raise UserError(f"--max-rows must be >= 1, got {max_rows}")
    log.info("matching %s (%d latents) with %s (%d latents)", ckpt_a.path, ckpt_a.d_sae,
             ckpt_b.path, ckpt_b.d_sae)
    m = match_dictionaries(ckpt_a.W_dec, ckpt_b.W_dec, device=device)
    # The chance level costs a second matching of the same size: skipped where that is slow.
    small = ckpt_a.d_sae * ckpt_b.d_sae <= CHANCE_MAX_CELLS
    chance = (chance_mean_abs_cos(ckpt_a.d_sae, ckpt_b.d_sae, ckpt_a.d_in, device=device)
              if small else None)
    ranked = pair_list(m)
    ranks = select_ranks(len(ranked), pairs)
    stats, prov = scan_heldout([ckpt_a, ckpt_b], acts, contexts, max_rows, batch_size)
    log.info("decoding the contexts of %d of %d pairs", len(ranks), len(ranked))
    views = build([ranked[i] for i in ranks], ranks, stats, prov, tokenizer, window)
    summary = {
        **m.summary(),
        "chance_mean_abs_cos": chance,
        "hist_abs_cos": np.histogram(m.abs_cos, bins=HIST_BINS, range=(0.0, 1.0))[0].tolist(),
        "rows": int(len(prov["doc"])),
        "pairs_total": len(ranked),
        "pairs_shown": len(views),
        "contexts": contexts,
        "window": window,
        "code_units": CODE_UNITS,
    }

    def ck(c: Checkpoint) -> dict:
        return {"path": str(c.path), **{k: c.cfg.get(k) for k in ("arch", "k", "d_sae", "seed",
                                                                     "tokens_seen")}}

    meta = acts.meta
    about = {
        "a": ck(ckpt_a),
        "b": ck(ckpt_b),
        "activations": {"path": str(acts.path), **{k: meta.get(k) for k in ("model", "hook", "text")}},
        "doc_names": meta.get("doc_names"),
    }
    return BrowserData(pairs=views, summary=summary, about=about)
