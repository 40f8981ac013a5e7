"""Downstream fidelity: the pure fractions, the causal-LM path on a tiny random GPT-NeoX
(Pythia's architecture) and the encoder path on MiniLM, each against a direct computation
with plain transformers modules and PyTorch forward hooks (no transformer-lens)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from isae.analysis import fidelity as fid
from isae.cli.main import main
from isae.data import checkpoints as checkpoint
from isae.data import language_models as lm
from isae.data.activations import ActivationSet, Normalizer
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder

# Also run in CI's second environment (transformer-lens 3.x beside sae-lens).
pytestmark = pytest.mark.ecosystem

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "The quick brown fox jumps over the lazy dog, twice and then once more.\n\n"
    "Sparse autoencoders split activations into features; seeds disagree.\n\n"
    "x = [i * i for i in range(10)]  # squares\n\n"
    "short"
)


# ----------------------------------------------------------------------------- pure math


def test_fraction_recovered_known_answers():
    assert fid.fraction_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    assert fid.fraction_recovered(2.0, 2.0, 6.0) == 1.0
    assert fid.fraction_recovered(2.0, 6.0, 6.0) == 0.0
    assert fid.fraction_recovered(2.0, 8.0, 6.0) == pytest.approx(-0.5)  # worse than ablation
    assert math.isnan(fid.fraction_recovered(2.0, 3.0, 2.0))
    assert fid.similarity_recovered(0.9, 0.6) == pytest.approx(0.75)
    assert fid.similarity_recovered(1.0, 0.2) == pytest.approx(1.0)
    assert fid.similarity_recovered(0.2, 0.2) == 0.0
    assert math.isnan(fid.similarity_recovered(0.5, 1.0))


def test_next_token_ce_and_pooling_against_loops():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    total, n = fid.next_token_ce(logits, ids, mask)
    ref, cnt = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t + 1]:
                z = logits[b, t].double()
                ref += float(torch.logsumexp(z, 0) - z[ids[b, t + 1]])
                cnt += 1
    assert n == cnt == 5 and total == pytest.approx(ref, rel=1e-12)
    states = torch.randn(2, 5, 3, generator=g)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = fid.mean_pool(states, am)
    torch.testing.assert_close(pooled[0], states[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], states[1].mean(0))


# ----------------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def tiny_neox(tmp_path_factory):
    """A randomly initialised 2-layer GPT-NeoX with a byte-level BPE tokenizer (300 tokens)
    trained on a few pydoc topics, saved as a Hugging Face folder."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-neox")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:5]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    cfg = GPTNeoXConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        rotary_pct=0.25, bos_token_id=0, eos_token_id=0,
                        initializer_range=0.2)  # large weights: logits far from uniform
    torch.manual_seed(0)
    GPTNeoXForCausalLM(cfg).eval().save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    return folder


def _batches(loaded, text, context=16, batch_size=8):
    fr = lm.framing(loaded.tokenizer)
    src = lm.open_text(str(text))
    chunks = lm.chunk_documents(lm.tokenize_documents(loaded.tokenizer, src.documents),
                                lm.check_context(context, fr, loaded.n_ctx))
    return list(lm.batches(chunks, fr, context, batch_size))


@pytest.fixture(scope="module")
def neox(tiny_neox):
    loaded = lm.boot(str(tiny_neox))
    return loaded, _batches(loaded, tiny_neox / "text.txt")


