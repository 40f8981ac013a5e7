"""The width as an axis of the study: learning rates carried across widths (the default's
1/√width scaling), the lr sweep's record of its width and its training options, and T3 and
F9 from planted tables with known answers."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from isae.cli.train import read_lr_file
from isae.errors import UserError
from isae.models.config import TrainConfig, carry_lr
from isae.study import figures, tables

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- rates


@pytest.mark.parametrize("factor", [0.25, 1.0, 4.0, 16.0])
@pytest.mark.parametrize("swept, width", [(1536, 12288), (1536, 3072), (12288, 1536),
                                          (256, 1024), (768, 24576), (48, 96)])
def test_the_rate_at_a_width_is_the_factor_times_the_default_there(factor, swept, width):
    """A factor f chosen over the default at one width, carried to another, is f x the
    default at that width: the default's own law, 8e-4 / sqrt(width / 16384), written out
    here in float64 as the reference."""
    chosen = factor * TrainConfig().learning_rate(swept)
    reference = factor * 8e-4 / math.sqrt(width / 16384)
    assert carry_lr(chosen, swept, width) == pytest.approx(reference, rel=1e-13)
    assert carry_lr(chosen, swept, width) == pytest.approx(
        factor * TrainConfig().learning_rate(width), rel=1e-13)
    assert carry_lr(chosen, swept, swept) == chosen  # the same width: the rate itself, exactly


def test_lr_from_carries_a_sweeps_rates_to_another_width(tmp_path):
    path = tmp_path / "lr.json"
    path.write_text(json.dumps({"lr": {"topk": 0.01, "isae": 0.004}, "width": 1536}))
    got = read_lr_file(str(path), ["topk", "isae-tied", "dl"], 12288)
    assert got == {"topk": pytest.approx(0.01 / math.sqrt(8)),
                   "isae-tied": pytest.approx(0.004 / math.sqrt(8))}  # dl has no rate
    assert read_lr_file(str(path), ["topk"], 1536) == {"topk": 0.01}
    assert read_lr_file(str(path), ["topk"]) == {"topk": 0.01}  # no width asked: as written
    # A file without its width (written by hand) is taken as it is, at any width.
    path.write_text(json.dumps({"lr": {"topk": 0.01}}))
    assert read_lr_file(str(path), ["topk"], 12288) == {"topk": 0.01}
    for bad in (0, -3, "1536", True, 1.5):
        path.write_text(json.dumps({"lr": {"topk": 0.01}, "width": bad}))
        with pytest.raises(UserError, match='"width" is not a positive integer'):
            read_lr_file(str(path), ["topk"], 12288)


@pytest.mark.slow
def test_lr_sweep_records_its_width_and_takes_the_training_options(tmp_path, capsys):
    """isae lr-sweep writes the width its rates are for and trains its candidates with the
    options it is given; isae train at another width gets the choice x sqrt(swept / width),
    and at the swept width with the same options reuses the candidate."""
    from libdata import signed_sparse_set

    from isae.cli.main import main

    data = tmp_path / "syn"
    signed_sparse_set(data, d=16, atoms=48, rows=3000)
    common = ["--k", "3", "--tokens", "3000", "--batch-size", "256", "--data-seed", "0",
              "--dead-tokens", "700"]
    out = tmp_path / "lr"
    assert main(["-q", "lr-sweep", "--activations", str(data), "--arch", "topk", "--factors",
                 "1,4", "--width", "48", *common, "--out", str(out)]) == 0
    choice = json.loads((out / "lr.json").read_text())
    assert choice["width"] == 48
    factor = 4.0 if choice["lr"]["topk"] > 2 * TrainConfig().learning_rate(48) else 1.0
    cand = json.loads((out / "ckpt" / "topk" / f"x{factor:g}" / "cfg.json").read_text())
    assert cand["train"]["dead_tokens"] == 700
    capsys.readouterr()
    wide = tmp_path / "wide"
    assert main(["-q", "train", "--activations", str(data), "--arch", "topk", "--width", "96",
                 *common, "--lr-from", str(out / "lr.json"), "--out", str(wide)]) == 0
    assert json.loads((wide / "cfg.json").read_text())["lr"] == pytest.approx(
        factor * TrainConfig().learning_rate(96), rel=1e-12)
    capsys.readouterr()
    same = tmp_path / "same" / "{arch}" / "seed{seed}"
    assert main(["-q", "train", "--activations", str(data), "--arch", "topk", "--width", "48",
                 "--seeds", "0", *common, "--lr-from", str(out / "lr.json"),
                 "--reuse", str(out / "ckpt"), "--out", str(same)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert runs[0]["reused"].endswith(f"ckpt/topk/x{factor:g}")


# ----------------------------------------------------------------------------- planted tables


def planted() -> dict:
    """The width axis of one synthetic dataset at 64 and 128 latents (d 32), topk and isae,
    3 seeds, with hand-set values; plus rows T3 and F9 must leave out (a main-grid run that
    is not on the axis, a k-sweep run at 128)."""
    runs = []
    for width in (64, 128):
        for arch, base in (("topk", 0.2), ("isae", 0.3)):
            for seed in (0, 1, 2):
                runs.append(dict(
                    dataset="syn", arch=arch, k=8, width=width, rows=1000 * width, seed=seed,
                    lr=0.01 * math.sqrt(64 / width), fvu=base + 0.01 * seed + width / 1000,
                    dead_frac=0.1 * seed if width == 128 else 0.0,
                    converged=not (arch == "isae" and width == 128 and seed == 2),
                    fvu_trend=0.01, ric_observed_q50=0.5 + seed / 10, ric_d=32.0,
                    ric_observed_max=1.0 + width / 128, **{"ric_observed_frac_lt_sqrt2-1": 0.2},
                    ric_dict_dup_frac=0.0, truth_abs_cos=0.7, **{"truth_frac_gt_0.9": 0.5},
                    main=width == 64, sweep=False, width_axis=True))
    # Not on the axis: left out of T3 and F9 whatever their values.
    runs.append(dict(runs[-1], seed=5, fvu=9.0, dead_frac=0.9, width_axis=False, sweep=True))
    runs = pd.DataFrame(runs)
    pairs = []
    for width in (64, 128):
        for arch in ("topk", "isae"):
            for (a, b), cos in zip(((0, 1), (0, 2), (1, 2)), (0.5, 0.6, 0.7)):
                pairs.append(dict(
                    dataset="syn", kind="seed", arch_a=arch, arch_b=arch, seed_a=a, seed_b=b,
                    k=8, width=width, rows=1000 * width, mean_abs_cos=cos + width / 1000,
                    live_mean_abs_cos=cos + 0.2, live_n_matched=width - 10 * a,
                    live_chance_data_rows=0.4, code_pearson_all=0.3, code_jaccard=0.4,
                    main=width == 64, width_axis=True,
                    **{"frac_gt_0.9": cos / 2, "live_frac_gt_0.9": cos / 4}))
    pairs = pd.DataFrame(pairs)
    chance = pd.DataFrame([dict(dataset="syn", width=w, kind=kind, target="seed", draw=d,
                                mean_abs_cos=v + w / 1000 + d / 100)
                           for w in (64, 128) for d in (0, 1)
                           for kind, v in (("data_rows", 0.4), ("gaussian", 0.2))])
    lr = pd.DataFrame(dict(dataset="syn", arch=["topk"] * 3 + ["isae"] * 3,
                           factor=[0.25, 1.0, 4.0] * 2,
                           chosen=[False, False, True, False, True, False]))
    lr_width = pd.DataFrame(dict(dataset="syn", width=128, arch=["topk"] * 2 + ["isae"] * 2,
                                 factor=[1.0, 4.0] * 2, chosen=[False, True, False, True],
                                 at_edge=[False, True, False, True]))
    return dict(runs=runs, pairs=pairs, chance=chance, lr=lr, lr_width=lr_width)


def test_t3_reads_the_largest_width_of_the_axis():
    p = planted()
    t = tables.table_t3(**p).set_index("arch")
    assert list(t.index) == ["topk", "isae"] and set(t["width"]) == {128}
    topk, isae = t.loc["topk"], t.loc["isae"]
    # FVU at 128: base + 0.128 + 0.01 x seed over seeds 0-2 (the off-axis run left out).
    assert topk["fvu_mean"] == pytest.approx(0.2 + 0.128 + 0.01)
    assert topk["fvu_sd"] == pytest.approx(0.01) and topk["fvu_n"] == 3
    assert topk["dead_frac_mean"] == pytest.approx(10.0)  # 0, 10, 20 %
    assert topk["rows_mean"] == pytest.approx(0.128)  # in millions
    assert topk["lr_mean"] == pytest.approx(0.01 / math.sqrt(2))
    # Seed pairs at 128 only: mean [min, max] of 0.5, 0.6, 0.7 + 0.128.
    assert topk["mean_abs_cos_mean"] == pytest.approx(0.728)
    assert (topk["mean_abs_cos_min"], topk["mean_abs_cos_max"]) == pytest.approx((0.628, 0.828))
    assert topk["live_mean_abs_cos_mean"] == pytest.approx(0.8)
    assert (topk["live_n_matched_min"], topk["live_n_matched_max"]) == (118, 128)
    # The chance level at 128, not at 64: 0.4 + 0.128 + mean of draws 0, 0.01.
    assert topk["chance_data_rows_mean"] == pytest.approx(0.533)
    assert topk["ric_observed_max_mean"] == pytest.approx(2.0)
    assert topk["code_pearson_all_mean"] == pytest.approx(0.3)
    # Over the live latents: the pairs' own fraction above 0.9 (not the all-latent one).
    assert topk["live_frac_gt_0.9_mean"] == pytest.approx(0.6 / 4)
    assert topk["live_frac_gt_0.9_max"] == pytest.approx(0.7 / 4)
    # The factors: main sweep 4x / 1x, second sweep at 128 4x / 4x (isae at its edge).
    assert topk["lr_factor_main_mean"] == 4.0
    assert isae["lr_factor_main_mean"] == 1.0 and isae["lr_factor_here_mean"] == 4.0
    assert topk["lr_factor_here_mean"] == 4.0
    assert bool(isae["lr_at_edge"]) and bool(topk["lr_at_edge"])
    assert bool(isae["not_converged"]) and not bool(topk["not_converged"])
    assert isae["converged_mean"] == pytest.approx(2 / 3)
    md = tables.to_markdown(tables.table_t3(**p), tables.shown_metrics(
        tables.table_t3(**p), tables.T3_METRICS))
    assert "| lr factor, main width | lr factor, this width | rows (M) |" in md
    assert "| syn | isae † | 8 | 128 | 0.0071 ‡ | 1 | 4 | 0.128 |" in md
    # Without a second sweep its column goes; the main factor stays.
    t2 = tables.table_t3(**dict(p, lr_width=pd.DataFrame()))
    shown = [m.label for m in tables.shown_metrics(t2, tables.T3_METRICS)]
    assert "lr factor, this width" not in shown and "lr factor, main width" in shown
    # The main sweep's marks: topk's 4x is its grid's edge, isae's 1x is not.
    assert t2.set_index("arch")["lr_at_edge"].to_dict() == {"topk": True, "isae": False}
    # No width axis: no row, and the renderings still have their header.
    empty = tables.table_t3(p["runs"].assign(width_axis=False), p["pairs"].assign(width_axis=False))
    assert empty.empty
    assert "| dataset | arch | k | width |" in tables.to_markdown(empty, tables.T3_METRICS)


def test_t3_script_renders_what_the_library_computes(tmp_path):
    p = planted()
    paths = {}
    for name in ("runs", "pairs", "chance", "lr"):
        paths[name] = str(tmp_path / f"{name}.parquet")
        p[name].to_parquet(paths[name])
    sweep = tmp_path / "sweep.parquet"
    p["lr_width"].drop(columns=["dataset", "width"]).to_parquet(sweep)

    class Fields(dict):
        __getattr__ = dict.__getitem__

    out = Fields(table=str(tmp_path / "T3.parquet"), md=str(tmp_path / "T3.md"),
                 tex=str(tmp_path / "T3.tex"))
    smk = Fields(input=Fields(paths, lr_width=[str(sweep)]), output=out,
                 params=Fields(lr_width_ids=[{"dataset": "syn", "width": 128}]),
                 log=[str(tmp_path / "t3.log")])
    runpy.run_path(str(ROOT / "scripts" / "table_t3.py"), init_globals={"snakemake": smk})
    want = tables.table_t3(**p)
    assert Path(out.md).read_text() == tables.to_markdown(
        want, tables.shown_metrics(want, tables.T3_METRICS), tables.T3_CAPTION)
    assert "\\begin{tabular}" in Path(out.tex).read_text()
    got = pd.read_parquet(out.table)
    assert got["lr_factor_here_mean"].tolist() == [4.0, 4.0]


def test_width_curves_hand_computed():
    p = planted()
    d = figures.width_curves(p["runs"], p["pairs"]).set_index(["arch", "width", "metric"])
    r = d.loc[("topk", 128, "fvu")]
    assert r["mean"] == pytest.approx(0.338) and r["sd"] == pytest.approx(0.01) and r["n"] == 3
    assert d.loc[("topk", 128, "dead_pct"), "mean"] == pytest.approx(10.0)
    assert d.loc[("topk", 128, "dead_pct"), "sd"] == pytest.approx(10.0)
    s = d.loc[("topk", 64, "seed_abs_cos")]
    assert (s["mean"], s["lo"], s["hi"], s["n"]) == pytest.approx((0.664, 0.564, 0.764, 3))
    assert d.loc[("isae", 64, "live_abs_cos"), "mean"] == pytest.approx(0.8)
    assert d.loc[("isae", 128, "delta_max"), "mean"] == pytest.approx(2.0)
    assert d.loc[("topk", 64, "delta_median"), "mean"] == pytest.approx(0.6)
    assert d.loc[("topk", 64, "live_chance"), "mean"] == pytest.approx(0.4)
    # Converged: every run at the point; the pair metrics carry the runs' flag.
    assert not d.loc[("isae", 128, "fvu"), "converged"]
    assert not d.loc[("isae", 128, "seed_abs_cos"), "converged"]
    assert d.loc[("isae", 64, "fvu"), "converged"]
    # The off-axis run (fvu 9) is not in any point.
    assert d.xs("fvu", level="metric")["mean"].max() < 1
    assert figures.width_curves(p["runs"].assign(width_axis=False), p["pairs"]).empty


def _markers(ax) -> list[tuple[float, float, str]]:
    """(x, y, face colour) of every single marker drawn on ``ax``."""
    out = []
    for line in ax.get_lines():
        xs, ys = line.get_data()
        if line.get_marker() == "o" and len(xs) == 1:
            out.append((float(xs[0]), float(ys[0]), str(line.get_markerfacecolor())))
    return out


def test_f9_panels_axes_and_hollow_markers(tmp_path):
    p = planted()
    fig = figures.draw("F9", {"runs": p["runs"], "pairs": p["pairs"], "chance": p["chance"]})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(figures.F9_METRICS)
    for ax in axes:
        assert ax.get_xlabel() == "latents (width), log scale" and ax.get_ylabel().strip()
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["64\n2×d", "128\n4×d"]
        assert "3 " in ax.get_title() and "per point" in ax.get_title()
    assert fig._suptitle.get_text().startswith("F9")
    fvu = next(ax for ax in axes if ax.get_ylabel().startswith("held-out FVU"))
    marks = _markers(fvu)
    # isae at 128 (one seed unconverged) is hollow, every other point filled; each point
    # sits at its mean.
    hollow = [(x, y) for x, y, face in marks if face == "white"]
    assert len(hollow) == 1 and hollow[0][1] == pytest.approx(0.438)
    assert hollow[0][0] == pytest.approx(128, rel=0.1)
    assert len(marks) == 4
    seed = next(ax for ax in axes if "all latents" in ax.get_ylabel())
    chance = [line for line in seed.get_lines() if line.get_linestyle() == "--"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == pytest.approx([0.469, 0.533])
    live = next(ax for ax in axes if ax.get_ylabel().startswith("fraction of live latents"))
    assert sorted(y for _, y, _ in _markers(live)) == pytest.approx([0.15] * 4)
    truth = next(ax for ax in axes if ax.get_ylabel().startswith("matched |cos| to the true"))
    assert sorted(y for _, y, _ in _markers(truth)) == pytest.approx([0.7] * 4)
    delta = next(ax for ax in axes if ax.get_ylabel().startswith("largest δ_U"))
    assert {round(line.get_ydata()[0], 4) for line in delta.get_lines()
            if line.get_color() == "tab:orange"} == {round(1 / 3, 4), round(math.sqrt(2) - 1, 4)}
    figures.save_figure(fig, [tmp_path / "F9.png"])
    assert (tmp_path / "F9.png").read_bytes()[:4] == b"\x89PNG"
    # No width axis in the config: a labelled placeholder, not an error.
    empty = figures.f9_width(p["runs"].assign(width_axis=False), p["pairs"])
    assert "width_study.datasets is empty" in empty.axes[0].texts[0].get_text()
    plt.close("all")


def test_width_label():
    assert figures.width_label(1536, 384.0) == "1536\n4×d"
    assert figures.width_label(1000, 384.0) == "1000"
    assert figures.width_label(512, None) == "512" and figures.width_label(512, np.nan) == "512"
    assert figures.width_label(128, 64.0, "atoms") == "128\n2×atoms"


def test_every_arch_of_a_figure_gets_its_own_colour():
    """An arch without a fixed colour takes one no fixed arch uses: isae-tied was drawn in
    isae-iter's green in F9 of the 32 x d run."""
    archs = [*figures.ARCH_COLORS, "topk-signed", "isae-nobias", "relu+tied", "topk+iter"]
    colours = [figures.arch_color(a, i) for i, a in enumerate(archs)]
    assert len(set(colours)) == len(archs)


