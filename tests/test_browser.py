"""The cross-seed feature browser: the streaming top-k against a sort of everything, the
page's data against a float64 encode of every held-out row, the text against the tokenizer,
HTML escaping, the command's refusals, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from isae.analysis import browser as br
from isae.analysis.matching import match_dictionaries
from isae.cli.main import main
from isae.data import checkpoints as checkpoint
from isae.data import language_models as lm
from isae.data.activations import ActivationSet, ActivationWriter, heldout_mask
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder
from isae.study.browser_html import render

D, N, K = 16, 40, 3


# ----------------------------------------------------------------------------- pure parts


def _reference_top(latent, row, value, n, k):
    """Per latent: the k entries with the largest |value|, ties by the smaller row."""
    out = []
    for j in range(n):
        sel = latent == j
        order = np.lexsort((row[sel], -np.abs(value[sel])))[:k]
        out.append((row[sel][order], value[sel][order]))
    return out


@pytest.mark.parametrize("batch", [1, 7, 64, 10_000])
def test_streaming_topk_equals_sorting_everything(batch):
    rng = np.random.default_rng(batch)
    E, n, k = 3000, 25, 4
    latent = rng.integers(0, n, E)
    row = np.arange(E) // 3  # several entries per row, rows ascending as in a real scan
    # few distinct magnitudes: many ties, both signs
    value = rng.integers(1, 6, E) * rng.choice([-1.0, 1.0], E)
    latent[latent == 7] = 8  # latent 7 never fires
    latent[np.flatnonzero(latent == 3)[2:]] = 4  # latent 3 fires twice (< k)
    top = br.StreamingTopK(n, k)
    for s in range(0, E, batch):
        top.update(latent[s : s + batch], row[s : s + batch], value[s : s + batch])
    for j, (r, v) in enumerate(_reference_top(latent, row, value, n, k)):
        got = top.row[j][top.row[j] >= 0]
        np.testing.assert_array_equal(got, r, err_msg=f"latent {j}")
        np.testing.assert_array_equal(top.value[j][: len(r)], v)
    assert (top.row[7] == -1).all() and (top.row[3] >= 0).sum() == 2


def test_select_ranks_keeps_the_best_and_spreads_the_rest():
    idx = br.select_ranks(100, 10)
    assert list(idx[:5]) == [0, 1, 2, 3, 4] and idx[-1] == 99 and len(idx) == 10
    assert (np.diff(idx) > 0).all()
    assert list(br.select_ranks(5, 10)) == list(range(5))
    assert len(br.select_ranks(100, 0)) == 100 and len(br.select_ranks(100, None)) == 100


def test_pair_list_orders_matched_by_cos_then_unmatched():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 8))
    B = np.concatenate([A[[2, 0, 5]] + 0.1 * rng.standard_normal((3, 8)), -A[[1]]])
    m = match_dictionaries(A, B)
    pairs = br.pair_list(m)
    assert len(pairs) == 6  # 4 matched + 2 unmatched of A
    matched = [p for p in pairs if p.matched]
    assert len(matched) == 4 and all(not p.matched for p in pairs[4:])
    cos = [p.abs_cos for p in matched]
    assert cos == sorted(cos, reverse=True)
    assert {(p.a, p.b) for p in matched} == {(2, 0), (0, 1), (5, 2), (1, 3)}
    assert next(p for p in matched if p.a == 1).sign == -1
    assert {p.a for p in pairs[4:]} == {3, 4} and all(np.isnan(p.abs_cos) for p in pairs[4:])


def test_document_windows_stop_at_document_edges_and_gaps():
    # two documents, rows shuffled; doc 1 misses pos 5 (a gap)
    doc = np.array([0] * 10 + [1] * 9)
    pos = np.concatenate([np.arange(10), [0, 1, 2, 3, 4, 6, 7, 8, 9]])
    tok = 100 * doc + pos
    perm = np.random.default_rng(1).permutation(len(doc))
    idx = br.DocumentIndex(doc[perm], pos[perm], tok[perm])
    row = int(np.flatnonzero((doc[perm] == 0) & (pos[perm] == 1))[0])
    ids, t, cut_l, cut_r = idx.window(row, 3)
    assert list(ids) == [0, 1, 2, 3, 4] and t == 1 and not cut_l and cut_r
    row = int(np.flatnonzero((doc[perm] == 0) & (pos[perm] == 8))[0])
    ids, t, cut_l, cut_r = idx.window(row, 3)
    assert list(ids) == [5, 6, 7, 8, 9] and t == 3 and cut_l and not cut_r
    row = int(np.flatnonzero((doc[perm] == 1) & (pos[perm] == 6))[0])
    ids, t, cut_l, cut_r = idx.window(row, 4)
    assert list(ids) == [106, 107, 108, 109] and t == 0 and cut_l  # stops at the gap


@pytest.fixture(scope="module")
def tokenizer():
    return lm.load_tokenizer(lm.MINILM_ALIAS)


def test_split_text_decodes_with_the_tokenizers_own_spacing(tokenizer):
    ids = lm.tokenize(tokenizer, "The tokenization of unbelievable words, like this.")
    for t in range(len(ids)):
        left, token, right = br.split_text(tokenizer, ids, t)
        assert left + token + right == tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
        piece = tokenizer.convert_ids_to_tokens(int(ids[t])).removeprefix("##")
        assert token.strip() == piece


# ----------------------------------------------------------------------------- a small LM set


def _text_rows(tokenizer):
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:8]]
    ids = [lm.tokenize(tokenizer, t)[:150] for t in docs]
    doc = np.concatenate([np.full(len(x), i) for i, x in enumerate(ids)])
    pos = np.concatenate([np.arange(len(x)) for x in ids])
    return doc, pos, np.concatenate(ids)


@pytest.fixture(scope="module")
def lm_set(tmp_path_factory, tokenizer):
    """Token provenance from real text through the MiniLM tokenizer, random activations
    (scale 3), and two untrained checkpoints (topk and the signed isae) of different seeds."""
    tmp = tmp_path_factory.mktemp("browse")
    doc, pos, tok = _text_rows(tokenizer)
    # scale far from 1: a value in the wrong unit would show
    x = 3 * np.random.default_rng(0).standard_normal((len(doc), D)).astype(np.float32) + 0.3
    with ActivationWriter(tmp / "acts", D, source="lm", rows_per_shard=250,
                          meta={"model": lm.MINILM_ALIAS, "hook": "blocks.3.hook_resid_post",
                                "text": "pydoc", "doc_names": [f"doc{i}" for i in range(8)]},
                          heldout={"by": "doc", "fraction": 0.5, "seed": 0}) as w:
        w.add(x, heldout_mask(doc, 0.5, 0), doc=doc, pos=pos, token_id=tok)
    acts = ActivationSet(tmp / "acts")
    cks = []
    for arch, seed in (("topk", 1), ("isae", 2)):
        m = SparseCoder(SAEConfig.from_arch(arch, d_in=D, d_sae=N, k=K, seed=seed))
        cks.append(checkpoint.save(m, tmp / f"{arch}{seed}", acts.normalizer(),
                                   extra={"arch": arch, "seed": seed}))
    return tmp, acts, cks


def _dense_codes(ck, x):
    """Every held-out row's codes [rows, N], in float64 from the saved tensors: normalise,
    (x - b_dec) W_enc + b_enc, keep the k largest (ReLU'd for topk, by |.| when signed)."""
    from safetensors.numpy import load_file

    cfg = json.loads((ck / "cfg.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(ck / "sae.safetensors")).items()}
    nz = cfg["normalization"]
    xn = (x.astype(np.float64) - np.asarray(nz["mean"])) / nz["scale"]
    pre = (xn - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    score = np.abs(pre) if cfg["signed"] else np.maximum(pre, 0)
    top = np.argsort(-score, axis=1)[:, :K]
    z = np.zeros_like(pre)
    r = np.arange(len(x))[:, None]
    z[r, top] = pre[r, top] if cfg["signed"] else np.maximum(pre[r, top], 0)
    return z


def test_page_data_equals_a_float64_reference(lm_set, tokenizer):
    tmp, acts, cks = lm_set
    a, b = (checkpoint.load(c) for c in cks)
    data = br.browse(a, b, acts, tokenizer, pairs=0, contexts=4, window=3, batch_size=37)
    held = acts.load("heldout", columns=["doc", "pos", "token_id"])
    # the page's unit: raw activations, i.e. normalised codes times the set's scale
    scale = acts.normalizer().scale
    assert abs(scale - 1) > 0.1 and "raw activation units" in data.summary["code_units"]
    za, zb = (_dense_codes(c, held["x"]) * scale for c in cks)
    m = match_dictionaries(a.W_dec, b.W_dec)
    assert data.summary["rows"] == len(held["x"])
    assert data.summary["mean_abs_cos"] == pytest.approx(float(m.abs_cos.mean()))
    assert len(data.pairs) == N  # equal widths: every latent is in a pair
    cos = [p.ref.abs_cos for p in data.pairs]
    assert cos == sorted(cos, reverse=True)
    signed = 0
    for p in data.pairs:
        for view, z in ((p.a, za), (p.b, zb)):
            j = view.index
            assert view.freq == pytest.approx((z[:, j] != 0).mean(), abs=1e-12)
            rows = np.flatnonzero(z[:, j])
            ref = rows[np.lexsort((rows, -np.abs(z[rows, j])))][:4]
            assert [(c.doc, c.pos) for c in view.contexts] == [
                (int(held["doc"][r]), int(held["pos"][r])) for r in ref]
            for c, r in zip(view.contexts, ref):
                assert c.value == pytest.approx(z[r, j], rel=1e-5, abs=1e-6)
                piece = tokenizer.convert_ids_to_tokens(int(held["token_id"][r])).removeprefix("##")
                assert c.token.strip() == piece
                signed += c.value < 0
    assert signed > 0  # the isae side's negative codes are among the top contexts


def test_render_escapes_every_text(lm_set):
    ctx = br.Context(-1.5, 0, 3, "<script>alert(1)</script> & ", "<blink>", "\"'><img src=x>", True, False)
    ref = br.PairRef(0, 1, 0.5, -1, 0.6)
    view = br.LatentView("a", 0, 0.25, [ctx])
    data = br.BrowserData(
        pairs=[br.PairView(0, ref, view, br.LatentView("b", 1, 0.0, []))],
        summary={"rows": 10, "contexts": 1, "window": 2, "mean_abs_cos": 0.5,
                 "hist_abs_cos": [1, 0]},
        about={"a": {"path": "<a>", "arch": "topk"}, "b": {"path": "b&b"},
               "activations": {"path": "x\"y", "model": "<m>"}, "doc_names": ["<doc>"]},
    )
    html = render(data, title="<title>")
    assert "<script>alert" not in html and "<img" not in html and "<blink>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp;" in html and "&lt;blink&gt;" in html
    assert "&lt;title&gt;" in html and "&lt;doc&gt;" in html and "x&quot;y" in html
    assert "never fires on the 10 held-out rows" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network


# ----------------------------------------------------------------------------- the command


def test_browse_command_writes_the_page(lm_set, capsys):
    tmp, acts, cks = lm_set
    out = tmp / "page.html"
    rc = main(["browse", str(cks[0]), str(cks[1]), "--activations", str(acts.path),
               "--out", str(out), "--pairs", "10", "--contexts", "3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs_shown"] == 10 and summary["pairs_total"] == N
    html = out.read_text()
    assert html.count('<section class="pair"') == 10
    assert 0 < html.count("<mark>") <= 10 * 2 * 3
    # --max-rows: only the first rows are encoded, and every context comes from them
    assert main(["browse", str(cks[0]), str(cks[1]), "--activations", str(acts.path),
                 "--out", str(out), "--max-rows", "50", "--pairs", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 50


def _fail(argv, capsys, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], err


def test_browse_refuses_sets_it_cannot_show(lm_set, synthetic_set, tmp_path, capsys):
    tmp, acts, cks = lm_set
    out = str(tmp_path / "p.html")
    # a synthetic set has no tokens
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=32, d_sae=64, k=3, seed=0))
    ck = checkpoint.save(m, tmp_path / "s", ActivationSet(synthetic_set).normalizer())
    _fail(["browse", str(ck), str(ck), "--activations", str(synthetic_set), "--out", out],
          capsys, "has no column 'pos'")
    # an LM set that does not name its model
    meta = json.loads((acts.path / "meta.json").read_text())
    bare = tmp_path / "bare"
    shutil.copytree(acts.path, bare)
    del meta["model"]
    (bare / "meta.json").write_text(json.dumps(meta))
    _fail(["browse", str(cks[0]), str(cks[1]), "--activations", str(bare), "--out", out],
          capsys, "names no model in meta.json")
    _fail(["browse", str(cks[0]), str(ck), "--activations", str(acts.path), "--out", out],
          capsys, "d_in=32")
    _fail(["browse", str(cks[0]), str(cks[1]), "--activations", str(acts.path), "--out", out,
           "--contexts", "0"], capsys, "--contexts must be >= 1")
    assert not (tmp_path / "p.html").exists()


def test_browse_never_writes_over_a_folder_an_input_or_another_file(lm_set, tmp_path, capsys):
    tmp, acts, cks = lm_set
    meta = (acts.path / "meta.json").read_bytes()
    cfg = (cks[0] / "cfg.json").read_bytes()
    common = [str(cks[0]), str(cks[1]), "--activations", str(acts.path), "--out"]
    _fail(["browse", *common, str(acts.path)], capsys, "would replace the input")
    _fail(["browse", *common, str(cks[0])], capsys, "would replace the input")
    _fail(["browse", *common, str(cks[0] / "cfg.json")], capsys, "would replace the input")
    (tmp_path / "folder").mkdir()
    _fail(["browse", *common, str(tmp_path / "folder")], capsys, "is a folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    _fail(["browse", *common, str(notes)], capsys, "is not an HTML page")
    assert notes.read_text() == "mine\n"
    assert (acts.path / "meta.json").read_bytes() == meta
    assert (cks[0] / "cfg.json").read_bytes() == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]
    # a page it wrote before is replaced
    page = tmp_path / "page.html"
    assert main(["browse", *common, str(page)]) == 0
    assert main(["browse", *common, str(page)]) == 0
    assert page.read_text().startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _headless(tmp_path, url: str, *extra: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class _Dom(HTMLParser):
    """Counts of the elements the page must have, from Chromium's serialised DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = self.hidden = self.marks = self.ctx = 0
        self.ids: set[str] = set()
        self.shown = ""
        self._in_shown = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section" and "pair" in cls:
            self.pairs += 1
            self.hidden += "hidden" in cls
        self.marks += tag == "mark"
        self.ctx += tag == "li" and "ctx" in cls
        self._in_shown = a.get("id") == "shown"

    def handle_data(self, data):
        if self._in_shown:
            self.shown += data
            self._in_shown = False


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_page_in_headless_chromium(lm_set, tmp_path, capsys):
    tmp, acts, cks = lm_set
    page = tmp_path / "page.html"
    assert main(["browse", str(cks[0]), str(cks[1]), "--activations", str(acts.path),
                 "--out", str(page), "--pairs", "0", "--contexts", "3"]) == 0
    capsys.readouterr()
    dom = _Dom()
    dom.feed(_headless(tmp_path, page.as_uri(), "--dump-dom"))
    assert dom.pairs == N and dom.hidden == 0
    assert {"q", "min-cos", "max-cos", "unmatched", "reverse", "shown"} <= dom.ids
    assert dom.ctx > 0 and dom.marks == dom.ctx  # one highlighted token per context
    assert dom.shown.strip() == f"{N} of {N} pairs shown"
    # The script ran: a filter in the URL's fragment hides every pair but one latent's.
    dom = _Dom()
    dom.feed(_headless(tmp_path, page.as_uri() + "#q=a:5", "--dump-dom"))
    assert dom.pairs == N and dom.hidden == N - 1
    assert dom.shown.strip() == f"1 of {N} pairs shown"
    dom = _Dom()
    dom.feed(_headless(tmp_path, page.as_uri() + "#min=2", "--dump-dom"))
    assert dom.hidden == N and dom.shown.strip() == f"0 of {N} pairs shown"
    shot = tmp_path / "page.png"
    _headless(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,900",
              "--hide-scrollbars")
    assert shot.stat().st_size > 10_000
    assert re.match(rb"\x89PNG", shot.read_bytes()[:4])


def test_dense_relu_codes(lm_set, tokenizer, tmp_path):
    """A relu SAE's codes come dense; frequencies and top rows still follow its ReLU."""
    from safetensors.numpy import load_file

    tmp, acts, cks = lm_set
    m = SparseCoder(SAEConfig.from_arch("relu", d_in=D, d_sae=N, k=K, seed=3))
    ck = checkpoint.save(m, tmp_path / "relu", acts.normalizer())
    data = br.browse(checkpoint.load(ck), checkpoint.load(cks[0]), acts, tokenizer, pairs=0,
                     contexts=2, window=1)
    t = {k: v.astype(np.float64) for k, v in load_file(str(ck / "sae.safetensors")).items()}
    x = acts.load("heldout")["x"].astype(np.float64)
    nz = acts.normalizer()
    z = np.maximum(((x - nz.mean) / nz.scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
    for p in data.pairs:
        j = p.a.index
        assert p.a.freq == pytest.approx((z[:, j] > 0).mean(), abs=1e-12)
        if p.a.contexts:
            assert p.a.contexts[0].value == pytest.approx(z[:, j].max() * nz.scale, rel=1e-5)


def test_a_checkpoint_and_its_saelens_export_show_the_same_codes(lm_set, tokenizer, tmp_path):
    """One SAE on the set's scale and its own export on raw units: every pair matches at
    |cos| 1 with the same contexts and the same values, in the unit the page names."""
    tmp, acts, cks = lm_set
    assert main(["export", str(cks[1]), "--format", "saelens", "--out", str(tmp_path / "e")]) == 0
    data = br.browse(checkpoint.load(cks[1]), checkpoint.load(tmp_path / "e"), acts, tokenizer,
                     pairs=0, contexts=3, window=1)
    values = 0
    for p in data.pairs:
        assert p.ref.a == p.ref.b and p.ref.abs_cos == pytest.approx(1, abs=1e-6) and p.ref.sign == 1
        assert [(c.doc, c.pos) for c in p.a.contexts] == [(c.doc, c.pos) for c in p.b.contexts]
        for ca, cb in zip(p.a.contexts, p.b.contexts):
            assert ca.value == pytest.approx(cb.value, rel=1e-4, abs=1e-6)
            values += 1
    assert values > N
    html = render(data)
    assert "Codes of both sides are in raw activation units" in html


# ----------------------------------------------------------------------------- the workflow


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake missing")
def test_workflow_plans_one_page_per_language_model_arch(tmp_path):
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "Snakefile", tmp_path / "Snakefile")
    for folder in ("workflow", "config", "scripts"):
        shutil.copytree(root / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "seeds=[2, 0, 1]",
         "archs=[topk, isae]", "sweep={archs: []}", "ablation={datasets: []}",
         "datasets={minilm: {archs: null}}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    pages = sorted(set(re.findall(r"results/browser/\S+\.html", r.stdout)))
    # the synthetic set has no text: pages for minilm only, each arch's two lowest seeds
    import yaml
    train = yaml.safe_load((root / "config" / "config.yaml").read_text())["datasets"]["minilm"]["train"]
    shape = f"k{train['k']}-w{train['width']}-r{train['rows']}"
    assert pages == [f"results/browser/minilm/{shape}/isae/seed0-seed1.html",
                     f"results/browser/minilm/{shape}/topk/seed0-seed1.html"]