def _direct_ce(folder, batches, layer, replace) -> float:
    """Mean next-token CE in float64 from transformers' GPTNeoXForCausalLM, with a PyTorch
    forward hook on layer ``layer`` that applies ``replace`` at the content positions."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    model = model.double().eval()
    state = {}

    def hook(mod, inp, out):
        if replace is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[state["content"]] = replace(h[state["content"]])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.gpt_neox.layers[layer].register_forward_hook(hook)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches:
                state["content"] = b.content
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                tgt = b.content[:, 1:]
                nll = F.cross_entropy(logits[:, :-1][tgt], b.input_ids[:, 1:][tgt], reduction="sum")
                total += float(nll)
                count += int(tgt.sum())
    finally:
        handle.remove()
    return total / count


def test_lm_kind_and_contexts(neox):
    loaded, batches = neox
    assert loaded.kind == "lm"
    fr = lm.framing(loaded.tokenizer)
    assert fr.prefix == (0,) and fr.suffix == ()  # BOS, as transformer-lens boots it
    assert len(batches) >= 2 and sum(b.tokens for b in batches) > 30
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # partial contexts padded


def test_lm_identity_recovers_everything_and_zero_nothing(neox):
    loaded, batches = neox
    hook = "blocks.0.hook_resid_post"
    m = fid.measure(loaded.bridge, hook, batches,
                    {"spliced": lambda x: x.clone(), "zero": torch.zeros_like}, "lm")
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-9)
    # A random model is no better than chance, so the ablation changes the loss without
    # necessarily raising it; the fractions only need the change.
    assert abs(m["ce_zero"] - m["ce_clean"]) > 1e-2
    assert fid.fraction_recovered(m["ce_clean"], m["ce_spliced"], m["ce_zero"]) == pytest.approx(1.0, abs=1e-6)
    m0 = fid.measure(loaded.bridge, hook, batches,
                     {"spliced": torch.zeros_like, "zero": torch.zeros_like}, "lm")
    assert fid.fraction_recovered(m0["ce_clean"], m0["ce_spliced"], m0["ce_zero"]) == 0.0


def test_lm_values_match_direct_computation(neox, tiny_neox):
    loaded, batches = neox
    mean = torch.linspace(-1, 1, 32)
    reps = {"zero": torch.zeros_like, "mean": lambda x: mean.to(x.dtype).expand_as(x)}
    m = fid.measure(loaded.bridge, "blocks.1.hook_resid_pre", batches, reps, "lm")
    # blocks.1.hook_resid_pre is the output of HF layer 0.
    assert m["ce_clean"] == pytest.approx(_direct_ce(tiny_neox, batches, 0, None), rel=1e-5)
    assert m["ce_zero"] == pytest.approx(_direct_ce(tiny_neox, batches, 0, torch.zeros_like), rel=1e-5)
    ref_mean = _direct_ce(tiny_neox, batches, 0, lambda h: mean.double().expand_as(h))
    assert m["ce_mean"] == pytest.approx(ref_mean, rel=1e-5)
    assert m["tokens"] == sum(b.tokens for b in batches)


def test_lm_fidelity_row_with_a_checkpoint(neox, tiny_neox, tmp_path, capsys):
    loaded, batches = neox
    hook = "blocks.0.hook_resid_post"
    rows = torch.cat([lm.capture(loaded.bridge, b, hook) for b in batches]).numpy()
    mean = rows.mean(0)
    norm = Normalizer(mean=mean.astype(np.float32), scale=float(np.sqrt(((rows - mean) ** 2).sum(1).mean() / 32)))
    model = SparseCoder(SAEConfig(d_in=32, d_sae=64, k=4, seed=0))
    ck = checkpoint.save(model, tmp_path / "ck", norm)
    row = fid.fidelity(ck, str(tiny_neox), hook, str(tiny_neox / "text.txt"), context=16,
                       max_tokens=None, batch_size=8, split="all")
    assert row["kind"] == "lm" and row["ckpt"] == str(ck)
    assert set(row) >= {"ckpt", "l0", "ce_clean", "ce_spliced", "ce_zero", "ce_mean",
                        "frac_recovered_zero", "frac_recovered_mean", "kind"}
    assert all(math.isnan(row[k]) for k in ("sim_spliced", "sim_zero", "sim_mean"))
    assert 0 < row["l0"] <= 4
    assert row["tokens"] == sum(b.tokens for b in batches)
    assert row["frac_recovered_zero"] == pytest.approx(
        (row["ce_zero"] - row["ce_spliced"]) / (row["ce_zero"] - row["ce_clean"]), rel=1e-12)
    assert row["frac_recovered_mean"] == pytest.approx(
        (row["ce_mean"] - row["ce_spliced"]) / (row["ce_mean"] - row["ce_clean"]), rel=1e-12)
    # The spliced CE is that of an explicit reconstruction through the loaded checkpoint.
    ckpt = checkpoint.load(ck)
    m = fid.measure(loaded.bridge, hook, batches, {"x": ckpt.reconstruct_raw}, "lm")
    assert row["ce_spliced"] == pytest.approx(m["ce_x"], rel=1e-9)
    assert row["ce_clean"] == pytest.approx(m["ce_clean"], rel=1e-12)

    # The same row through the command line: its table, and its JSON line (NaN as null).
    argv = ["fidelity", str(ck), "--model", str(tiny_neox), "--hook", hook, "--text",
            str(tiny_neox / "text.txt"), "--context", "16", "--batch-size", "8", "--split", "all",
            "--max-tokens", str(10**6), "--out", str(tmp_path / "f.parquet")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pd.read_parquet(tmp_path / "f.parquet")
    assert len(table) == 1 and out["sim_spliced"] is None
    for key in ("ce_clean", "ce_spliced", "frac_recovered_zero", "l0", "tokens"):
        assert table[key].iloc[0] == pytest.approx(row[key], rel=1e-9) == out[key]
    assert main(argv[:-2] + ["--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "isae fidelity: error: batch_size and max_tokens must be positive"
    assert not any("Traceback" in line for line in err)


# ----------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """MiniLM, a tiny activation set over TEXT (block 2) and a random SAE checkpoint on it."""
    from isae.data.sources.text import extract

    root = tmp_path_factory.mktemp("minilm-fid")
    (root / "text.txt").write_text(TEXT)
    extract(out=str(root / "set"), model="all-MiniLM-L6-v2", hook="blocks.2.hook_resid_post",
            text=str(root / "text.txt"), context=16, batch_size=4, heldout_fraction=0.0)
    acts = ActivationSet(root / "set")
    ck = checkpoint.save(SparseCoder(SAEConfig(d_in=384, d_sae=768, k=16, seed=1)),
                         root / "ck", acts.normalizer())
    loaded = lm.boot("all-MiniLM-L6-v2")
    return root, ck, loaded


def _direct_sims(batches, layer, replace) -> float:
    """Mean cos(clean, modified) of mean-pooled last_hidden_state from transformers'
    BertModel, with a forward hook on encoder layer ``layer``."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(lm.minilm_path()), attn_implementation="eager").eval()
    state = {}

    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[state["content"]] = replace(h[state["content"]])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            state["content"] = b.content
            w = b.attention_mask.unsqueeze(-1).double()
            clean = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            handle = model.encoder.layer[layer].register_forward_hook(hook)
            try:
                mod = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            finally:
                handle.remove()
            e1 = (clean.double() * w).sum(1) / w.sum(1)
            e2 = (mod.double() * w).sum(1) / w.sum(1)
            total += float(F.cosine_similarity(e1, e2, dim=-1).sum())
            n += len(e1)
    return total / n


