"""The study's aggregation (isae.study.tables) and figures (isae.study.figures).

Small hand-made tables with answers computed by hand or by the standard library, never by
the code under test.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from isae.errors import UserError
from isae.study import figures, tables
from isae.study.tables import Metric

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


def test_t1_uses_main_grid_only_and_pairs_for_stability():
    ev = _runs({("syn", "topk"): [0.2, 0.4]}).rename(columns={"x": "mse_per_dim"})
    ev["fvu"], ev["l0"], ev["dead_frac"] = [0.3, 0.5], [8.0, 8.0], [0.0, 0.5]
    extra = ev.iloc[[0]].assign(main=False, ablation=True, mse_per_dim=100.0)
    ev = pd.concat([ev, extra], ignore_index=True)
    pairs = pd.DataFrame(dict(dataset="syn", arch="topk", k=8, width=64, seed_a=[0], seed_b=[1],
                              mean_abs_cos=[0.6], **{"frac_gt_0.9": [0.25]},
                              chance_mean_abs_cos=[0.17], main=True,
                              sweep=False, ablation=False))
    truth = pd.DataFrame(columns=["dataset", "arch", "k", "width"])
    t = tables.table_t1(ev, pairs, truth)
    assert len(t) == 1
    r = t.iloc[0]
    assert r["mse_per_dim_mean"] == pytest.approx(0.3)  # the ablation row is left out
    assert r["dead_frac_mean"] == pytest.approx(25.0)  # percent
    assert r["mean_abs_cos_mean"] == pytest.approx(0.6) and r["mean_abs_cos_n"] == 1
    assert r["chance_mean_abs_cos_mean"] == pytest.approx(0.17)
    assert math.isnan(r["truth_abs_cos_mean"])


# ----------------------------------------------------------------------------- rendering


def test_format_cell():
    assert tables.format_cell(0.23333, 0.15275, 3) == "0.233 ± 0.153"
    assert tables.format_cell(0.5, float("nan"), 2) == "0.50"
    assert tables.format_cell(float("nan"), float("nan"), 2) == "—"


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


def test_ablation_deltas_hand_computed():
    ev = _runs({("syn", "topk"): [0.30, 0.50], ("syn", "topk+signed"): [0.20, 0.20],
                ("syn", "isae"): [0.10, 0.30], ("syn", "isae-tied"): [0.40]},
               grid="ablation").rename(columns={"x": "mse_per_dim"})
    pairs = pd.DataFrame(dict(dataset="syn", arch=["topk", "topk+signed"], k=8, width=64,
                              seed_a=0, seed_b=1, mean_abs_cos=[0.4, 0.7], main=False,
                              sweep=False, ablation=True))
    d = figures.ablation_deltas(ev, pairs).set_index(["variant", "metric"])
    r = d.loc[("topk+signed", "mse_per_dim")]
    assert r["base"] == "topk" and r["change"] == "+signed"
    assert r["delta"] == pytest.approx(0.20 - 0.40)
    # se = sqrt(var_v / 2 + var_b / 2) = sqrt(0 + 0.02 / 2)
    assert r["se"] == pytest.approx(math.sqrt(0.02 / 2))
    assert d.loc[("topk+signed", "seed_abs_cos"), "delta"] == pytest.approx(0.3)
    assert math.isnan(d.loc[("topk+signed", "seed_abs_cos"), "se"])  # one pair each
    assert d.loc[("isae-tied", "mse_per_dim"), "delta"] == pytest.approx(0.40 - 0.20)
    assert ("isae-tied", "seed_abs_cos") not in d.index  # no pair for a single seed
    assert ("topk", "mse_per_dim") not in d.index


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
                for seed in ((0, 1) if k == 8 else (0,)):
                    runs.append(dict(dataset=ds, arch=arch, k=k, width=64, seed=seed,
                                     main=k == 8, sweep=seed == 0, ablation=False))
    for arch in ("topk+signed", "isae-tied"):
        for seed in (0, 1):
            runs.append(dict(dataset="syn", arch=arch, k=8, width=64, seed=seed, main=False,
                             sweep=False, ablation=True))
    runs = pd.DataFrame(runs)
    runs.loc[runs["arch"].isin(["topk", "isae"]) & (runs["k"] == 8), "ablation"] = True
    n = len(runs)
    ev = runs.assign(mse_per_dim=rng.uniform(0.1, 0.5, n), fvu=rng.uniform(0.1, 0.5, n),
                     l0=runs["k"].astype(float), dead_frac=0.0)
    pairs = (runs[runs["seed"] == 0].drop(columns="seed")
             .merge(runs[runs["seed"] == 1][["dataset", "arch", "k", "width"]])
             .assign(seed_a=0, seed_b=1))
    pairs["mean_abs_cos"] = rng.uniform(0.3, 0.9, len(pairs))
    latents = pairs[pairs["main"]].loc[lambda d: d.index.repeat(20)].assign(
        abs_cos=lambda d: rng.uniform(0, 1, len(d)))
    truth = ev[ev["dataset"] == "syn"].assign(mean_abs_cos=rng.uniform(0.3, 0.9))
    ric = runs[runs["main"] | runs["sweep"]].assign(
        observed_q50=0.8, observed_q90=1.1, random_support_q50=0.7, gaussian_q50=0.6)
    ric["truth_q50"] = np.where(ric["dataset"] == "syn", 0.5, np.nan)
    fid = ric[ric["dataset"] == "lm"].assign(l0=lambda d: d["k"].astype(float),
                                               frac_recovered_zero=0.9,
                                               frac_recovered_mean=0.8, kind="encoder")
    return dict(ev=ev, pairs=pairs, latents=latents, truth=truth, ric=ric, fid=fid)


def test_figures_have_labelled_axes(frames, tmp_path):
    f = frames
    made = [
        figures.f1_stability(f["latents"], f["pairs"]),
        figures.f2_truth_recovery(f["truth"], {"syn": 8}),
        figures.f3_ric(f["ric"]),
        figures.f4_ablation(f["ev"], f["pairs"], f["truth"]),
        figures.f5_fvu_l0(f["ev"]),
        figures.f6_fidelity(f["fid"]),
    ]
    for fig in made:
        _labelled(fig)
    # F1: one panel per dataset, one violin per arch of the main grid.
    assert len(made[0].axes) == 2
    assert [t.get_text() for t in made[0].axes[0].get_xticklabels()] == ["topk", "isae",
                                                                          "isae-iter"]
    # F3: both thresholds are drawn.
    ys = {round(line.get_ydata()[0], 6) for line in made[2].axes[0].lines
          if len(set(line.get_ydata())) == 1}
    assert round(1 / 3, 6) in ys and round(math.sqrt(2) - 1, 6) in ys
    # F4: one row for the one ablation dataset; Δ seed |cos| of topk+signed is drawn.
    assert len(made[3].axes) == 3
    png, pdf = tmp_path / "f.png", tmp_path / "f.pdf"
    figures.save_figure(made[4], [png, pdf])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob(".*tmp*"))


def test_figures_with_no_data_still_labelled():
    empty = pd.DataFrame(columns=["dataset", "arch", "k", "width"])
    for fig in [figures.f1_stability(empty, empty), figures.f2_truth_recovery(empty),
                figures.f3_ric(empty), figures.f4_ablation(empty, empty, empty),
                figures.f5_fvu_l0(empty), figures.f6_fidelity(empty)]:
        _labelled(fig)
