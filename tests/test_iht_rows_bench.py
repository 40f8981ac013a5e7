"""benchmarks/iht_rows_bench.py at toy sizes, its kernels in Triton's interpreter on the CPU:
each of the three IHT row kernels is timed at each warp count, on a shape with a row kernel
and one without, and each setting's results equal the default's."""

import json

import pytest
from interpreted import ROOT, run_interpreted

pytest.importorskip("triton")



@pytest.mark.slow
def test_iht_rows_bench_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_interpreted([str(ROOT / "benchmarks" / "iht_rows_bench.py"),
                           "--device", "cpu", "--batch", "5", "--reps", "1",
                           "--shapes", "70x40x5,300x600x32", "--warps", "2,4", "--out", str(out)],
                          timeout=900, cwd=tmp_path,
                           env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {(r["kernel"], r["N"], r["warps"]) for r in rows}
    assert seen == {(k, n, w) for k in ("iht_eta", "iht_update_kept", "iht_grad")
                    for n in (70, 300) for w in (2, 4)}
    assert all(r["same"] and r["ms"] > 0 for r in rows)
    assert {r["row_kernel"] for r in rows if r["N"] == 70} == {True}
    assert {r["row_kernel"] for r in rows if r["N"] == 300} == {False}
    assert proc.stdout.strip().splitlines()[-1].startswith("| iht_grad | 300 |")
