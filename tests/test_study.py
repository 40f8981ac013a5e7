"""The study's aggregation (isae.study.tables) and figures (isae.study.figures).

Small hand-made tables with answers computed by hand or by the standard library, never by
the code under test.
"""

from __future__ import annotations

import math
import runpy
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from isae.errors import UserError
from isae.study import figures, plan, tables
from isae.study.tables import Metric

ROOT = Path(__file__).resolve().parents[1]

M = [Metric("x", "x", "$x$", digits=3)]


def _runs(values: dict, grid: str = "main", k: int = 8, width: int = 64) -> pd.DataFrame:
    """{(dataset, arch): [v_seed0, v_seed1, ...]} -> a per-run table with column x."""
    rows = []
    for (ds, arch), vs in values.items():
        for seed, v in enumerate(vs):
            rows.append(dict(dataset=ds, arch=arch, k=k, width=width, seed=seed, x=v,
                             main=grid == "main", sweep=grid == "sweep",
                             ablation=grid == "ablation"))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- mean ± sd


def test_mean_sd_matches_hand_computation():
    df = _runs({("syn", "topk"): [0.1, 0.2, 0.4], ("syn", "isae"): [0.5]})
    out = tables.mean_sd(df, M).set_index("arch")
    # mean 0.7/3; deviations -2/15, -1/30, 1/6; sum of squares 7/150; / (n-1) = 7/300.
    assert out.loc["topk", "x_mean"] == pytest.approx(0.7 / 3, abs=1e-15)
    assert out.loc["topk", "x_sd"] == pytest.approx(math.sqrt(7 / 300), abs=1e-15)
    assert out.loc["topk", "x_sd"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.4]))
    assert out.loc["topk", "x_n"] == 3
    # One seed: the sample sd is undefined, not 0.
    assert out.loc["isae", "x_mean"] == 0.5
    assert math.isnan(out.loc["isae", "x_sd"])
    assert out.loc["isae", "x_n"] == 1


def test_mean_sd_ignores_nan_and_scales():
    df = _runs({("syn", "topk"): [0.01, float("nan"), 0.03]})
    out = tables.mean_sd(df, [Metric("x", "x %", "x", digits=1, scale=100.0)])
    assert out["x_mean"][0] == pytest.approx(2.0)
    assert out["x_sd"][0] == pytest.approx(statistics.stdev([1.0, 3.0]))
    assert out["x_n"][0] == 2


def test_mean_sd_missing_column_is_an_error_unless_optional():
    df = _runs({("syn", "topk"): [1.0, 2.0]})
    with pytest.raises(UserError, match="nope"):
        tables.mean_sd(df, [Metric("nope", "n", "n")])
    out = tables.mean_sd(df, [Metric("nope", "n", "n", optional=True)])
    assert math.isnan(out["nope_mean"][0]) and out["nope_n"][0] == 0


def test_summarize_outer_joins_and_orders_archs():
    a = _runs({("syn", "isae"): [1.0, 3.0], ("syn", "topk"): [2.0, 2.0]})
    b = a[a["arch"] == "topk"].rename(columns={"x": "y"})
    t = tables.summarize([(a, M), (b, [Metric("y", "y", "y")])])
    assert list(t["arch"]) == ["topk", "isae"]  # ARCH_ORDER, not alphabetical
    assert t.set_index("arch").loc["isae", "y_n"] == 0
    assert math.isnan(t.set_index("arch").loc["isae", "y_mean"])
    assert t.set_index("arch").loc["isae", "x_mean"] == 2.0


def _group_runs(values: dict, **cols) -> pd.DataFrame:
    """{(dataset, arch): [x_seed0, x_seed1, ...]} -> a runs table of the main grid."""
    rows = []
    for (ds, arch), vs in values.items():
        for seed, v in enumerate(vs):
            rows.append(dict(dataset=ds, arch=arch, k=8, width=64, rows=1000, seed=seed,
                             main=True, sweep=seed == 0, budget=False, ablation=False,
                             iter=False, **{c: f(seed, v) for c, f in cols.items()}))
    return pd.DataFrame(rows)


def test_t1_uses_main_grid_only_and_reads_pairs_and_chance():
    runs = _group_runs({("syn", "topk"): [0.2, 0.4, 0.3]},
                       mse_per_dim=lambda s, v: v, fvu=lambda s, v: v, l0=lambda s, v: 8.0,
                       dead_frac=lambda s, v: [0.0, 0.5, 0.25][s], lr=lambda s, v: 4e-3,
                       converged=lambda s, v: s != 1, fvu_trend=lambda s, v: 0.01 * s,
                       init_abs_cos=lambda s, v: 0.5, truth_abs_cos=lambda s, v: 0.6)
    extra = runs.iloc[[0]].assign(main=False, ablation=True, mse_per_dim=100.0)
    runs = pd.concat([runs, extra], ignore_index=True)
    pairs = pd.DataFrame(dict(
        dataset="syn", kind=["seed", "seed", "seed", "arch", "arch"],
        arch_a=["topk", "topk", "topk", "topk", "isae"], arch_b=["topk", "topk", "topk", "isae", "topk"],
        seed_a=[0, 0, 1, 0, 1], seed_b=[1, 2, 2, 0, 1], k=8, width=64, rows=1000,
        mean_abs_cos=[0.5, 0.6, 0.7, 0.9, 0.8], **{"frac_gt_0.9": [0.0, 0.1, 0.2, 0.5, 0.4]},
        main=True, ablation=False))
    chance = pd.DataFrame(dict(dataset="syn", width=64, kind=["gaussian", "gaussian", "data_rows"],
                               target=["seed", "seed", "truth"], draw=[0, 1, 0],
                               mean_abs_cos=[0.30, 0.32, 0.45]))
    t = tables.table_t1(runs, pairs, chance)
    assert list(t["arch"]) == ["topk", "isae"]  # isae: from its same-seed pairs only
    r = t.iloc[0]
    assert r["mse_per_dim_mean"] == pytest.approx(0.3)  # the ablation row is left out
    assert r["dead_frac_mean"] == pytest.approx(25.0)  # percent
    assert r["converged_mean"] == pytest.approx(2 / 3) and r["converged_n"] == 3
    assert r["not_converged"]
    # Seed pairs: mean and range over the three pairs.
    assert r["mean_abs_cos_mean"] == pytest.approx(0.6) and r["mean_abs_cos_n"] == 3
    assert (r["mean_abs_cos_min"], r["mean_abs_cos_max"]) == (0.5, 0.7)
    # Same-seed pairs with another arch count for both members.
    assert r["arch_abs_cos_mean"] == pytest.approx(0.85) and r["arch_abs_cos_n"] == 2
    assert r["chance_gaussian_mean"] == pytest.approx(0.31)
    assert r["chance_truth_data_rows_mean"] == pytest.approx(0.45)
    assert math.isnan(r["chance_data_cov_mean"])
    md = tables.to_markdown(t, tables.T1_METRICS)
    assert "| syn | topk † |" in md and "| 2/3 |" in md and "0.600 [0.500, 0.700]" in md
    assert "| 0.004 |" in md  # the learning rate, 2 significant digits
    # A rate the sweep chose at its grid's edge is marked; one inside it is not.
    sweep = pd.DataFrame(dict(dataset="syn", arch="topk", factor=[0.25, 1.0, 4.0],
                              chosen=[False, False, True]))
    t = tables.table_t1(runs, pairs, chance, lr=sweep)
    assert t["lr_at_edge"].tolist() == [True, False]
    assert "| 0.004 ‡ |" in tables.to_markdown(t, tables.T1_METRICS)
    inside = tables.table_t1(runs, pairs, chance, lr=sweep.assign(chosen=[False, True, False]))
    assert "‡" not in tables.to_markdown(inside, tables.T1_METRICS).split("\n", 2)[2]


