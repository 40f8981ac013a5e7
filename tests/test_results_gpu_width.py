"""The committed width run (results-gpu/width/: MiniLM at 4 to 32 x d on a GPU) holds together:
the README quotes its T3 verbatim, T3 and the README's numbers agree with the per-run and
per-latent Parquet they come from (recomputed here with plain means), and the run is what
the width issue asks for (the three archs x 3 seeds at 12 288 latents, with dead %)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
WIDTH = ROOT / "results-gpu" / "width"

pytestmark = pytest.mark.skipif(not (WIDTH / "tables" / "T3.md").is_file(),
                                reason="no results-gpu/width/ in this checkout")


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _seed_pairs() -> pd.DataFrame:
    p = pd.read_parquet(WIDTH / "runs" / "pairs.parquet")
    return p[p["kind"] == "seed"]


def test_readme_quotes_t3_verbatim():
    body = "\n".join(line for line in (WIDTH / "tables" / "T3.md").read_text().splitlines()
                     if line.startswith("|"))
    readme = _readme()
    assert "**T3 at 32 × d** (`results-gpu/width/tables/T3.md`)" in readme
    assert body in readme, "README's T3 differs from results-gpu/width/tables/T3.md"


def test_the_run_has_the_three_archs_at_32_x_d_with_dead_fractions():
    runs = pd.read_parquet(WIDTH / "runs" / "runs.parquet")
    wide = runs[runs["width"] == 12288]
    assert sorted(wide["arch"].unique()) == ["isae", "isae-iter", "topk"]
    assert (wide.groupby("arch")["seed"].nunique() == 3).all()
    assert (wide["tokens"] >= 40_000_000).all()
    assert wide["dead_frac"].between(0, 1).all()
    assert re.search(r"commit: [0-9a-f]{40}; the run's copy matches the stamp",
                     (WIDTH / "RUN.md").read_text())
    assert (WIDTH / "figures" / "F9.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_t3_agrees_with_the_runs_and_pairs():
    t3 = pd.read_parquet(WIDTH / "tables" / "T3.parquet").set_index("arch")
    runs = pd.read_parquet(WIDTH / "runs" / "runs.parquet")
    pairs = _seed_pairs()
    for arch, row in t3.iterrows():
        r = runs[(runs["width"] == 12288) & (runs["arch"] == arch)]
        p = pairs[(pairs["width"] == 12288) & (pairs["arch_a"] == arch)]
        assert len(r) == 3 and len(p) == 3
        assert row["fvu_mean"] == pytest.approx(r["fvu"].mean(), rel=1e-9)
        assert row["dead_frac_mean"] == pytest.approx(100 * r["dead_frac"].mean(), rel=1e-9)
        assert row["live_mean_abs_cos_mean"] == pytest.approx(p["live_mean_abs_cos"].mean(), rel=1e-9)


def _cell(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def test_readme_width_table_is_the_runs():
    """Each row of the README's across-widths table: seed |cos| over all / live latents,
    held-out FVU and dead %, per arch, as the per-run tables give them."""
    runs = pd.read_parquet(WIDTH / "runs" / "runs.parquet")
    pairs = _seed_pairs()
    readme = _readme()
    for width in (1536, 3072, 6144, 12288):
        line = next(ln for ln in readme.splitlines() if ln.startswith(f"| {width:,}".replace(",", " ")))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        for arch, cell in zip(("topk", "isae", "isae-iter"), cells):
            r = runs[(runs["width"] == width) & (runs["arch"] == arch)]
            p = pairs[(pairs["width"] == width) & (pairs["arch_a"] == arch)]
            want = (f"{_cell(p['mean_abs_cos'].mean())} / {_cell(p['live_mean_abs_cos'].mean())}, "
                    f"{_cell(r['fvu'].mean())}, ")
            assert cell.startswith(want), (width, arch, cell, want)
            dead = 100 * r["dead_frac"].mean()
            shown = float(re.search(r", ([0-9.]+) %", cell).group(1))
            assert shown == pytest.approx(dead, abs=0.05 + 1e-9), (width, arch, cell)


def test_readme_dead_atom_numbers_are_the_latents_table():
    """isae-iter's latents dead in both seeds at 32 x d match each other across seeds: the
    README's count per seed pair, mean |cos| and share above 0.9, from the per-latent table."""
    lat = pd.read_parquet(WIDTH / "runs" / "latents.parquet")
    it = lat[(lat["width"] == 12288) & (lat["arch"] == "isae-iter")]
    both_dead = it[~it["live_a"] & ~it["live_b"]]
    n_pairs = it.groupby(["seed_a", "seed_b"]).ngroups
    readme = _readme()
    assert f"({round(len(both_dead) / n_pairs):,} per seed pair)".replace(",", " ") in readme
    assert f"|cos| {both_dead['abs_cos'].mean():.3f}" in readme
    assert f"{round(100 * (both_dead['abs_cos'] > 0.9).mean())} % of them above 0.9" in readme


def test_readme_noaux_numbers_are_the_followup_runs():
    """The README's numbers for isae-iter at 32 x d without AuxK, recomputed from the
    follow-up's own measure tables (plain means over its 3 seeds and 3 seed pairs)."""
    d = WIDTH / "isae-iter-noaux"
    runs = pd.read_parquet(d / "runs.parquet")
    pairs = pd.read_parquet(d / "pairs.parquet")
    assert sorted(runs["seed"]) == [0, 1, 2] and (runs["tokens"] >= 40_000_000).all()
    assert runs["converged"].all() and len(pairs) == 3
    readme = _readme()
    dead = 100 * runs["dead_frac"].mean()
    assert dead < 5  # the target, which the study's recipe missed (24.2 %)
    assert (f"{dead:.2f} % dead, held-out FVU {runs['fvu'].mean():.3f} (against 0.096), "
            "3/3 converged") in readme
    assert (f"live-latent stability {pairs['live_mean_abs_cos'].mean():.3f} (against 0.534), "
            f"{100 * pairs['live_frac_gt_0.9'].mean():.1f} % above 0.9") in readme


def test_the_cut_short_run_at_32_x_d_is_its_training_logs():
    """results-gpu/width/partial-twelfth/RUN.md's table (training FVU, convergence, the share
    of latents silent for 200 000 training rows at the end and at its peak), recomputed from
    the runs' own train_log.parquet and cfg.json."""
    import json

    d = WIDTH / "partial-twelfth"
    text = (d / "RUN.md").read_text()
    for arch in ("topk", "isae", "isae-iter", "isae-tied"):
        logs = sorted((d / "checkpoints" / "minilm" / "k16-w12288-r40000000" / arch).glob("seed*"))
        assert len(logs) == 3
        tables = [pd.read_parquet(s / "train_log.parquet") for s in logs]
        cfgs = [json.loads((s / "cfg.json").read_text()) for s in logs]
        assert all(c["arch"] == arch and c["d_sae"] == 12288 for c in cfgs)
        assert all(t["tokens"].iloc[-1] >= 40_000_000 for t in tables)
        final = sum(100 * t["dead_frac"].iloc[-1] for t in tables) / 3
        peak = sum(100 * t["dead_frac"].max() for t in tables) / 3
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{arch}`"))
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(final, abs=0.006 if final < 1 else 0.06), arch
        assert float(cells[4]) == pytest.approx(peak, abs=0.006 if peak < 10 else 0.06), arch
    summary = pd.read_parquet(d / "train_runs.parquet")
    assert (summary.groupby("arch")["converged"].sum() == 3).all()
