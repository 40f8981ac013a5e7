"""benchmarks/iter_bench.py at toy sizes on the CPU: every measurement it promises comes out,
and on the CPU (stock ops) the +sg forward is isae-iter's exactly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_iter_bench_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "iter.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "iter_bench.py"), "--device", "cpu",
                        "--tiny", "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    steps = [r for r in rows if r.get("key") == "steps"]
    rates = [r for r in rows if "M_tok_s" in r]
    assert {r["arch"] for r in rates} == {"topk", "isae", "isae-iter", "isae-iter+sg"}
    assert len(rates) == 8 and len(steps) == 4
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rates)
    assert all(math.isclose(r["share"], r["ms"] / (r["ms"] + next(
        q["ms"] for q in rates if q["arch"] == "isae" and q["shape"] == r["shape"])), rel_tol=1e-9)
        for r in steps)
    agree = [r for r in rows if r.get("key") == "agreement"]
    assert len(agree) == 2 and all(r["same_support_rows"] == 1.0 and r["fvu_rel_diff"] == 0.0
                                   for r in agree)
    train = [r for r in rows if r["part"] == "training"]
    assert {r["arch"] for r in train} == {"isae", "isae-iter", "isae-iter+sg"}
    for r in train:
        assert 0 < r["fvu"] < 1.5 and 0 < r["truth_cos"] <= 1 and 0 < r["seed_cos"] <= 1
    assert "| shape | arch | ms / step |" in proc.stdout