def test_t1_trained_references_beside_chance_and_hidden_when_absent():
    runs = _group_runs({("syn", "topk"): [0.2, 0.4, 0.3], ("syn", "isae"): [0.1, 0.1, 0.1]},
                       mse_per_dim=lambda s, v: v, fvu=lambda s, v: v, l0=lambda s, v: 8.0,
                       dead_frac=lambda s, v: 0.0, lr=lambda s, v: 4e-3,
                       converged=lambda s, v: True, fvu_trend=lambda s, v: 0.0,
                       init_abs_cos=lambda s, v: 0.5)
    seed = dict(kind="seed", k=8, width=64, rows=1000)
    main = dict(seed, main=True, null=False)
    pairs = pd.DataFrame([dict(dataset="syn", arch_a="topk", arch_b="topk", seed_a=0, seed_b=1,
                               mean_abs_cos=0.8, **{"frac_gt_0.9": 0.1}, **main)])
    # The null group's seed pairs (flagged null by the collect rule), and a same-seed arch
    # pair there, which is no reference ...
    null = dict(seed, main=False, null=True)
    null_pairs = pd.DataFrame([
        dict(dataset="syn", arch_a="topk", arch_b="topk", seed_a=a, seed_b=b,
             mean_abs_cos=v, **null) for a, b, v in [(0, 1, 0.2), (0, 2, 0.3), (1, 2, 0.4)]]
        + [dict(dataset="syn", arch_a="topk", arch_b="isae", seed_a=0, seed_b=0,
                mean_abs_cos=0.9, **dict(null, kind="arch"))])
    all_pairs = pd.concat([pairs, null_pairs], ignore_index=True)
    # ... and the halves' same-seed matches, the split_pairs rule's collected table.
    split = pd.DataFrame(dict(dataset="syn", arch="isae", seed=[0, 1], k=8, width=64,
                              rows=1000, mean_abs_cos=[0.6, 0.7]))
    refs = tables.reference_rows(all_pairs, split)
    assert sorted(zip(refs["reference"], refs["arch"], refs["mean_abs_cos"])) == [
        ("null", "topk", 0.2), ("null", "topk", 0.3), ("null", "topk", 0.4),
        ("split", "isae", 0.6), ("split", "isae", 0.7)]
    for t in (tables.table_t1(runs, all_pairs, refs=refs),
              tables.table_t1(runs, all_pairs, split=split)):  # the same, from the tables
        t = t.set_index("arch")
        assert t.loc["topk", "null_abs_cos_mean"] == pytest.approx(0.3)
        assert (t.loc["topk", "null_abs_cos_min"], t.loc["topk", "null_abs_cos_max"]) == (0.2, 0.4)
        assert t.loc["isae", "split_abs_cos_mean"] == pytest.approx(0.65)
        assert t.loc["topk", "split_abs_cos_n"] == 0 and t.loc["isae", "null_abs_cos_n"] == 0
        # The null's pairs are no seed pairs of the main grid.
        assert t.loc["topk", "mean_abs_cos_mean"] == pytest.approx(0.8)
        assert t.loc["topk", "mean_abs_cos_n"] == 1
    labels = [m.label for m in tables.shown_metrics(t.reset_index(), tables.T1_METRICS)]
    assert labels.index("trained null |cos|") == labels.index("chance iso") + 1
    assert "split-data |cos|" in labels
    # Without references the two columns are not rendered at all.
    bare = tables.table_t1(runs, pairs)
    assert tables.reference_rows(pairs).empty
    assert "trained null |cos|" not in tables.to_markdown(
        bare, tables.shown_metrics(bare, tables.T1_METRICS))


def test_t2_shows_the_largest_delta_beside_the_median():
    runs = _group_runs({("syn", "isae"): [0.3, 0.5]}, **{
        c: (lambda s, v: v) for c in ("ric_observed_q50", "ric_observed_q90",
                                       "ric_observed_lower_q50", "ric_observed_upper_q50",
                                       "ric_observed_frac_singular", "ric_observed_frac_lt_1/3",
                                       "ric_observed_frac_lt_sqrt2-1", "ric_random_support_q50",
                                       "ric_gaussian_q50", "ric_dict_dup_frac")},
        ric_observed_max=lambda s, v: [0.9, 1.3][s])
    pairs = pd.DataFrame([dict(dataset="syn", kind="seed", arch_a="isae", arch_b="isae",
                               seed_a=0, seed_b=1, k=8, width=64, main=True, code_pearson_all=0.5,
                               code_jaccard=0.5, code_rel_dist=0.5)])
    t = tables.table_t2(runs, pairs)
    assert t["ric_observed_max_mean"][0] == pytest.approx(1.1)
    header = tables.to_markdown(t, tables.T2_METRICS).splitlines()[0]
    cols = [c.strip() for c in header.split("|")]
    assert cols.index("δ max (≤ δ_2k)") == cols.index("δ median") + 1
    assert cols.index("frac δ<1/3") == cols.index("δ median") + 2


