"""benchmarks/group_bench.py --only ahead at toy sizes on the CPU: the group trained waiting
after each step and stepping ahead, both timed, and the same training both ways (on the CPU
the stacked reference reads the dead latents exactly, whatever the width)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ahead_section_times_both_ways_and_they_train_alike(tmp_path):
    out = tmp_path / "ahead.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "ISAE_STEP_AHEAD": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "group_bench.py"),
                           "--device", "cpu", "--d", "16", "--width", "64", "--k", "3",
                           "--batch", "128", "--steps", "12", "--rows", "4000", "--seeds", "2",
                           "--only", "ahead", "--set-dir", str(tmp_path / "sets"),
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r.get("key"): r for r in json.loads(out.read_text())["rows"]}
    assert rows["ahead_0"]["wall_s"] > 0 and rows["ahead_1"]["wall_s"] > 0
    assert rows["ahead_speedup"]["ratio"] > 0
    assert rows["ahead_speedup"]["fvu_diff"] == 0.0
    assert "stepping ahead: speed-up of the loop" in proc.stdout.splitlines()[-1]
