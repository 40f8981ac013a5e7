"""The cross-seed feature browser as one static HTML page (``isae.analysis.browser`` makes
its data).

Self-contained: inline CSS and JavaScript, no network request, so the page opens from disk,
inside ``snakemake --report`` and on a machine without internet. Every piece of text that
comes from data (tokens, paths, names) goes through ``html.escape``. The pairs are rendered
as HTML, so the page reads without JavaScript; the script only filters (search text,
``a:17`` / ``b:42`` for a latent, a |cos| range, unmatched on or off) and reverses the
order, and keeps the filter in the URL's fragment (``#q=...&min=0.5``) so a view can be
shared or reopened.
"""

from __future__ import annotations

import math
from html import escape

from isae.analysis.browser import BrowserData, Context, LatentView, PairView

CSS = """
:root { --fg:#1d2330; --muted:#5f6b7a; --line:#dde2e8; --bg:#f6f7f9; --card:#fff;
        --a:#2f6fdb; --b:#c2571a; --mark:#ffe066; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
header.top { padding:18px 28px 8px; }
h1 { font-size:20px; margin:0 0 6px; }
.about { display:grid; grid-template-columns:repeat(3,minmax(0,1fr)); gap:12px; margin:10px 0; }
.about div { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px 12px; }
.about b { display:block; font-size:12px; color:var(--muted); font-weight:600; text-transform:uppercase; }
.about code { font-size:12px; word-break:break-all; }
.nums { display:flex; flex-wrap:wrap; gap:18px; align-items:flex-end; margin:6px 0 4px; }
.num { display:flex; flex-direction:column; }
.num b { font-size:18px; }
.axis { display:flex; justify-content:space-between; width:240px; font-size:11px; color:var(--muted); }
.num span { font-size:12px; color:var(--muted); }
svg.hist rect { fill:#7b8da6; }
.controls { position:sticky; top:0; z-index:2; background:rgba(246,247,249,.96);
            border-bottom:1px solid var(--line); padding:8px 28px; display:flex; flex-wrap:wrap;
            gap:16px; align-items:center; }
.controls input[type=search] { width:260px; padding:5px 8px; border:1px solid #b9c2ce; border-radius:6px; }
.controls input[type=number] { width:64px; padding:4px; border:1px solid #b9c2ce; border-radius:6px; }
.controls button { padding:4px 10px; border:1px solid #b9c2ce; border-radius:6px; background:#fff; cursor:pointer; }
#shown { color:var(--muted); }
main { padding:12px 28px 40px; }
section.pair { background:var(--card); border:1px solid var(--line); border-radius:10px;
               margin:0 0 14px; padding:10px 14px; }
section.pair.hidden { display:none; }
.phead { display:flex; gap:14px; align-items:center; margin-bottom:6px; color:var(--muted); }
.phead .rank { font-weight:600; color:var(--fg); min-width:48px; }
.phead .cos { font-weight:600; color:var(--fg); font-variant-numeric:tabular-nums; }
.cosbar { display:inline-block; width:120px; height:8px; background:#e6e9ee; border-radius:4px; overflow:hidden; }
.cosbar span { display:block; height:100%; }
.sides { display:grid; grid-template-columns:minmax(0,1fr) minmax(0,1fr); gap:14px; }
.latent { border-top:3px solid var(--line); padding-top:4px; min-width:0; }
.latent.side-a { border-color:var(--a); }
.latent.side-b { border-color:var(--b); }
.lhead { display:flex; justify-content:space-between; gap:8px; margin-bottom:2px; }
.lhead b { white-space:nowrap; }
.freq { color:var(--muted); font-size:12px; text-align:right; }
ol.ctxs { list-style:none; margin:0; padding:0; }
li.ctx { display:flex; gap:8px; padding:2px 0; border-bottom:1px dotted #edf0f3;
         font:12.5px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
li.ctx .val { flex:0 0 56px; text-align:right; color:var(--muted); font-variant-numeric:tabular-nums; }
li.ctx .txt { display:flex; flex:1 1 auto; min-width:0; }
/* keyword in context: the tokens line up under each other, the context is cut at the edges */
li.ctx .l { flex:1 1 0; min-width:0; overflow:hidden; display:flex; justify-content:flex-end; }
li.ctx .l span, li.ctx .r { white-space:pre; }
li.ctx .r { flex:1 1 0; min-width:0; overflow:hidden; text-overflow:ellipsis; }
li.ctx mark { flex:0 0 auto; white-space:pre; }
li.ctx .cut { color:#9aa5b1; }
mark { background:var(--mark); padding:0 1px; border-radius:2px; font-weight:600; }
.none { color:var(--muted); font-style:italic; margin:4px 0; }
.nb { color:#9aa5b1; }
"""