def test_sensitivity_gives_neighbours_and_marks_the_edge():
    table = pd.DataFrame({
        "arch": ["a"] * 3 + ["b"] * 3,
        "factor": [4.0, 0.25, 1.0] * 2,  # unsorted on purpose
        "lr": [4.0, 0.25, 1.0] * 2,
        "heldout_fvu": [0.10, 0.30, 0.20, 0.30, 0.10, 0.20],
        "seed_abs_cos": [0.7, 0.5, 0.6, 0.4, 0.9, 0.8],
    })
    table["within_tolerance"] = table["heldout_fvu"] < 0.15
    table["chosen"] = table["within_tolerance"]
    s = tables.lr_sensitivity(table).set_index("arch")
    # a: 4x, the grid's top: no factor above, the neighbour below is 1x.
    assert s.loc["a", "factor"] == 4.0 and s.loc["a", "at_edge"]
    assert (s.loc["a", "factor_below"], s.loc["a", "heldout_fvu_below"],
            s.loc["a", "seed_abs_cos_below"]) == (1.0, 0.20, 0.6)
    assert math.isnan(s.loc["a", "factor_above"]) and math.isnan(s.loc["a", "heldout_fvu_above"])
    # b: 0.25x, the bottom edge.
    assert s.loc["b", "at_edge"] and s.loc["b", "heldout_fvu_above"] == 0.20
    assert s.loc["b", "seed_abs_cos"] == 0.9 and s.loc["b", "tied"] == "0.25"
    inner = table.assign(chosen=table["factor"] == 1.0, within_tolerance=table["factor"] == 1.0)
    s = tables.lr_sensitivity(inner).set_index("arch")
    assert not s["at_edge"].any()
    assert (s.loc["a", "heldout_fvu_below"], s.loc["a", "heldout_fvu_above"]) == (0.30, 0.10)


def test_lr_table_renders_every_choice_with_its_neighbours():
    lr = pd.DataFrame({
        "dataset": ["syn"] * 6 + ["lm"] * 3,
        "arch": ["isae-iter"] * 3 + ["topk"] * 3 + ["topk"] * 3,
        "factor": [1.0, 4.0, 16.0] * 3,
        "lr": [1e-3, 4e-3, 1.6e-2] * 3,
        "heldout_fvu": [0.09, 0.08, 0.07, 0.2, 0.1, 0.3, 0.11, 0.1, math.inf],
    })
    lr["chosen"] = [False, False, True, False, True, False, False, True, False]
    lr["within_tolerance"] = lr["chosen"]
    t = tables.table_lr(lr)
    # Datasets in order of appearance, presets in ARCH_ORDER within each.
    assert list(zip(t["dataset"], t["arch"])) == [("syn", "topk"), ("syn", "isae-iter"),
                                                  ("lm", "topk")]
    md = tables.lr_markdown(t, tables.LR_CAPTION)
    rows = [line for line in md.splitlines() if line.startswith("| syn") or line.startswith("| lm")]
    assert rows[0] == ("| syn | topk | 4× (0.004) | 0.1000 | 0.2000 (1×) | 0.3000 (16×) | — | "
                       "— (1×) | — (16×) | 4 | no |")
    # At the top edge: nothing above, marked.
    assert "| 0.0700 | 0.0800 (4×) | — (edge) |" in rows[1] and rows[1].endswith("| **yes** |")
    # A diverged neighbour shows no number.
    assert "| — (16×) |" in rows[2]
    assert "closest to 1×" in md


def test_collect_groups_tags_grids_and_pairs_need_both_runs(tmp_path):
    runs = pd.DataFrame(dict(arch=["topk", "topk", "isae"], seed=[0, 1, 0], fvu=[0.1, 0.2, 0.3]))
    pairs = pd.DataFrame(dict(kind=["seed", "arch"], arch_a=["topk", "topk"],
                              arch_b=["topk", "isae"], seed_a=[0, 0], seed_b=[1, 0],
                              mean_abs_cos=[0.5, 0.9]))
    runs.to_parquet(tmp_path / "runs.parquet")
    pairs.to_parquet(tmp_path / "pairs.parquet")
    flags = [dict(dataset="syn", group="g", arch=a, seed=s, k=8, width=64, rows=1000,
                  main=m, sweep=False, budget=b, ablation=False, iter=False)
             for a, s, m, b in [("topk", 0, True, True), ("topk", 1, True, False),
                                ("isae", 0, False, True)]]
    ids = [dict(dataset="syn", group="g")]
    r = tables.collect_groups([tmp_path / "runs.parquet"], ids, flags, "runs")
    assert r["main"].tolist() == [True, True, False] and r["budget"].tolist() == [True, False, True]
    assert r["rows"].tolist() == [1000] * 3 and r["dataset"].tolist() == ["syn"] * 3
    p = tables.collect_groups([tmp_path / "pairs.parquet"], ids, flags, "pairs")
    assert p["main"].tolist() == [True, False]  # isae seed 0 is not in the main grid
    assert p["budget"].tolist() == [False, True]
    # A run that no grid asked for (trained because its group trains archs x seeds).
    r2 = tables.collect_groups([tmp_path / "runs.parquet"], ids, flags[:1], "runs")
    assert r2["main"].tolist() == [True, False, False]


# ----------------------------------------------------------------------------- rendering


def test_format_cell():
    assert tables.format_cell(0.23333, 0.15275, 3) == "0.233 ± 0.153"
    assert tables.format_cell(0.5, float("nan"), 2) == "0.50"
    assert tables.format_cell(float("nan"), float("nan"), 2) == "—"
    assert tables.format_cell(0.6, 0.1, 2, spread="range", lo=0.5, hi=0.7, n=3) == "0.60 [0.50, 0.70]"
    assert tables.format_cell(0.6, float("nan"), 2, spread="range", lo=0.6, hi=0.6, n=1) == "0.60"
    assert tables.format_cell(2 / 3, 0.5, 2, spread="count", n=3) == "2/3"
    assert tables.format_cell(0.0064, 0.001, 2, spread="none", fmt="g") == "0.0064"


