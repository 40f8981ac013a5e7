"""benchmarks/hint_bench.py at toy sizes, its kernels in Triton's interpreter on the CPU:
every setting of the bounded top-k is timed against topk_rows with how many rows its bound
served, a fastest setting is named, and whole steps come with and without it."""

import json
import math

import pytest
from interpreted import ROOT, run_interpreted

pytest.importorskip("triton")



@pytest.mark.slow
def test_hint_bench_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "hint.json"
    proc = run_interpreted([str(ROOT / "benchmarks" / "hint_bench.py"), "--device", "cpu",
                           "--width", "300", "--wide", "700", "--batch", "12", "--d", "16",
                           "--reps", "1", "--step-reps", "1", "--archs", "topk,isae-iter",
                           "--out", str(out)], timeout=900, cwd=tmp_path,
                           env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["default"][0] == 0, "the hint is off by default"
    sel = [r for r in d["rows"] if r["part"] == "select"]
    base = [r for r in sel if r["setting"] == "topk_rows"]
    hinted = [r for r in sel if r["setting"] != "topk_rows"]
    assert len(base) == 6 and len(hinted) == 6 * 9
    assert all(0.0 <= r["served"] <= 1.0 and r["ms"] > 0 for r in hinted)
    # a small move of the scores leaves the old support's bound serving every row
    assert all(r["served"] == 1.0 for r in hinted if r["noise"] == 0.05)
    assert str(tuple(d["best"])) in {r["setting"] for r in hinted}
    steps = [r for r in d["rows"] if r["part"] == "steps"]
    assert {(r["arch"], r["width"], r["setting"] == "unhinted") for r in steps} == {
        (a, w, u) for a in ("topk", "isae-iter") for w in (300, 700) for u in (True, False)}
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in steps)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| steps |")