JS = r"""
(function () {
  var pairs = Array.prototype.slice.call(document.querySelectorAll('section.pair'));
  var text = pairs.map(function (s) { return s.textContent.toLowerCase(); });
  var q = document.getElementById('q'), lo = document.getElementById('min-cos'),
      hi = document.getElementById('max-cos'), un = document.getElementById('unmatched'),
      rev = document.getElementById('reverse'), shown = document.getElementById('shown'),
      main = document.querySelector('main');
  function apply(write) {
    var term = q.value.trim().toLowerCase(), a = parseFloat(lo.value), b = parseFloat(hi.value);
    if (isNaN(a)) a = 0; if (isNaN(b)) b = 1;
    var latent = /^([ab]):\s*(\d+)$/.exec(term), n = 0;
    pairs.forEach(function (s, i) {
      var c = s.dataset.cos === '' ? NaN : parseFloat(s.dataset.cos), ok;
      ok = isNaN(c) ? un.checked : (c >= a - 1e-9 && c <= b + 1e-9);
      if (ok && latent) ok = s.dataset[latent[1]] === latent[2];
      else if (ok && term) ok = text[i].indexOf(term) >= 0;
      s.classList.toggle('hidden', !ok);
      if (ok) n += 1;
    });
    shown.textContent = n + ' of ' + pairs.length + ' pairs shown';
    if (write) {
      var h = 'q=' + encodeURIComponent(q.value) + '&min=' + lo.value + '&max=' + hi.value +
              '&unmatched=' + (un.checked ? 1 : 0);
      if (window.history && history.replaceState) history.replaceState(null, '', '#' + h);
    }
  }
  function readHash() {
    var h = (location.hash || '').replace(/^#/, '');
    h.split('&').forEach(function (kv) {
      var i = kv.indexOf('='); if (i < 0) return;
      var k = kv.slice(0, i), v = decodeURIComponent(kv.slice(i + 1));
      if (k === 'q') q.value = v; else if (k === 'min') lo.value = v;
      else if (k === 'max') hi.value = v; else if (k === 'unmatched') un.checked = v !== '0';
    });
  }
  [q, lo, hi, un].forEach(function (el) { el.addEventListener('input', function () { apply(true); }); });
  un.addEventListener('change', function () { apply(true); });
  rev.addEventListener('click', function () {
    pairs.reverse(); text.reverse();
    pairs.forEach(function (s) { main.appendChild(s); });
  });
  readHash();
  apply(false);
})();
"""


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _pct(freq: float) -> str:
    if freq == 0:
        return "0%"
    p = 100 * freq
    return f"{p:.3g}%" if p >= 0.01 else f"{p:.1e}%"


def _cos_colour(c: float) -> str:
    """Red (0) through amber to green (1): the bar's colour for a |cos|."""
    c = min(max(c, 0.0), 1.0)
    hue = 120 * c
    return f"hsl({hue:.0f},62%,45%)"


def _visible(s: str) -> str:
    """Whitespace the eye can see on one line: a newline as ⏎, tabs as spaces."""
    return s.replace("\r\n", "\n").replace("\n", "⏎").replace("\t", " ")


def _context(c: Context, doc_names: list | None) -> str:
    name = None
    if doc_names is not None and 0 <= c.doc < len(doc_names):
        name = doc_names[c.doc]
    where = f"document {name!r} ({c.doc})" if name is not None else f"document {c.doc}"
    title = f"{where}, token {c.pos}; code {c.value:+.4g} (raw activation units)"
    token = _visible(c.token)
    # The token's own leading space (BPE's "Ġ", a decoder's word gap) goes outside the mark.
    lead = token[: len(token) - len(token.lstrip(" "))]
    token = token[len(lead):] or token
    left = ('<span class="cut">…</span>' if c.cut_left else "") + escape(_visible(c.left) + lead)
    right = escape(_visible(c.right)) + ('<span class="cut">…</span>' if c.cut_right else "")
    return (f'<li class="ctx" title="{escape(title)}"><span class="val">{c.value:+.2f}</span>'
            f'<span class="txt"><span class="l"><span>{left}</span></span>'
            f'<mark>{escape(token)}</mark><span class="r">{right}</span></span></li>')


def _latent(v: LatentView | None, side: str, other_best: float | None, rows: int,
            doc_names: list | None) -> str:
    label = "A" if side == "a" else "B"
    if v is None:
        return (f'<div class="latent side-{side}"><div class="lhead"><b>{label} · no partner</b>'
                f'</div><p class="none">no latent of {label} is matched to this one (its best '
                f'|cos| with any latent of {label}: {_fmt(other_best)})</p></div>')
    head = (f'<div class="lhead"><b>{label} · latent {v.index}</b><span class="freq">fires on '
            f'{_pct(v.freq)} of held-out rows</span></div>')
    if v.contexts:
        body = '<ol class="ctxs">' + "".join(_context(c, doc_names) for c in v.contexts) + "</ol>"
    else:
        body = f'<p class="none">never fires on the {rows} held-out rows</p>'
    return f'<div class="latent side-{side}">{head}{body}</div>'