def test_markdown_rendering_exact():
    df = _runs({("syn", "topk"): [0.1, 0.2, 0.4], ("syn", "isae"): [0.5]})
    t = tables.summarize([(df, M)])
    md = tables.to_markdown(t, M)
    assert md == (
        "| dataset | arch | k | width | x |\n"
        "|:---|:---|---:|---:|---:|\n"
        "| syn | topk | 8 | 64 | 0.233 ± 0.153 |\n"
        "| syn | isae | 8 | 64 | 0.500 |\n"
    )


def test_markdown_escapes_pipes_in_headers_and_keeps_columns():
    df = _runs({("syn", "topk"): [0.5, 0.7]})
    metrics = [Metric("x", "seed |cos|", "x"), Metric("x", "x again", "x", name="y")]
    md = tables.to_markdown(tables.summarize([(df, metrics)]), metrics)
    assert r"seed \|cos\|" in md
    # Unescaped pipes delimit cells: every row has the same number of them.
    counts = {line.replace(r"\|", "").count("|") for line in md.strip().splitlines()}
    assert counts == {7}


def test_latex_rendering():
    df = _runs({("my_set", "topk"): [0.1, 0.2, 0.4]})
    metrics = [Metric("x", "x", r"$x$"), Metric("y", "y", r"dead \%", optional=True)]
    tex = tables.to_latex(tables.summarize([(df, metrics)]), metrics, caption="50% done",
                          label="tab:t")
    assert r"\begin{tabular}{llrrrr}" in tex
    assert r"my\_set & topk & 8 & 64 & $0.233 \pm 0.153$ & -- \\" in tex
    assert r"\caption{50\% done}" in tex and r"\label{tab:t}" in tex
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 1


def test_collect_tags_filters_and_overrides(tmp_path):
    a = pd.DataFrame({"abs_cos": [0.9, 0.1, 0.5], "matched": [True, False, True],
                      "arch": ["WRONG"] * 3})
    b = pd.DataFrame({"abs_cos": [0.7], "matched": [True], "arch": ["WRONG"]})
    a.to_parquet(tmp_path / "a.parquet")
    b.to_parquet(tmp_path / "b.parquet")
    ids = [dict(dataset="syn", arch="topk", seed_a=0, seed_b=1),
           dict(dataset="syn", arch="isae", seed_a=0, seed_b=1)]
    out = tables.collect([tmp_path / "a.parquet", tmp_path / "b.parquet"], ids,
                         columns=["abs_cos"], where="matched")
    assert list(out.columns) == ["dataset", "arch", "seed_a", "seed_b", "abs_cos"]
    assert list(out["arch"]) == ["topk", "topk", "isae"]
    assert list(out["abs_cos"]) == [0.9, 0.5, 0.7]
    with pytest.raises(UserError):
        tables.collect([tmp_path / "a.parquet"], [])
    assert tables.collect([], []).empty


# ----------------------------------------------------------------------------- ablation


def test_ablation_base():
    assert figures.ablation_base("topk+signed") == ("topk", "+signed")
    assert figures.ablation_base("isae-tied") == ("isae", "-tied")
    assert figures.ablation_base("isae-iter") is None  # a preset, not a variant
    assert figures.ablation_base("isae-iter-tied") == ("isae-iter", "-tied")
    assert figures.ablation_base("topk") is None


def _abl(values: dict, col: str) -> pd.DataFrame:
    rows = []
    for arch, vs in values.items():
        for seed, v in enumerate(vs):
            rows.append(dict(dataset="syn", arch=arch, k=8, width=64, seed=seed, ablation=True,
                             main=False, **{col: v}))
    return pd.DataFrame(rows)


def test_ablation_deltas_hand_computed():
    runs = _abl({"topk": [0.30, 0.50], "topk+signed": [0.20, 0.20], "isae": [0.10, 0.30],
                 "isae-tied": [0.40]}, "fvu")
    pairs = pd.DataFrame(dict(dataset="syn", kind="seed", arch_a=["topk", "topk+signed"],
                              arch_b=["topk", "topk+signed"], k=8, width=64, seed_a=0, seed_b=1,
                              mean_abs_cos=[0.4, 0.7], ablation=True, main=False))
    d = figures.ablation_deltas(runs, pairs).set_index(["variant", "metric"])
    r = d.loc[("topk+signed", "fvu")]
    assert r["base"] == "topk" and r["change"] == "+signed"
    assert r["delta"] == pytest.approx(0.20 - 0.40)
    # se = sqrt(var_v / 2 + var_b / 2) = sqrt(0 + 0.02 / 2)
    assert r["se"] == pytest.approx(math.sqrt(0.02 / 2))
    np.testing.assert_allclose(r["values"], [-0.2, -0.2])
    assert d.loc[("topk+signed", "seed_abs_cos"), "delta"] == pytest.approx(0.3)
    assert math.isnan(d.loc[("topk+signed", "seed_abs_cos"), "se"])  # pairs: no se
    assert d.loc[("isae-tied", "fvu"), "delta"] == pytest.approx(0.40 - 0.20)
    assert math.isnan(d.loc[("isae-tied", "fvu"), "se"])  # one seed: no whisker
    assert ("isae-tied", "seed_abs_cos") not in d.index  # no pair for a single seed
    # The whole combination: isae against topk.
    c = d.loc[("isae", "fvu")]
    assert c["base"] == "topk" and "combined" in c["change"]
    assert c["delta"] == pytest.approx(0.20 - 0.40)
    assert ("topk", "fvu") not in d.index