def test_encoder_row_and_direct_similarity(minilm):
    root, ck, loaded = minilm
    assert loaded.kind == "encoder"  # BertForMaskedLM: an unembed, but no causal LM
    row = fid.fidelity(ck, activations=root / "set", split="all", batch_size=4)
    meta = ActivationSet(root / "set").meta
    assert row["kind"] == "encoder" and row["hook"] == "blocks.2.hook_resid_post"
    assert row["tokens"] == meta["tokens"]
    assert all(math.isnan(row[k]) for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean"))
    assert all(-1 <= row[k] <= 1 for k in ("sim_spliced", "sim_zero", "sim_mean"))
    assert row["l0"] == pytest.approx(16, abs=0.5)
    assert row["frac_recovered_zero"] == pytest.approx(
        (row["sim_spliced"] - row["sim_zero"]) / (1 - row["sim_zero"]), rel=1e-12)
    assert row["frac_recovered_mean"] == pytest.approx(
        (row["sim_spliced"] - row["sim_mean"]) / (1 - row["sim_mean"]), rel=1e-12)
    batches = _batches(loaded, root / "text.txt", context=16, batch_size=4)
    mean = torch.tensor(meta["mean"], dtype=torch.float32)
    assert row["sim_zero"] == pytest.approx(_direct_sims(batches, 2, torch.zeros_like), abs=1e-5)
    assert row["sim_mean"] == pytest.approx(
        _direct_sims(batches, 2, lambda h: mean.expand_as(h)), abs=1e-5)


def test_encoder_identity_splice_recovers_everything(minilm):
    root, ck, loaded = minilm
    batches = _batches(loaded, root / "text.txt", context=16, batch_size=4)
    for hook in ("blocks.2.hook_resid_post", lm.final_hook(loaded.bridge)):
        m = fid.measure(loaded.bridge, hook, batches,
                        {"spliced": lambda x: x.clone(), "zero": torch.zeros_like}, "encoder")
        assert m["sim_spliced"] == pytest.approx(1.0, abs=1e-6)
        assert m["sim_zero"] < 0.9
        assert fid.fractions({**m, "sim_mean": m["sim_zero"]}, "encoder")["frac_recovered_zero"] == pytest.approx(1.0, abs=1e-5)
