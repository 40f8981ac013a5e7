"""The committed width runs hold together: results-gpu/width/ (MiniLM at 4 to 32 x d on a GPU,
with TopK's budget axis at 32 x d) and results-gpu/width/fit-32/ (4 and 32 x d again with
isae-tied's AuxK fit, and the budget axis for isae and isae-iter). The README quotes the
second run's T3 verbatim; T3 and the README's numbers agree with the per-run and per-latent
Parquet they come from (recomputed here with plain means); each run is what the width issue
asks for (the four archs x 3 seeds at 12 288 latents, with dead %). The run the first
replaced (without the dead-latent fixes) is in before-fixes/."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
WIDTH = ROOT / "results-gpu" / "width"
FIT = WIDTH / "fit-32"

pytestmark = pytest.mark.skipif(not (FIT / "tables" / "T3.md").is_file(),
                                reason="no results-gpu/width/ in this checkout")


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _text() -> str:
    """The README with its line breaks as spaces: a quoted number may wrap."""
    return " ".join(_readme().split())


ARCHS = ("topk", "isae", "isae-iter", "isae-tied")


def _runs(run: Path = WIDTH) -> pd.DataFrame:
    """A run's width-axis runs (the budget axis at 32 x d adds other rows at 12 288)."""
    r = pd.read_parquet(run / "runs" / "runs.parquet")
    return r[r["width_axis"]]


def _seed_pairs(axis: bool = True, run: Path = WIDTH) -> pd.DataFrame:
    p = pd.read_parquet(run / "runs" / "pairs.parquet")
    p = p[p["kind"] == "seed"]
    return p[p["width_axis"]] if axis else p


def test_readme_quotes_t3_verbatim():
    body = "\n".join(line for line in (FIT / "tables" / "T3.md").read_text().splitlines()
                     if line.startswith("|"))
    readme = _readme()
    assert "**T3 at 32 × d** (`results-gpu/width/fit-32/tables/T3.md`)" in readme
    assert body in readme, "README's T3 differs from results-gpu/width/fit-32/tables/T3.md"