def test_budget_curves_hand_computed():
    runs = pd.DataFrame(dict(dataset="syn", arch="topk", rows=[100, 100, 1000, 1000],
                             seed=[0, 1, 0, 1], fvu=[0.5, 0.3, 0.2, 0.2],
                             converged=[False, True, True, True], budget=True))
    pairs = pd.DataFrame(dict(dataset="syn", kind="seed", arch_a="topk", arch_b="topk",
                              rows=[100, 1000], seed_a=0, seed_b=1, mean_abs_cos=[0.3, 0.6],
                              budget=True))
    d = figures.budget_curves(runs, pairs).set_index(["rows", "metric"])
    r = d.loc[(100, "fvu")]
    assert r["mean"] == pytest.approx(0.4) and r["sd"] == pytest.approx(math.sqrt(0.02))
    assert r["n"] == 2 and not r["converged"]
    assert d.loc[(1000, "fvu"), "converged"] and d.loc[(1000, "fvu"), "sd"] == 0
    assert d.loc[(1000, "seed_abs_cos"), "mean"] == 0.6 and d.loc[(1000, "seed_abs_cos"), "n"] == 1
    assert (1000, "truth_abs_cos") not in d.index


def test_budget_curves_and_f7_keep_the_widths_of_one_dataset_apart():
    runs = pd.DataFrame(dict(dataset="lm", arch="topk", width=[8, 8, 8, 8, 64, 64, 64, 64, 2, 2],
                             rows=[100, 100, 400, 400, 100, 100, 400, 400, 100, 100],
                             seed=[0, 1] * 5, fvu=[0.5, 0.3, 0.4, 0.2, 0.2, 0.1, 0.1, 0.1, 0.9, 0.8],
                             converged=True, budget=True))
    pairs = pd.DataFrame(dict(dataset="lm", kind="seed", arch_a="topk", arch_b="topk",
                              width=[8, 8, 64, 64, 2], rows=[100, 400, 100, 400, 100],
                              seed_a=0, seed_b=1, mean_abs_cos=[0.3, 0.4, 0.6, 0.7, 0.1],
                              budget=True))
    d = figures.budget_curves(runs, pairs).set_index(["width", "rows", "metric"])
    assert d.loc[(8, 100, "fvu"), "mean"] == pytest.approx(0.4)
    assert d.loc[(64, 100, "fvu"), "mean"] == pytest.approx(0.15)
    assert d.loc[(64, 400, "seed_abs_cos"), "mean"] == 0.7
    fig = figures.f7_budget(runs, pairs)
    titles = {ax.get_title() for ax in fig.axes if ax.get_title()}
    assert any(t.startswith("lm · 8 latents") for t in titles)
    assert any(t.startswith("lm · 64 latents") for t in titles)
    # A width with one budget is no axis: no panel for it.
    assert not any(t.startswith("lm · 2 latents") for t in titles)
    figures.plt.close(fig)
    one = figures.f7_budget(runs[runs["width"] == 2], pairs[pairs["width"] == 2])
    assert any("no budget axis" in t.get_text() for ax in one.axes for t in ax.texts)
    figures.plt.close(one)


def test_iter_steps_and_curves():
    assert figures.iter_steps("isae-iter") == ("isae", 3)
    assert figures.iter_steps("topk+iter10") == ("topk", 10)
    assert figures.iter_steps("isae+iter1") == ("isae", 1)
    assert figures.iter_steps("topk") == ("topk", 0)
    assert figures.iter_steps("topk+signed") is None
    assert figures.iter_steps("topk+signed+iter") is None
    assert figures.iter_steps("dl") is None and figures.iter_steps("isae-iter+iter10") is None
    runs = pd.DataFrame(dict(dataset="syn", arch=["isae", "isae", "isae-iter", "isae+iter10"],
                             seed=[0, 1, 0, 0], fvu=[0.4, 0.6, 0.3, 0.25],
                             encode_flops=[10.0, 10.0, 40.0, 110.0], converged=True, iter=True))
    d = figures.iter_curves(runs, pd.DataFrame()).set_index(["steps", "metric"])
    assert d.loc[(0, "fvu"), "mean"] == pytest.approx(0.5) and d.loc[(0, "fvu"), "n"] == 2
    assert d.loc[(3, "encode_flops"), "mean"] == 40.0 and d.loc[(10, "fvu"), "mean"] == 0.25


# ----------------------------------------------------------------------------- figures


def _labelled(fig) -> None:
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip(), "x axis without a label"
        assert ax.get_ylabel().strip(), "y axis without a label"
    assert fig._suptitle is not None and fig._suptitle.get_text().startswith("F")


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    runs = []
    for ds in ("syn", "lm"):
        for arch in ("topk", "isae", "isae-iter"):
            for k in (4, 8, 16):
                for rows in ((100, 1000) if k == 8 else (1000,)):
                    for seed in ((0, 1) if k == 8 else (0,)):
                        runs.append(dict(dataset=ds, arch=arch, k=k, width=64, rows=rows,
                                         seed=seed, main=k == 8 and rows == 1000,
                                         sweep=seed == 0 and rows == 1000, budget=k == 8,
                                         ablation=False, iter=False))
    for arch in ("topk+signed", "isae-tied", "isae+iter1"):
        for seed in (0, 1):
            runs.append(dict(dataset="syn", arch=arch, k=8, width=64, rows=1000, seed=seed,
                             main=False, sweep=False, budget=False, ablation=arch != "isae+iter1",
                             iter=arch == "isae+iter1"))
    runs = pd.DataFrame(runs)
    main8 = (runs["k"] == 8) & (runs["rows"] == 1000)
    runs.loc[runs["arch"].isin(["topk", "isae"]) & main8 & (runs["dataset"] == "syn"), "ablation"] = True
    runs.loc[runs["arch"].isin(["isae", "isae-iter"]) & main8 & (runs["dataset"] == "syn"), "iter"] = True
    n = len(runs)
    runs = runs.assign(mse_per_dim=rng.uniform(0.1, 0.5, n), fvu=rng.uniform(0.1, 0.5, n),
                       l0=runs["k"].astype(float), dead_frac=0.0, converged=rng.random(n) < 0.7,
                       encode_flops=1e4 * (1 + runs["arch"].str.contains("iter")),
                       truth_abs_cos=np.where(runs["dataset"] == "syn", rng.uniform(0.3, 0.9, n),
                                              np.nan))
    for side in ("lower", "upper"):
        for kind in ("observed", "random_support", "gaussian", "mp", "truth"):
            runs[f"ric_{kind}_{side}_q50"] = rng.uniform(0.2, 1.0, n)
    pairs = (runs[runs["seed"] == 0].drop(columns="seed")
             .merge(runs[runs["seed"] == 1][["dataset", "arch", "k", "width", "rows"]])
             .assign(seed_a=0, seed_b=1, kind="seed"))
    pairs["arch_a"] = pairs["arch_b"] = pairs["arch"]
    pairs["mean_abs_cos"] = rng.uniform(0.3, 0.9, len(pairs))
    latents = pairs[pairs["main"]].loc[lambda d: d.index.repeat(20)].assign(
        abs_cos=lambda d: rng.uniform(0, 1, len(d)))
    chance = pd.DataFrame([dict(dataset=ds, width=64, kind=kind, target="seed", draw=0,
                                mean_abs_cos=v) for ds in ("syn", "lm")
                           for kind, v in (("gaussian", 0.2), ("data_cov", 0.3), ("data_rows", 0.4))])
    fid = runs[runs["sweep"] & (runs["dataset"] == "lm")].assign(
        frac_recovered_zero=0.9, frac_recovered_mean=0.8, kind="encoder")
    return dict(runs=runs, pairs=pairs, latents=latents, chance=chance, fid=fid)