def _pair(p: PairView, rows: int, doc_names: list | None) -> str:
    r = p.ref
    if r.matched:
        cos = f"{r.abs_cos:.6f}"
        bar = (f'<span class="cosbar"><span style="width:{100 * r.abs_cos:.1f}%;'
               f'background:{_cos_colour(r.abs_cos)}"></span></span>')
        info = (f'{bar}<span class="cos">|cos| {r.abs_cos:.3f}</span>'
                f'<span>{"same sign" if r.sign > 0 else "opposite sign"}</span>')
    else:
        cos = ""
        info = '<span class="cos">unmatched</span>'
    rows_html = (_latent(p.a, "a", r.best_abs_cos, rows, doc_names)
                 + _latent(p.b, "b", r.best_abs_cos, rows, doc_names))
    return (f'<section class="pair" id="pair-{p.rank}" data-rank="{p.rank}" data-cos="{cos}" '
            f'data-a="{r.a if r.a >= 0 else ""}" data-b="{r.b if r.b >= 0 else ""}">'
            f'<div class="phead"><span class="rank">#{p.rank + 1}</span>{info}</div>'
            f'<div class="sides">{rows_html}</div></section>')


def _hist(counts: list[int]) -> str:
    if not counts:
        return ""
    w, h, n = 240, 48, len(counts)
    top = max(max(counts), 1)
    bars = "".join(
        f'<rect x="{i * w / n + 0.5:.1f}" y="{h - h * c / top:.1f}" width="{w / n - 1:.1f}" '
        f'height="{h * c / top:.1f}"><title>|cos| {i / n:.2f}–{(i + 1) / n:.2f}: {c}</title></rect>'
        for i, c in enumerate(counts)
    )
    return (f'<div class="num"><svg class="hist" width="{w}" height="{h}" role="img" '
            f'aria-label="histogram of matched |cos|">{bars}</svg>'
            '<span class="axis"><span>0</span><span>0.5</span><span>1</span></span>'
            '<span>matched |cos| of all pairs</span></div>')


def _ckpt(label: str, c: dict) -> str:
    bits = [f"{k} {escape(str(c[k]))}" for k in ("arch", "k", "d_sae", "seed") if c.get(k) is not None]
    return f'<div><b>{label}</b>{", ".join(bits)}<br><code>{escape(c["path"])}</code></div>'


def render(data: BrowserData, title: str | None = None) -> str:
    """The whole page as one string."""
    s, about = data.summary, data.about
    acts = about["activations"]
    a, b = about["a"], about["b"]
    if title is None:
        title = (f"{a.get('arch')} seed {a.get('seed')} vs seed {b.get('seed')}: "
                 "matched latents and their top contexts")
    src = ", ".join(f"{k} {escape(str(acts[k]))}" for k in ("model", "hook", "text") if acts.get(k))
    nums = [
        ("mean matched |cos|", _fmt(s.get("mean_abs_cos"))),
        ("chance (random dictionaries)", _fmt(s.get("chance_mean_abs_cos"))),
        ("fraction > 0.9", _fmt(s.get("frac_gt_0.9"))),
        ("fraction > 0.7", _fmt(s.get("frac_gt_0.7"))),
        ("held-out rows encoded", str(s.get("rows"))),
        ("pairs on this page", f"{s.get('pairs_shown')} of {s.get('pairs_total')}"),
    ]
    nums_html = "".join(f'<div class="num"><b>{escape(v)}</b><span>{escape(k)}</span></div>'
                        for k, v in nums)
    doc_names = about.get("doc_names")
    rows = int(s.get("rows") or 0)
    pairs = "\n".join(_pair(p, rows, doc_names) for p in data.pairs)
    note = ("Pairs ranked by |cos| (best first): the top of the ranking, then a sample of the "
            "rest down to the worst match, unmatched latents last. "
            f"Each side lists the latent's {s.get('contexts')} held-out rows with the largest "
            f"|code| (signed value on the left), {s.get('window')} tokens of context either side. "
            f"Codes of both sides are in {s.get('code_units') or 'the units each checkpoint uses'}.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style></head>
<body>
<header class="top">
<h1>{escape(title)}</h1>
<div class="about">{_ckpt("A", a)}{_ckpt("B", b)}<div><b>Activation set</b>{src}<br><code>{escape(acts["path"])}</code></div></div>
<div class="nums">{nums_html}{_hist(s.get("hist_abs_cos") or [])}</div>
<p class="nb">{escape(note)}</p>
</header>
<div class="controls">
<label>Search <input type="search" id="q" placeholder="text, or a:17 / b:42"></label>
<label>|cos| from <input type="number" id="min-cos" min="0" max="1" step="0.05" value="0"></label>
<label>to <input type="number" id="max-cos" min="0" max="1" step="0.05" value="1"></label>
<label><input type="checkbox" id="unmatched" checked> unmatched</label>
<button type="button" id="reverse">reverse order</button>
<span id="shown">{len(data.pairs)} of {len(data.pairs)} pairs shown</span>
</div>
<main>
{pairs}
</main>
<script>{JS}</script>
</body></html>
"""