@pytest.mark.parametrize("run", [WIDTH, FIT], ids=["width", "fit-32"])
def test_each_run_has_the_four_archs_at_32_x_d_with_dead_fractions(run):
    runs = _runs(run)
    wide = runs[runs["width"] == 12288]
    assert sorted(wide["arch"].unique()) == sorted(ARCHS)
    assert (wide.groupby("arch")["seed"].nunique() == 3).all()
    assert (wide["tokens"] >= 40_000_000).all()
    assert wide["dead_frac"].between(0, 1).all()
    assert re.search(r"commit: [0-9a-f]{40}; the run's copy matches the stamp",
                     (run / "RUN.md").read_text())
    assert (run / "figures" / "F9.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_arch_keeps_its_latents_at_32_x_d_in_the_fit_run():
    """The width issue's target: at most 5 % of latents never fire on the held-out rows, for
    every architecture at 32 x d (the run with isae-tied's AuxK fit), and the README's
    dead % row of the verdict table is those numbers."""
    wide = _runs(FIT)
    wide = wide[wide["width"] == 12288]
    dead = 100 * wide.groupby("arch")["dead_frac"].mean()
    assert (dead <= 5).all(), dead
    text = _text()
    assert (f"TopK {dead['topk']:.1f} %, `isae` {dead['isae']:.2f} %, `isae-iter` "
            f"{dead['isae-iter']:.2f} % (AuxK off for it; 24.2 % with it), `isae-tied` "
            f"{dead['isae-tied']:.2f} % (AuxK's decode fitted; 40.6 % with detached codes)") in text
    n = (wide[wide["arch"] == "isae-tied"]["dead_frac"] * 12288).round()
    assert f"`isae-tied` {dead['isae-tied']:.2f} % ({int(n.iloc[0])} of 12 288 per seed)" in text \
        and n.nunique() == 1


def test_the_two_runs_agree_where_the_recipe_is_the_same():
    """topk, isae and isae-iter at 32 x d trained with the same recipe in both runs: the
    README's rerun spread (seed |cos| within 0.002, FVU within 0.001) is what they give."""
    a, b = _seed_pairs(run=WIDTH), _seed_pairs(run=FIT)
    ra, rb = _runs(WIDTH), _runs(FIT)
    def cos(p: pd.DataFrame, arch: str) -> float:
        return p[(p["width"] == 12288) & (p["arch_a"] == arch)]["mean_abs_cos"].mean()

    def fvu(r: pd.DataFrame, arch: str) -> float:
        return r[(r["width"] == 12288) & (r["arch"] == arch)]["fvu"].mean()

    for arch in ("topk", "isae", "isae-iter"):
        assert abs(cos(a, arch) - cos(b, arch)) <= 0.002 + 1e-9, arch
        assert abs(fvu(ra, arch) - fvu(rb, arch)) <= 0.001 + 1e-9, arch


def test_t3_agrees_with_the_runs_and_pairs():
    t3 = pd.read_parquet(FIT / "tables" / "T3.parquet").set_index("arch")
    runs = _runs(FIT)
    pairs = _seed_pairs(run=FIT)
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
    held-out FVU and dead %, per arch, as the per-run tables give them (up to 16 x d the
    first run's, at 32 x d the fit run's)."""
    readme = _readme()
    for width in (1536, 3072, 6144, 12288):
        run = FIT if width == 12288 else WIDTH
        runs, pairs = _runs(run), _seed_pairs(run=run)
        line = next(ln for ln in readme.splitlines() if ln.startswith(f"| {width:,}".replace(",", " ")))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == len(ARCHS)
        for arch, cell in zip(ARCHS, cells):
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
    README's count per seed pair, mean |cos| and share above 0.9, from the per-latent table
    of the run with AuxK on for it (before-fixes/)."""
    lat = pd.read_parquet(WIDTH / "before-fixes" / "runs" / "latents.parquet")
    it = lat[(lat["width"] == 12288) & (lat["arch"] == "isae-iter")]
    both_dead = it[~it["live_a"] & ~it["live_b"]]
    n_pairs = it.groupby(["seed_a", "seed_b"]).ngroups
    readme = _text()
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
    readme = _text()
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


def test_readme_budget_axis_at_32_x_d_is_the_runs():
    """The README's budget-axis table at 32 x d: seed |cos| (share above 0.9), held-out FVU
    and runs converged at 20, 40 and 80 M tokens, TopK's from the first run, isae's and
    isae-iter's from the fit run; every arch still rising, the order the same."""
    text = _text()
    cos_at = {}
    for arch, run in (("topk", WIDTH), ("isae-iter", FIT), ("isae", FIT)):
        runs = pd.read_parquet(run / "runs" / "runs.parquet")
        pairs = _seed_pairs(axis=False, run=run)
        r = runs[(runs["width"] == 12288) & (runs["arch"] == arch)]
        p = pairs[(pairs["width"] == 12288) & (pairs["arch_a"] == arch)]
        assert sorted(r["rows"].unique()) == [20_000_000, 40_000_000, 80_000_000], arch
        cos = p.groupby("rows")["mean_abs_cos"].mean()
        above = p.groupby("rows")["frac_gt_0.9"].mean()
        fvu = r.groupby("rows")["fvu"].mean()
        conv = r.groupby("rows")["converged"].sum()
        cells = [f"{cos[b]:.3f} ({100 * above[b]:.1f} %), {fvu[b]:.3f}, {conv[b]}/3"
                 for b in (20e6, 40e6, 80e6)]
        assert f"| `{arch}` | {' | '.join(cells)} |" in text, arch
        assert cos.is_monotonic_increasing, arch  # still moving: the README says so
        cos_at[arch] = cos
    for b in (20e6, 40e6, 80e6):
        assert cos_at["topk"][b] > cos_at["isae-iter"][b] > cos_at["isae"][b]
    # F7 with TopK's axis from the first run beside the others', and F9 with the first
    # run's 8 and 16 x d beside the fit run's widths.
    for name in ("F7-combined.png", "F9-combined.png"):
        assert (FIT / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_isae_tied_dead_fractions_are_the_runs():
    """isae-tied's dead % per width and its live-latent stability at 32 x d, as quoted."""
    runs = _runs()
    pairs = _seed_pairs()
    tied = runs[runs["arch"] == "isae-tied"].groupby("width")["dead_frac"].mean() * 100
    p = pairs[(pairs["arch_a"] == "isae-tied") & (pairs["width"] == 12288)]
    text = _text()
    assert (f"`isae-tied` (untied `isae`) lost {tied[12288]:.1f} % of its latents at 32 × d in "
            f"the first run** ({tied[6144]:.1f} % at 16 × d, {tied[3072]:.2f} % at 8 × d, none "
            "at 4 × d)") in text
    assert tied[1536] == 0 and tied[12288] > 5  # the target the detached recipe missed
    fit_runs = _runs(FIT)
    fit_pairs = _seed_pairs(run=FIT)
    r = fit_runs[(fit_runs["arch"] == "isae-tied") & (fit_runs["width"] == 12288)]
    q = fit_pairs[(fit_pairs["arch_a"] == "isae-tied") & (fit_pairs["width"] == 12288)]
    runs_b = runs[(runs["arch"] == "isae-tied") & (runs["width"] == 12288)]
    live_share = round(100 * p["live_n_matched"].mean() / 12288)
    assert (f"{100 * r['dead_frac'].mean():.2f} % dead against {tied[12288]:.1f} %, held-out FVU "
            f"{r['fvu'].mean():.3f} against {runs_b['fvu'].mean():.3f}, {int(r['converged'].sum())}/3 "
            f"converged, and seed |cos| {q['mean_abs_cos'].mean():.3f} over all latents against "
            f"{p['mean_abs_cos'].mean():.3f} ({p['live_mean_abs_cos'].mean():.3f} over the "
            f"{live_share} % of latents that had stayed alive)") in text