def test_figures_have_labelled_axes(frames, tmp_path):
    f = frames
    made = [
        figures.f1_stability(f["latents"], f["pairs"], f["runs"], f["chance"]),
        figures.f2_truth_recovery(f["runs"], {"syn": 8}),
        figures.f3_ric(f["runs"]),
        figures.f4_ablation(f["runs"], f["pairs"]),
        figures.f5_fvu_l0(f["runs"]),
        figures.f6_fidelity(f["fid"], f["runs"]),
        figures.f7_budget(f["runs"], f["pairs"], f["chance"]),
        figures.f8_iter(f["runs"], f["pairs"]),
    ]
    for fig in made:
        _labelled(fig)
        # Every figure has a legend, below the panels.
        assert fig.legends, "no legend"
    # F1: one panel per dataset, one violin per arch of the main grid, its pair count.
    assert len(made[0].axes) == 2
    labels = [t.get_text() for t in made[0].axes[0].get_xticklabels()]
    assert [lab.split("\n")[0].rstrip(" †") for lab in labels] == ["topk", "isae", "isae-iter"]
    assert all(lab.endswith("1 pair") for lab in labels)
    # F3: both thresholds are drawn, on both sides.
    for ax in made[2].axes[:2]:
        ys = {round(line.get_ydata()[0], 6) for line in ax.lines if len(set(line.get_ydata())) == 1}
        assert round(1 / 3, 6) in ys and round(math.sqrt(2) - 1, 6) in ys
    # F4: one row for the one ablation dataset, three metrics.
    assert len(made[3].axes) == 3
    # F7: datasets x (seed |cos|, truth, FVU); F8: one dataset x four metrics.
    assert len(made[6].axes) == 6 and len(made[7].axes) == 4
    # F7: one tick per budget of the panel, labelled in words, and no minor labels (the log
    # axis's own ones overlapped on the H200 run's 2.5 M-40 M range).
    for ax in made[6].axes:
        if not ax.lines:
            continue
        xs = sorted({float(x) for line in ax.lines for x in line.get_xdata()
                     if len(set(line.get_ydata())) > 1 or len(line.get_xdata()) == 1})
        ticks = sorted(float(t) for t in ax.get_xticks())
        assert set(ticks) >= set(xs) - {0.0}
        assert [t.get_text() for t in ax.get_xticklabels()] == [figures.budget_label(t) for t in ticks]
        assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    png, pdf = tmp_path / "f.png", tmp_path / "f.pdf"
    figures.save_figure(made[4], [png, pdf])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("rows, label", [
    (500_736, "500k"), (1_500_160, "1.5M"), (2_502_656, "2.5M"), (10_002_432, "10M"),
    (40_001_536, "40M"), (120_000, "120k"), (96, "96"), (0, "0")])
def test_budget_label(rows, label):
    assert figures.budget_label(rows) == label


