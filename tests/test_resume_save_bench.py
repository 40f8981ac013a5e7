"""benchmarks/resume_save_bench.py at a toy shape: the state it times is as large as M SAEs'
weights and Adam moments (float32) and dead-latent counters (int64) make it, and it
reads back as the state it wrote."""

import importlib.util
from pathlib import Path

import torch

from isae.training.resume import load_state, save_state

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("resume_save_bench",
                                              ROOT / "benchmarks" / "resume_save_bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_timed_state_has_the_size_of_its_shape(tmp_path, capsys):
    M, d, N = 3, 8, 40
    rows = bench.main(["--shapes", f"{M}x{d}x{N}", "--reps", "2", "--dir", str(tmp_path),
                       "--out", str(tmp_path / "rows.json")])
    params = 2 * d * N + N + d
    payload = M * (3 * params * 4 + N * 8 + 4 * 4)  # weights, 2 moments, counters, 4 steps
    assert rows[0]["mb"] * 1e6 >= payload
    assert rows[0]["mb"] * 1e6 < payload + 200_000  # the JSON header, not another copy
    assert 0 < rows[0]["s_min"] <= rows[0]["s_max"]
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"| {M} | {d} | {N} |")
    state = bench.state_of(M, d, N)
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert torch.equal(back["runs"][1]["stepper"]["model"]["W_dec"],
                       state["runs"][1]["stepper"]["model"]["W_dec"])
