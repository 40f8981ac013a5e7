"""The compact table at the end of benchmarks/gpu_session.sh: before / after and the targets.

    python benchmarks/session_table.py OUTDIR

Reads the JSON files the session wrote into OUTDIR (loop_before.json, loop_after.json,
seeds_before.json, seeds_after.json, iter.json; any may be missing or hold a failed row)
and prints one Markdown table. "before" is ``--data-on-device never``: the streaming path
``train`` took before the device-resident one; "after" is the session's other mode (auto on
the GPU, always in the CPU smoke run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict[str, dict]:
    """The rows of OUT/NAME.json by key; the file's own fields under ``_meta``."""
    path = out / f"{name}.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        rows = doc["rows"]
    except (ValueError, KeyError):
        return {}
    return {"_meta": {k: v for k, v in doc.items() if k != "rows"},
            **{r["key"]: r for r in rows if "key" in r}}


def rate(r: dict | None, field: str = "tok_s") -> str:
    if not r:
        return "—"
    if r.get(field) is None:
        return "FAILED" if "FAILED" in r.get("note", "") else "—"
    s = f"{r[field] / 1e6:.2f} M tok/s"
    if r.get("peak_gb") is not None and field == "tok_s":
        s += f", peak {r['peak_gb']:.2f} GB"
    return s


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    lb, la = load(out, "loop_before"), load(out, "loop_after")
    sb, sa = load(out, "seeds_before"), load(out, "seeds_after")
    it = load(out, "iter")

    def val(r, field="tok_s"):
        return None if not r or r.get(field) is None else r[field]

    rows = []

    def add(what, before, after, target="", verdict=""):
        rows.append((what, before, after, target, verdict))

    def meets(x, goal):
        return "" if x is None else ("met" if x >= goal else "missed")

    add("topk step alone", rate(lb.get("step")), rate(la.get("step")))
    add("train, batches already on the device", rate(lb.get("memory")), rate(la.get("memory")))
    d_b, d_a = lb.get("disk"), la.get("disk")
    add("train from disk, single seed (loop)",
        rate(d_b) + (f" [{d_b.get('batches')}]" if d_b and d_b.get("batches") else ""),
        rate(d_a) + (f" [{d_a.get('batches')}]" if d_a and d_a.get("batches") else ""),
        ">= 3 M tok/s", meets(val(d_a), 3e6))
    add("train from disk, single seed (end to end: load, setup, checkpoint)",
        rate(d_b, "end_to_end_tok_s"), rate(d_a, "end_to_end_tok_s"))
    ratios = []
    for loop in (lb, la):
        d, m = val(loop.get("disk")), val(loop.get("memory"))
        ratios.append(None if d is None or m is None else d / m)
    add("from disk / from device batches", *[("—" if r is None else f"{r:.0%}") for r in ratios],
        ">= 90 %", meets(ratios[1], 0.9))
    add("train with no per-step host sync (one AuxK width)", rate(lb.get("nosync")), rate(la.get("nosync")))
    for key in ("load_pinned", "load_pageable"):
        r = la.get(key)
        if r:
            add(f"one-off load of the split ({key.split('_')[1]} staging)", "—",
                f"{r['wall_s']:.2f} s: {r['note']}" if r.get("wall_s") is not None else r.get("note", ""))
    add("3 seeds one after another, end to end", rate(sb.get("seeds_seq")), rate(sa.get("seeds_seq")))
    add("3 seeds sharing one pass, end to end", rate(sb.get("seeds_shared")), rate(sa.get("seeds_shared")))
    ob, oa = sb.get("seeds_streams"), sa.get("seeds_streams")
    if ob or oa:
        def streams(r):
            if not r or r.get("tok_s") is None:
                return rate(r)
            return rate(r) + f" (FVU vs one stream: {r['fvu_rel_diff']:.1e})"
        add("  the same, one CUDA stream per seed (opt-in)", streams(ob), streams(oa))
    rb, ra = sb.get("seeds_ratio"), sa.get("seeds_ratio")

    def ratio(r):
        if not r or r.get("ratio") is None:
            return "—"
        return f"{r['ratio']:.2f}x (bound without overlap {r['bound']:.2f}x)"

    add("sharing speed-up", ratio(rb), ratio(ra), ">= 3x", meets(val(ra, "ratio"), 3.0))
    st = it.get("step_isae-iter")
    add("isae-iter step", "", rate(st), ">= 1.5 M tok/s", meets(val(st), 1.5e6))
    ph = it.get("iter_phases")
    if ph and ph.get("phases_ms"):
        full, base = ph["phases_ms"], ph.get("phases_no_iht_ms") or {}
        add("  isae-iter eager step by phase", "",
            "; ".join(f"{k} {v:.2f} ms" for k, v in full.items())
            + (f" (IHT steps {sum(full.values()) - sum(base.values()):.2f} ms of "
               f"{sum(full.values()):.2f})" if base else ""))
    kn = it.get("iter_kernels")
    if kn and kn.get("kinds_ms"):
        top = sorted(kn["kinds_ms"].items(), key=lambda kv: -kv[1])[:6]
        add("  isae-iter kernels by kind (ms per step)", "", "; ".join(f"{k} {v:.2f}" for k, v in top))
    mode = (la.get("_meta") or sa.get("_meta") or {}).get("mode", "auto")
    device = next((f["_meta"]["device"] for f in (la, lb, sa, sb, it) if f.get("_meta")), "?")
    print(f"device: {device}")
    print(f"| measurement | before (never: streamed) | after ({mode}) | target | verdict |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nbefore = the streaming path; both columns run today's loop, whose shared pass reads "
          "all seeds' dead counts in one host sync per step (it used to take one per seed).")


if __name__ == "__main__":
    main()