def test_no_whisker_from_a_missing_value():
    """F4 with one seed per side: bars and dots, no error bar at all (it used to draw a
    whisker of length 0 from a NaN)."""
    runs = _abl({"topk": [0.3], "topk+signed": [0.2]}, "fvu")
    fig = figures.f4_ablation(runs, pd.DataFrame())
    from matplotlib.container import ErrorbarContainer
    assert not [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_figures_with_no_data_still_labelled():
    empty = pd.DataFrame(columns=["dataset", "arch", "k", "width"])
    for fig in [figures.f1_stability(empty, empty), figures.f2_truth_recovery(empty),
                figures.f3_ric(empty), figures.f4_ablation(empty, empty),
                figures.f5_fvu_l0(empty), figures.f6_fidelity(empty),
                figures.f7_budget(empty, empty), figures.f8_iter(empty, empty)]:
        _labelled(fig)


def test_with_convergence_joins_the_runs_flag():
    runs = pd.DataFrame(dict(dataset="lm", arch=["topk", "isae"], k=8, width=64, rows=100, seed=0,
                             converged=[False, True]))
    fid = pd.DataFrame(dict(dataset="lm", arch=["isae", "topk", "relu"], k=8, width=64, rows=100,
                            seed=0, frac_recovered_zero=0.5))
    out = figures.with_convergence(fid, runs)
    assert out["converged"].tolist() == [True, False, True]  # relu: no flag, not marked
    assert out["frac_recovered_zero"].tolist() == [0.5] * 3


def test_iter_curves_keep_one_footing_and_mark_a_preset_at_its_own_rate():
    assert figures.own_rate("isae-iter", "isae") and not figures.own_rate("isae+iter", "isae")
    assert not figures.own_rate("isae+iter10", "isae") and not figures.own_rate("topk", "topk")
    runs = pd.DataFrame(dict(dataset="syn", arch=["isae", "isae-iter", "isae+iter", "isae+iter10"],
                             seed=0, fvu=[0.4, 0.3, 0.35, 0.25], converged=True, iter=True))
    d = figures.iter_curves(runs, pd.DataFrame())
    # Both isae-iter (its own rate) and isae+iter (isae's rate) have 3 steps: both stay, the
    # base's rate first, the preset marked.
    at3 = d[(d["steps"] == 3) & (d["metric"] == "fvu")]
    assert at3["arch"].tolist() == ["isae+iter", "isae-iter"]
    assert at3["own_rate"].tolist() == [False, True] and at3["mean"].tolist() == [0.35, 0.3]
    assert d.loc[d["own_rate"], "arch"].unique().tolist() == ["isae-iter"]


def _markers(ax) -> list[tuple[float, float, str]]:
    """(x, y, marker) of every single-point line of a panel (error-bar points included)."""
    out = []
    for line in ax.lines:
        x, y = line.get_xdata(), line.get_ydata()
        if len(x) == 1 and line.get_marker() not in (None, "None", "", "_"):
            out.append((float(x[0]), float(y[0]), line.get_marker()))
    return out


def test_f8_steps_on_a_numeric_axis_and_the_own_rate_marked():
    runs = pd.DataFrame(dict(dataset="syn", arch=["isae", "isae+iter1", "isae+iter", "isae-iter",
                                                  "isae+iter10"],
                             seed=0, fvu=[0.4, 0.3, 0.33, 0.35, 0.25], converged=True, iter=True))
    fig = figures.f8_iter(runs, pd.DataFrame())
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog"
    assert [float(t) for t in ax.get_xticks()] == [0.0, 1.0, 3.0, 10.0]
    pts = sorted(_markers(ax))
    # At their step counts (one base: no sideways shift), the curve at isae's rate; the
    # preset at its own rate a diamond just right of 3, off the curve.
    shifted = 4 * figures.OWN_RATE_SHIFT - 1
    assert [(round(x, 6), y) for x, y, _ in pts] == [
        (0, 0.4), (1, 0.3), (3, 0.33), (round(shifted, 6), 0.35), (10, 0.25)]
    assert [m for *_, m in pts] == ["o", "o", "o", "D", "o"]
    (curve,) = [ln for ln in ax.lines if len(ln.get_xdata()) > 1]
    assert list(curve.get_ydata()) == [0.4, 0.3, 0.33, 0.25]
    assert any("own tuned rate" in t.get_text() for t in fig.legends[0].get_texts())


def test_f2_and_f3_markers_of_different_archs_do_not_coincide(frames):
    f2 = figures.f2_truth_recovery(frames["runs"], {"syn": 8})
    xs = {}
    for x, _, m in _markers(f2.axes[0]):
        xs.setdefault(round(x, 9), []).append(m)
    # Three archs at each k: three distinct x positions around it, no two equal.
    assert len({round(x, 9) for x in xs}) >= 9


def test_f3_and_f6_use_every_seed_with_its_spread():
    """The main k has three seeds: F3 and F6 show their mean and sd there, one seed
    elsewhere, and say how many."""
    rows = []
    for k in (4, 8, 16):
        for seed in ((0, 1, 2) if k == 8 else (0,)):
            v = {0: 0.5, 1: 0.6, 2: 0.7}[seed] if k == 8 else 0.4
            rows.append(dict(dataset="lm", arch="isae", k=k, width=64, rows=100, seed=seed,
                             main=k == 8, sweep=seed == 0, converged=True,
                             **{f"ric_{kind}_{side}_q50": v for kind in
                                ("observed", "random_support", "gaussian", "mp")
                                for side in ("lower", "upper")},
                             l0=float(k), frac_recovered_zero=v, frac_recovered_mean=v - 0.1,
                             kind="encoder"))
    runs = pd.DataFrame(rows)
    from matplotlib.container import ErrorbarContainer
    for fig in (figures.f3_ric(runs), figures.f6_fidelity(runs, runs)):
        ax = fig.axes[0]
        pts = [y for x, y, _ in _markers(ax) if abs(x - 8) < 1]
        # At k 8 (or L0 8): the mean of the three seeds.
        assert pytest.approx(0.6) in pts
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
        segs = [seg for c in bars for seg in c[2][0].get_segments()]
        assert any(abs((s[1][1] - s[0][1]) / 2 - statistics.stdev([0.5, 0.6, 0.7])) < 1e-9
                   for s in segs)
        assert "1–3 seeds per point" in ax.get_title()


class _Fields(dict):
    """A stand-in for Snakemake's named lists: items() and attribute access."""

    __getattr__ = dict.__getitem__


def test_one_entrance_draws_every_figure(frames, tmp_path):
    """figures.draw and scripts/figure.py (the one rule script) give each figure exactly
    what its function gets when called directly: same PNG bytes."""
    assert list(figures.FIGURES) == list(plan.FIGURE_RULES)
    assert {n: f.__name__ for n, f in figures.FIGURES.items()} == plan.FIGURE_RULES
    with pytest.raises(UserError, match="unknown figure 'F10'"):
        figures.draw("F10", {})
    f = frames
    paths = {}
    for name, df in (("runs", f["runs"]), ("pairs", f["pairs"]), ("latents", f["latents"]),
                     ("chance", f["chance"])):
        paths[name] = tmp_path / f"{name}.parquet"
        df.to_parquet(paths[name])
    cases = [("F1", ["latents", "pairs", "runs", "chance"], {},
              figures.f1_stability(f["latents"], f["pairs"], f["runs"], f["chance"])),
             ("F2", ["runs"], {"true_k": {"syn": 8}}, figures.f2_truth_recovery(f["runs"], {"syn": 8}))]
    for name, reads, params, direct in cases:
        want = tmp_path / f"direct-{name}.png"
        figures.save_figure(direct, [want])
        out = _Fields(png=str(tmp_path / f"{name}.png"), pdf=str(tmp_path / f"{name}.pdf"))
        smk = _Fields(input=_Fields({r: str(paths[r]) for r in reads}),
                      params=_Fields(figure=name, **params), output=out,
                      log=[str(tmp_path / f"{name}.log")])
        runpy.run_path(str(ROOT / "scripts" / "figure.py"), init_globals={"snakemake": smk})
        assert Path(out.png).read_bytes() == want.read_bytes()
        assert Path(out.pdf).read_bytes()[:5] == b"%PDF-"


def test_t1_live_columns_from_the_seed_pairs():
    runs = _group_runs({("syn", "topk"): [0.2, 0.4, 0.3]}, mse_per_dim=lambda s, v: v,
                       fvu=lambda s, v: v, l0=lambda s, v: 8.0, dead_frac=lambda s, v: 0.25,
                       lr=lambda s, v: 4e-3, converged=lambda s, v: True,
                       fvu_trend=lambda s, v: 0.0, init_abs_cos=lambda s, v: 0.5)
    pairs = pd.DataFrame(dict(
        dataset="syn", kind="seed", arch_a="topk", arch_b="topk", seed_a=[0, 0, 1],
        seed_b=[1, 2, 2], k=8, width=64, rows=1000, mean_abs_cos=[0.5, 0.6, 0.7],
        live_mean_abs_cos=[0.8, 0.9, 0.7], live_n_matched=[40, 44, 42],
        live_chance_data_rows=[0.3, 0.31, 0.32], main=True, **{"frac_gt_0.9": 0.0}))
    r = tables.table_t1(runs, pairs).iloc[0]
    assert r["live_mean_abs_cos_mean"] == pytest.approx(0.8)
    assert (r["live_n_matched_min"], r["live_n_matched_max"]) == (40, 44)
    assert r["live_chance_data_rows_mean"] == pytest.approx(0.31)
    md = tables.to_markdown(tables.table_t1(runs, pairs), tables.T1_METRICS)
    assert "| live seed \\|cos\\| | live n | live chance rows |" in md
    assert "| 0.800 [0.700, 0.900] | 42 [40, 44] | 0.310 |" in md
    # Tables measured before the live columns existed leave them out of the renderings.
    old = tables.table_t1(runs, pairs.drop(columns=["live_mean_abs_cos", "live_n_matched",
                                                    "live_chance_data_rows"]))
    shown = tables.shown_metrics(old, tables.T1_METRICS)
    assert "live n" not in [m.label for m in shown] and "seed >0.9" in [m.label for m in shown]


def test_f1_draws_the_trained_references_from_the_null_grid_and_the_split_table(tmp_path):
    """F1 (through the one figure script, as its rule runs it) reads the null's seed pairs
    from `pairs` (flag null) and the split-data pairs from `split`, one marker per pair left
    of its arch's violin; the main grid's seed pairs stay where they were."""
    key = dict(dataset="syn", k=8, width=64, rows=1000, kind="seed")
    pairs = pd.DataFrame(
        [dict(key, arch_a=a, arch_b=a, seed_a=0, seed_b=1, mean_abs_cos=v, main=True, null=False)
         for a, v in (("topk", 0.8), ("isae", 0.9))]
        + [dict(key, arch_a="topk", arch_b="topk", seed_a=a, seed_b=b, mean_abs_cos=v,
                main=False, null=True) for a, b, v in ((0, 1, 0.21), (0, 2, 0.22), (1, 2, 0.23))])
    latents = pd.DataFrame([dict(dataset="syn", arch=a, seed_a=0, seed_b=1, k=8, width=64,
                                 abs_cos=c, main=True, null=False)
                            for a in ("topk", "isae") for c in (0.5, 0.7, 0.9)])
    split = pd.DataFrame(dict(dataset="syn", arch="isae", seed=[0, 1], k=8, width=64, rows=1000,
                              mean_abs_cos=[0.61, 0.62]))
    paths = {}
    for name, df in (("latents", latents), ("pairs", pairs), ("split", split)):
        paths[name] = str(tmp_path / f"{name}.parquet")
        df.to_parquet(paths[name])
    out = _Fields(png=str(tmp_path / "F1.png"), pdf=str(tmp_path / "F1.pdf"))
    smk = _Fields(input=_Fields(paths), params=_Fields(figure="F1"), output=out,
                  log=[str(tmp_path / "F1.log")])
    runpy.run_path(str(ROOT / "scripts" / "figure.py"), init_globals={"snakemake": smk})
    assert Path(out.png).read_bytes()[:4] == b"\x89PNG"
    from matplotlib.collections import PathCollection

    fig = figures.f1_stability(latents, pairs, split=split)
    ax = fig.axes[0]
    points = sorted((round(float(x), 6), round(float(y), 6)) for c in ax.collections
                    if isinstance(c, PathCollection) for x, y in np.asarray(c.get_offsets()))
    # archs in order topk (x 0), isae (x 1); references at x - 0.25, seed pairs at x.
    assert (-0.25, 0.21) in points and (-0.25, 0.23) in points and (0.75, 0.62) in points
    assert (0.0, 0.8) in points and (1.0, 0.9) in points
    assert not any(x == 0.0 and y < 0.5 for x, y in points)  # no null pair among the seed pairs
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("trained null") for t in labels)
    assert any(t.startswith("split data") for t in labels)
    # Without references: no triangle, no legend entry.
    bare = figures.f1_stability(latents, pairs[~pairs["null"]])
    assert not any("trained null" in t.get_text() for t in bare.legends[0].get_texts())


