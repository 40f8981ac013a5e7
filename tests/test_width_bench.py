"""benchmarks/width_bench.py on the CPU at tiny sizes: one row per width x arch x recipe,
each number equal to the library function that defines it on the checkpoint it kept."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from isae.analysis.reconstruction import reconstruction_metrics
from isae.data.activations import ActivationSet
from isae.data.checkpoints import load

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("width_bench", ROOT / "benchmarks" / "width_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_width_bench_tiny(synthetic_set, tmp_path, capsys):
    bench = _bench()
    out, table = tmp_path / "ckpts", tmp_path / "t.parquet"
    assert bench.main(["--activations", str(synthetic_set), "--device", "cpu", "--widths", "48,96",
                       "--k", "3", "--tokens", "2048", "--batch-size", "512",
                       "--heldout-rows", "1500", "--out", str(out), "--table", str(table)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert "fvu_heldout" in lines[0] and "dead_pct" in lines[0] and len(lines) == 2 + 20
    t = pd.read_parquet(table)
    assert len(t) == 2 * 2 * (2 * 2 + 1)  # widths x archs x (recipes x rates + sparsify)
    acts = ActivationSet(synthetic_set)
    for _, r in t.iterrows():
        path = out / f"w{r['width']}" / f"{r['recipe']}-x{r['lr_factor']:g}" / r["arch"]
        ck = load(path)
        assert ck.d_sae == r["width"] and ck.cfg["arch"] == r["arch"]
        cfg = json.loads((path / "cfg.json").read_text())
        want_dead = {"isae": 200_000, "live": 20_000, "sparsify": 10_000_000}[r["recipe"]]
        assert cfg["train"]["dead_tokens"] == want_dead
        assert cfg["train"].get("auxk_detach", "none") == {
            "isae": "none", "live": "tied", "sparsify": "all"}[r["recipe"]]
        # The rate: sparsify's own, the others 1 and 4 x isae's default (4: the sweep's choice).
        assert r["lr_factor"] in ((1.0,) if r["recipe"] == "sparsify" else (1.0, 4.0))
        base = 2e-4 if r["recipe"] == "sparsify" else r["lr_factor"] * 8e-4
        assert r["lr"] == pytest.approx(base / math.sqrt(r["width"] / 16384))
        assert cfg["lr"] == pytest.approx(r["lr"])
        # Held-out FVU and dead latents: reconstruction_metrics on the same 1500 rows.
        assert r["heldout_rows"] == 1500
        rec = reconstruction_metrics(ck, _first_rows(acts, 1500))
        assert r["fvu_heldout"] == pytest.approx(rec["fvu"], rel=1e-9)
        assert r["dead_pct"] == pytest.approx(100 * rec["dead_frac"])
    assert bench.main(["--activations", str(synthetic_set), "--device", "cpu",
                       "--recipes", "nope"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


class _first_rows:
    """An activation set seen through its first ``n`` held-out rows."""

    def __init__(self, acts: ActivationSet, n: int) -> None:
        self.acts, self.n = acts, n
        self.d, self.meta, self.path = acts.d, acts.meta, acts.path

    def iter_shards(self, split):
        left = self.n
        for part in self.acts.iter_shards(split):
            if left <= 0:
                return
            yield {"x": part["x"][:left]}
            left -= len(part["x"][:left])