def test_f9_ticks_count_atoms_on_a_synthetic_set_and_d_on_a_language_model():
    """A synthetic set's widths are multiples of its true dictionary (1, 2, 4 x atoms), not
    of its dimension: its ticks say so, while a set without a truth keeps x d."""
    p = planted()
    syn = p["runs"].assign(truth_n_atoms=64)
    lm = p["runs"].assign(dataset="lm", truth_abs_cos=math.nan, truth_n_atoms=math.nan)
    runs = pd.concat([syn, lm], ignore_index=True)
    assert figures.width_units(runs) == {"syn": (64.0, "atoms"), "lm": (32.0, "d")}
    pairs = pd.concat([p["pairs"], p["pairs"].assign(dataset="lm")], ignore_index=True)
    fig = figures.f9_width(runs, pairs)
    ticks = {ax.get_title().split(" ")[0]: [t.get_text() for t in ax.get_xticklabels()]
             for ax in fig.axes if ax.get_ylabel().startswith("held-out FVU")}
    assert ticks == {"syn": ["64\n1×atoms", "128\n2×atoms"], "lm": ["64\n2×d", "128\n4×d"]}
    plt.close("all")


def test_f9_truth_panel_says_where_there_is_no_truth():
    """A language-model row has no truth: its truth panel is a labelled placeholder, while the
    synthetic row draws its points."""
    p = planted()
    lm_runs = p["runs"].assign(dataset="lm", truth_abs_cos=math.nan)
    runs = pd.concat([p["runs"], lm_runs], ignore_index=True)
    pairs = pd.concat([p["pairs"], p["pairs"].assign(dataset="lm")], ignore_index=True)
    fig = figures.f9_width(runs, pairs)
    truth = [ax for ax in fig.axes if ax.get_ylabel().startswith("matched |cos| to the true")]
    assert len(truth) == 2
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in truth}
    assert [t for t, v in texts.items() if v == ["no truth for this dataset"]] == [""]
    assert sorted(y for _, y, _ in _markers(next(ax for ax in truth if ax.get_title())))\
        == pytest.approx([0.7] * 4)
    plt.close("all")


def test_f9_wraps_a_single_datasets_panels_after_four():
    """One dataset's F9 panels wrap into rows of four (a page's width); with several
    datasets each keeps one row."""
    p = planted()
    lm = p["runs"].assign(dataset="lm", truth_abs_cos=math.nan)
    fig = figures.f9_width(lm, p["pairs"].assign(dataset="lm"))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    rows = {round(ax.get_position().y0, 3) for ax in shown}
    assert len(rows) == -(-len(shown) // 4) and len(rows) > 1
    assert max(sum(1 for ax in shown if round(ax.get_position().y0, 3) == y) for y in rows) == 4
    two = figures.f9_width(pd.concat([p["runs"], lm], ignore_index=True),
                           pd.concat([p["pairs"], p["pairs"].assign(dataset="lm")], ignore_index=True))
    assert len({round(ax.get_position().y0, 3) for ax in two.axes if ax.get_visible()}) == 2
    plt.close("all")