def test_lr_table_rule_script_writes_the_table_and_its_markdown(tmp_path):
    lr = pd.DataFrame(dict(dataset="syn", arch="topk", factor=[0.25, 1.0, 4.0], lr=[1e-3, 4e-3, 1.6e-2],
                           heldout_fvu=[0.3, 0.2, 0.1], chosen=[False, False, True]))
    lr.to_parquet(tmp_path / "lr_in.parquet")
    out = _Fields(table=str(tmp_path / "lr.parquet"), md=str(tmp_path / "lr.md"))
    smk = _Fields(input=_Fields(lr=str(tmp_path / "lr_in.parquet")), output=out,
                  log=[str(tmp_path / "lr.log")])
    runpy.run_path(str(ROOT / "scripts" / "table_lr.py"), init_globals={"snakemake": smk})
    assert pd.read_parquet(out.table).equals(tables.table_lr(lr))
    md = Path(out.md).read_text()
    assert md == tables.lr_markdown(tables.table_lr(lr), tables.LR_CAPTION)
    assert md.rstrip().endswith("| **yes** |")
    # No sweep in the config: an empty collected table gives the header alone.
    pd.DataFrame(columns=["dataset", "arch", "k", "width"]).to_parquet(tmp_path / "lr_in.parquet")
    runpy.run_path(str(ROOT / "scripts" / "table_lr.py"), init_globals={"snakemake": smk})
    assert Path(out.md).read_text().rstrip().splitlines()[-1].startswith("|:---")
