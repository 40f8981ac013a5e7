"""The study's figures F1–F9: one function each, from the collected tables to a Figure;
``draw(name, tables)`` is the one entrance (``FIGURES`` names them).

Every function takes the DataFrames written by the workflow's collect rules (``runs``: one
row per checkpoint, ``pairs``: one row per compared pair, ``latents``, ``chance``,
``fidelity``; identity columns dataset / group / arch / k / width / rows / seed and the grid
flags main / sweep / budget / ablation / iter), returns a ``matplotlib.figure.Figure``, and
draws a labelled placeholder panel when the config produced no data for it, so that every
target exists for every config.

Conventions, so that a figure reads without its caption:

* an architecture has one colour in every figure, and every colour is in a legend;
* legends sit below the panels, never on the data;
* a hollow marker is a run (or a mean over runs) that has not converged;
* error bars over seeds are ± one sd; over seed pairs (which share seeds, so they are not
  independent) they span the pairs' range; a value from one seed has none, and the panel
  says how many seeds each point has; no bar is drawn from a missing value.

The numbers behind F4, F7 and F8 come from pure functions (``ablation_deltas``,
``budget_curves``, ``iter_curves``), tested on their own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display (CI, SLURM nodes)

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from isae.errors import UserError
from isae.models.config import parse_arch, thresholding_steps
from isae.study.tables import arch_sort_key, reference_rows, seed_pairs

DELTA_THRESHOLDS = {"δ = 1/3": 1.0 / 3.0, "δ = √2−1": math.sqrt(2.0) - 1.0}
#: Fixed colours so an arch looks the same in every figure.
ARCH_COLORS = {
    "topk": "#d62728",
    "relu": "#9467bd",
    "isae": "#1f77b4",
    "isae-iter": "#2ca02c",
    "isae-tied": "#8c564b",
    "dl": "#7f7f7f",
}
#: Colours of the chance levels (F1, F7): the data-shaped ones are the reference.
CHANCE_STYLE = {
    "data_rows": ("random training rows", "0.15", "-"),
    "data_cov": ("Gaussian, data covariance", "0.35", "--"),
    "gaussian": ("isotropic Gaussian", "0.6", ":"),
}
#: What the fidelity fraction is computed on, by model kind (isae.analysis.fidelity).
FIDELITY_KINDS = {"lm": "next-token cross-entropy", "encoder": "sentence-embedding similarity"}
NOT_CONVERGED = "hollow: not converged"


def arch_color(arch: str, i: int = 0) -> str:
    """The arch's fixed colour, else the i-th of tab10's colours that no fixed arch uses
    (tab10's own i-th could repeat a fixed one: an ablation drawn in isae-iter's green)."""
    if arch in ARCH_COLORS:
        return ARCH_COLORS[arch]
    taken = {c.lower() for c in ARCH_COLORS.values()}
    free = [c for c in plt.get_cmap("tab10").colors if mcolors.to_hex(c) not in taken]
    return mcolors.to_hex(free[i % len(free)])


def _rows(df: pd.DataFrame, *grids: str) -> pd.DataFrame:
    """Rows flagged with any of ``grids`` (all rows when the flags are absent)."""
    if df.empty or not all(g in df.columns for g in grids):
        return df
    mask = np.zeros(len(df), bool)
    for g in grids:
        mask |= df[g].astype(bool).to_numpy()
    return df[mask]


def _archs(df: pd.DataFrame, col: str = "arch") -> list[str]:
    return sorted(set(df[col]), key=arch_sort_key)


def _datasets(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["dataset"]))


def _grid(rows: int, cols: int, width: float = 4.4, height: float = 3.4):
    fig, axes = plt.subplots(max(rows, 1), max(cols, 1), figsize=(width * max(cols, 1),
                             height * max(rows, 1)), squeeze=False)
    return fig, axes


#: What a truth panel says on a dataset without a known dictionary (F4, F7, F8, F9).
NO_TRUTH = "no truth for this dataset"


def _placeholder(ax, xlabel: str, ylabel: str, why: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True,
            color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _empty_figure(title: str, xlabel: str, ylabel: str, why: str) -> Figure:
    fig, axes = _grid(1, 1)
    _placeholder(axes[0][0], xlabel, ylabel, why)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _finish(fig: Figure, title: str, handles: list, ncol: int | None = None) -> Figure:
    """Suptitle, and one legend below the panels (off the data)."""
    fig.suptitle(title)
    # Room at the top for the title, above the panels' own titles and axis labels.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))
    if handles:
        # Below the figure's bottom edge; saving with bbox_inches="tight" takes it in.
        fig.legend(handles=handles, loc="upper center", ncol=ncol or min(len(handles), 4),
                   fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def _arch_handles(archs: list[str]) -> list:
    return [Line2D([], [], color=arch_color(a, i), marker="o", lw=1.5, label=a)
            for i, a in enumerate(archs)]


def _hollow_handle() -> Line2D:
    return Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", label=NOT_CONVERGED)


def _stats(values: pd.Series) -> tuple[float, float, float, float, int]:
    """(mean, sd, min, max, n) of the finite values; NaN where undefined."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, math.nan, math.nan, 0
    sd = float(v.std(ddof=1)) if len(v) > 1 else math.nan
    return float(v.mean()), sd, float(v.min()), float(v.max()), len(v)


def _errbar(ax, x, mean, err, color, converged: bool, **kw) -> None:
    """One point with its error bar (``err``: a number, a (lo, hi) pair, or NaN = none)."""
    if not np.isfinite(mean):
        return
    yerr = None
    if isinstance(err, tuple):
        if all(np.isfinite(err)):
            yerr = [[max(mean - err[0], 0.0)], [max(err[1] - mean, 0.0)]]
    elif np.isfinite(err):
        yerr = err
    ax.errorbar([x], [mean], yerr=yerr, color=color, marker=kw.pop("marker", "o"),
                mfc=color if converged else "white", capsize=3, ls="none", **kw)


def _ticks_at(ax, values, label=lambda v: str(int(v))) -> None:
    """x ticks at ``values`` only, each labelled by ``label`` (plain integers by default, not
    2^3), and no minor ticks: a log axis's own labels collide or say 10^6.6."""
    ax.set_xticks(values, [label(v) for v in values])
    ax.minorticks_off()


def _dodge(x, i: int, n: int, step: float = 0.1):
    """``x`` moved sideways for the i-th of n series on a log axis (by a factor 2^(±step·…)),
    so that markers at the same x do not hide one another."""
    return np.asarray(x, np.float64) * 2.0 ** ((i - (n - 1) / 2) * step)


def _seed_stats(df: pd.DataFrame, by: str, col: str) -> pd.DataFrame:
    """Per value of ``by``: mean, sd, n of ``col`` over the rows (one per seed, a seed once)
    and whether every run converged. -> columns by, mean, sd, n, converged."""
    rows = []
    keep = df.drop_duplicates([by, "seed"]) if "seed" in df.columns else df
    for v, g in keep.groupby(by):
        mean, sd, _, _, n = _stats(g[col])
        if n:
            rows.append({by: v, "mean": mean, "sd": sd, "n": n, "converged": _all_converged(g)})
    return pd.DataFrame(rows, columns=[by, "mean", "sd", "n", "converged"])


def _count_label(n: pd.Series, metric: str) -> str:
    """'3 seeds', '1 seed', '1–3 pairs': how many values each point of a panel averages."""
    unit = "pair" if metric == "seed_abs_cos" else "seed"
    lo, hi = int(n.min()), int(n.max())
    count = str(lo) if lo == hi else f"{lo}–{hi}"
    return f"{count} {unit}{'s' if hi != 1 else ''}"


def _all_converged(df: pd.DataFrame) -> bool:
    return "converged" not in df.columns or bool(df["converged"].astype(bool).all())


# ----------------------------------------------------------------------------- F1


#: The trained references of F1 (``refs``, isae.study.tables.reference_rows): marker, label.
REFERENCE_STYLE = {
    "null": ("v", "trained null: same recipe on Gaussian data (a marker per pair)"),
    "split": ("^", "split data: two halves by document (a marker per pair)"),
}


def f1_stability(latents: pd.DataFrame, pairs: pd.DataFrame, runs: pd.DataFrame | None = None,
                 chance: pd.DataFrame | None = None, refs: pd.DataFrame | None = None,
                 split: pd.DataFrame | None = None) -> Figure:
    """Distribution of matched |cos| between seeds, per arch, one panel per dataset.

    ``latents``: per matched latent (dataset, arch, seed_a, seed_b, abs_cos) of the main
    grid's seed pairs; ``pairs``: per-pair summaries (seed pairs as dots, same-seed pairs of
    two archs as diamonds); ``runs``: the convergence flags († under a violin: not every seed
    converged); ``chance``: the chance levels drawn as lines; ``refs``: the trained
    references' pairs (dataset, arch, reference null | split, mean_abs_cos), drawn left of
    each violin; without it, those of ``pairs`` and ``split`` (``reference_rows``).
    """
    if refs is None:
        refs = reference_rows(pairs, split)
    title = "F1 · dictionary stability across seeds, against chance"
    xlabel, ylabel = "architecture", "matched |cos| between seeds\n(per latent, pooled over pairs)"
    latents = _rows(latents, "main")
    if latents.empty:
        return _empty_figure(title, xlabel, ylabel, "no seed pairs (needs ≥ 2 seeds)")
    sp = _rows(seed_pairs(pairs), "main")
    cross = pairs[pairs["kind"] == "arch"] if "kind" in pairs.columns else pairs.iloc[:0]
    cross = _rows(cross, "main")
    runs = _rows(runs, "main") if runs is not None else pd.DataFrame()
    datasets = _datasets(latents)
    fig, axes = _grid(1, len(datasets), width=4.8, height=4.0)
    handles = []
    for ax, ds in zip(axes[0], datasets):
        sub = latents[latents["dataset"] == ds]
        archs = _archs(sub)
        data = [sub.loc[sub["arch"] == a, "abs_cos"].to_numpy(np.float64) for a in archs]
        pos = np.arange(len(archs))
        parts = ax.violinplot(data, positions=pos, showmedians=True, widths=0.8)
        for body, a, i in zip(parts["bodies"], archs, range(len(archs))):
            body.set_facecolor(arch_color(a, i))
            body.set_alpha(0.45)
        for key in ("cbars", "cmins", "cmaxes", "cmedians"):
            parts[key].set_color("0.25")
            parts[key].set_linewidth(0.8)
        labels = []
        for x, a in zip(pos, archs):
            m = sp[(sp["dataset"] == ds) & (sp["arch"] == a)]["mean_abs_cos"]
            ax.scatter(np.full(len(m), x), m, color="k", s=14, zorder=3)
            c = cross[(cross["dataset"] == ds) & ((cross["arch_a"] == a) | (cross["arch_b"] == a))]
            if len(c):
                ax.scatter(np.full(len(c), x + 0.25), c["mean_abs_cos"], color="k", marker="D",
                           s=14, zorder=3, facecolors="none")
            if refs is not None and not refs.empty:
                for kind, (marker, _) in REFERENCE_STYLE.items():
                    v = refs[(refs["dataset"] == ds) & (refs["arch"] == a) &
                             (refs["reference"] == kind)]["mean_abs_cos"]
                    ax.scatter(np.full(len(v), x - 0.25), v, color="0.35", marker=marker, s=22,
                               zorder=3)
            r = runs[(runs["dataset"] == ds) & (runs["arch"] == a)] if len(runs) else runs
            mark = "" if r.empty or _all_converged(r) else " †"
            labels.append(f"{a}{mark}\n{len(m)} pair{'s' if len(m) != 1 else ''}")
        if chance is not None and not chance.empty:
            w = int(sub["width"].iloc[0]) if "width" in sub.columns else None
            ch = chance[(chance["dataset"] == ds) & (chance["target"] == "seed")]
            if w is not None and "width" in ch.columns:
                ch = ch[ch["width"] == w]
            for kind, (_, color, ls) in CHANCE_STYLE.items():
                v = ch.loc[ch["kind"] == kind, "mean_abs_cos"].mean()
                if np.isfinite(v):
                    ax.axhline(v, color=color, lw=1.2, ls=ls)
        ax.set_xticks(pos, labels, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(ds)
    handles += [Line2D([], [], color="k", marker="o", ls="none", ms=4, label="mean of one seed pair"),
                Line2D([], [], color="k", marker="D", mfc="none", ls="none", ms=4,
                       label="same seed, another arch")]
    if refs is not None and not refs.empty:
        handles += [Line2D([], [], color="0.35", marker=m, ls="none", ms=5, label=label)
                    for kind, (m, label) in REFERENCE_STYLE.items()
                    if (refs["reference"] == kind).any()]
    if chance is not None and not chance.empty:
        handles += [Line2D([], [], color=c, ls=ls, label=f"chance: {label}")
                    for label, c, ls in CHANCE_STYLE.values()]
    if runs is not None and "converged" in runs.columns and not _all_converged(runs):
        handles.append(Line2D([], [], ls="none", label="† not every seed converged"))
    return _finish(fig, title, handles, ncol=3)


# ----------------------------------------------------------------------------- F2


def _per_k(ax, df: pd.DataFrame, col: str, archs: list[str], x: str = "k") -> None:
    """Lines over ``x`` from the sweep's runs (one seed each), and the main grid's mean ± sd
    at its k as a larger marker; each arch moved a little sideways (log axis) so that
    markers at one k do not hide one another."""
    for i, a in enumerate(archs):
        c = arch_color(a, i)
        s = _rows(df[df["arch"] == a], "sweep")
        if len(s):
            s = s.sort_values(x)
            xs = _dodge(s[x], i, len(archs))
            ax.plot(xs, s[col], color=c, lw=1.2, ls="--", zorder=2)
            for xi, (_, r) in zip(xs, s.iterrows()):
                conv = bool(r.get("converged", True))
                ax.plot(xi, r[col], "o", color=c, mfc=c if conv else "white", ms=5, zorder=3)
        m = _rows(df[df["arch"] == a], "main")
        for kv, g in m.groupby(x):
            mean, sd, _, _, n = _stats(g[col])
            _errbar(ax, float(_dodge(kv, i, len(archs))), mean, sd, c, _all_converged(g),
                    marker="s", ms=8, zorder=4)


def _per_k_handles(archs: list[str], n_main: int) -> list:
    return [*_arch_handles(archs),
            Line2D([], [], color="0.3", ls="--", marker="o", ms=5, label="k sweep: one seed"),
            Line2D([], [], color="0.3", marker="s", ls="none", ms=7,
                   label=f"main k: mean ± sd over {n_main} seeds"),
            _hollow_handle()]


def _n_main_seeds(df: pd.DataFrame) -> int:
    m = _rows(df, "main")
    return int(m.groupby(["dataset", "arch"])["seed"].nunique().max()) if len(m) else 0


def f2_truth_recovery(runs: pd.DataFrame, true_k: dict | None = None) -> Figure:
    """Matched |cos| to the true dictionary against k, per arch (synthetic sets)."""
    title = "F2 · ground-truth recovery against k (synthetic sets)"
    xlabel, ylabel = "k (active latents per row)", "matched |cos| to the true dictionary"
    if runs.empty or "truth_abs_cos" not in runs.columns:
        return _empty_figure(title, xlabel, ylabel, "no synthetic dataset in the config")
    runs = _rows(runs[runs["truth_abs_cos"].notna()], "main", "sweep")
    if runs.empty:
        return _empty_figure(title, xlabel, ylabel, "no synthetic dataset in the config")
    datasets = _datasets(runs)
    fig, axes = _grid(1, len(datasets))
    archs = _archs(runs)
    for ax, ds in zip(axes[0], datasets):
        sub = runs[runs["dataset"] == ds]
        _per_k(ax, sub, "truth_abs_cos", [a for a in archs if a in set(sub["arch"])])
        if true_k and ds in true_k:
            ax.axvline(true_k[ds], color="0.3", ls=":", lw=1)
            ax.text(true_k[ds], 0.02, f" true k = {true_k[ds]}", fontsize=7, color="0.3")
        ax.set_xscale("log", base=2)
        ks = sorted(set(sub["k"]))
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(ds)
    return _finish(fig, title, _per_k_handles(archs, _n_main_seeds(runs)))


# ----------------------------------------------------------------------------- F3


def f3_ric(runs: pd.DataFrame) -> Figure:
    """Both sides of the restricted isometry on observed supports against k, per arch, with
    thresholds and calibrations, over every seed trained at each k (the k sweep's runs and
    the main grid's, which has all the seeds at its k).

    Rows: datasets; columns: the lower side 1 − σ_min² (1 = a singular union) and the upper
    side σ_max² − 1 of the unit decoder rows on unions of two held-out rows' supports.
    Solid: the median over the sampled unions, mean ± sd over seeds (n per point in the
    panel's title); dashed: random supports of the same sizes on the same dictionary; grey:
    a Gaussian dictionary; black dotted: the true dictionary on the true supports
    (synthetic); thin black: the Marchenko–Pastur edge.
    """
    title = "F3 · restricted isometry on observed supports: both sides against k"
    xlabel = "k (active latents per row)"
    col = "ric_observed_lower_q50"
    if runs.empty or col not in runs.columns:
        return _empty_figure(title, xlabel, "side of δ (median)", "no checkpoints")
    runs = _rows(runs[runs[col].notna()], "sweep", "main")
    if runs.empty or ("sweep" in runs.columns and not runs["sweep"].astype(bool).any()):
        return _empty_figure(title, xlabel, "side of δ (median)", "no k sweep in the config")
    datasets = _datasets(runs)
    archs = _archs(runs)
    fig, axes = _grid(len(datasets), 2, width=4.6, height=3.3)
    sides = [("lower", "lower side 1 − σ_min²\n(median; mean ± sd over seeds)"),
             ("upper", "upper side σ_max² − 1\n(median; mean ± sd over seeds)")]
    for r, ds in enumerate(datasets):
        sub = runs[runs["dataset"] == ds]
        counts = sub.drop_duplicates(["arch", "k", "seed"]).groupby(["arch", "k"])["seed"].nunique()
        for c, (side, ylabel) in enumerate(sides):
            ax = axes[r][c]
            for i, a in enumerate(archs):
                s = sub[sub["arch"] == a]
                if s.empty:
                    continue
                color = arch_color(a, i)
                obs = _seed_stats(s, "k", f"ric_observed_{side}_q50")
                xs = _dodge(obs["k"], i, len(archs))
                ax.plot(xs, obs["mean"], color=color, lw=1.5)
                for xi, (_, row) in zip(xs, obs.iterrows()):
                    _errbar(ax, float(xi), row["mean"], row["sd"], color, bool(row["converged"]),
                            ms=5)
                rnd = _seed_stats(s, "k", f"ric_random_support_{side}_q50")
                ax.plot(_dodge(rnd["k"], i, len(archs)), rnd["mean"], color=color, lw=1,
                        ls="--", marker="_", ms=8)
            by_k = sub.groupby("k").mean(numeric_only=True).reset_index()
            ax.plot(by_k["k"], by_k[f"ric_gaussian_{side}_q50"], color="0.55", lw=2, alpha=0.7,
                    marker="_", ms=10)
            ax.plot(by_k["k"], by_k[f"ric_mp_{side}_q50"], color="k", lw=0.8, marker="_", ms=10)
            if f"ric_truth_{side}_q50" in by_k and by_k[f"ric_truth_{side}_q50"].notna().any():
                ax.plot(by_k["k"], by_k[f"ric_truth_{side}_q50"], color="k", ls=":", lw=1.5,
                        marker="x", ms=5)
            for t, ls in zip(DELTA_THRESHOLDS.values(), ["-.", ":"]):
                ax.axhline(t, color="tab:orange", ls=ls, lw=1.2)
            if side == "lower":
                ax.axhline(1.0, color="tab:red", lw=0.8, alpha=0.6)
            ax.set_xscale("log", base=2)
            ks = sorted(set(sub["k"]))
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{ds} ({_count_label(counts, 'seed')} per point)", fontsize=9)
    handles = [*_arch_handles(archs),
               Line2D([], [], color="0.3", ls="--", label="random supports, same dictionary"),
               Line2D([], [], color="0.55", lw=2, label="Gaussian dictionary"),
               Line2D([], [], color="k", lw=0.8, label="Marchenko–Pastur edge"),
               Line2D([], [], color="k", ls=":", lw=1.5, label="true dictionary, true supports"),
               Line2D([], [], color="tab:orange", ls="-.", label="1/3"),
               Line2D([], [], color="tab:orange", ls=":", label="√2−1"),
               Line2D([], [], color="tab:red", lw=0.8, label="lower side 1: singular"),
               _hollow_handle()]
    return _finish(fig, title, handles, ncol=4)


# ----------------------------------------------------------------------------- F4


def ablation_base(variant: str) -> tuple[str, str] | None:
    """``topk+signed`` -> ("topk", "+signed"); ``isae-tied`` -> ("isae", "-tied"); a preset
    (or a name that is no architecture) -> None."""
    try:
        arch = parse_arch(variant)
    except UserError:
        return None
    return (arch.preset, arch.changes) if arch.changes else None


#: F4's metrics: (name, source table, column, per seed (True) or per seed pair (False)).
F4_METRICS = [
    ("fvu", "runs", "fvu", True),
    ("seed_abs_cos", "pairs", "mean_abs_cos", False),
    ("truth_abs_cos", "runs", "truth_abs_cos", True),
]
_F4_LABELS = {
    "fvu": "Δ held-out FVU (lower is better)",
    "seed_abs_cos": "Δ matched |cos| between seeds",
    "truth_abs_cos": "Δ matched |cos| to the truth",
}


def ablation_deltas(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Change of each ablation variant against its base preset, on the ablation grid, and
    of the whole combination (isae and isae-iter against topk).

    For a variant v of base b at the same dataset, k and width: Δ = mean(v) − mean(b), with
    means over seeds (FVU, truth |cos|) or over seed pairs (seed |cos|). ``se``: the standard
    error sqrt(sd_v²/n_v + sd_b²/n_b) for per-seed metrics with at least 2 values on each
    side; NaN for pair metrics (pairs share seeds, so they are not independent samples) and
    for fewer values. ``values``: the variant's individual values minus the base's mean.

    -> columns dataset, k, width, variant, base, change, metric, delta, se, n_variant,
    n_base, values.
    """
    cols = ["dataset", "k", "width", "variant", "base", "change", "metric", "delta", "se",
            "n_variant", "n_base", "values"]
    tables = {"runs": _rows(runs, "ablation"), "pairs": _rows(seed_pairs(pairs), "ablation")}
    rows = []
    for metric, source, col, per_seed in F4_METRICS:
        df = tables[source]
        if df.empty or col not in df.columns:
            continue
        stats = {key: pd.to_numeric(g[col], errors="coerce").dropna().to_numpy(np.float64)
                 for key, g in df.groupby(["dataset", "k", "width", "arch"])}
        for (ds, k, w, arch), v in stats.items():
            parsed = ablation_base(arch)
            if arch in ("isae", "isae-iter"):
                parsed = ("topk", f"{arch} (combined)")
            if parsed is None:
                continue
            base, change = parsed
            b = stats.get((ds, k, w, base))
            if b is None or len(v) == 0 or len(b) == 0:
                continue
            se = (math.sqrt(v.var(ddof=1) / len(v) + b.var(ddof=1) / len(b))
                  if per_seed and len(v) > 1 and len(b) > 1 else math.nan)
            rows.append(dict(dataset=ds, k=int(k), width=int(w), variant=arch, base=base,
                             change=change, metric=metric, delta=float(v.mean() - b.mean()),
                             se=se, n_variant=len(v), n_base=len(b),
                             values=list(v - b.mean())))
    return pd.DataFrame(rows, columns=cols)


def _f4_label(variant: str, row: pd.Series, not_converged: bool) -> str:
    if not isinstance(row["base"], str):
        return variant
    name = f"{variant} vs topk (all switches)" if "combined" in row["change"] else variant
    return f"{name}{' †' if not_converged else ''} (n={int(row['n_variant'])})"


def f4_ablation(runs: pd.DataFrame, pairs: pd.DataFrame) -> Figure:
    """Each switch added alone to topk (+x) and removed alone from isae (−x), and the whole
    combinations (isae, isae-iter against topk): the change in held-out FVU, in stability
    and (synthetic) in truth recovery, one row of panels per dataset."""
    title = "F4 · ablation: one switch added to TopK or removed from iSAE"
    d = ablation_deltas(runs, pairs)
    if d.empty:
        return _empty_figure(title, "change against the base preset", "variant",
                             "no ablation runs (config ablation.datasets is empty)")
    datasets = _datasets(d)
    metrics = [m for m, *_ in F4_METRICS if m in set(d["metric"])]
    n_var = d.groupby("dataset")["variant"].nunique().max()
    abl = _rows(runs, "ablation")
    unconverged = set()
    if "converged" in abl.columns:
        flags = abl.groupby(["dataset", "arch"])["converged"].agg(lambda v: bool(v.all()))
        unconverged = {key for key, ok in flags.items() if not ok}
    fig, axes = _grid(len(datasets), len(metrics), width=3.6, height=1.6 + 0.36 * n_var)
    for r, ds in enumerate(datasets):
        sub = d[d["dataset"] == ds]
        variants = sorted(set(sub["variant"]),
                          key=lambda v: (v.startswith("isae") and "combined" not in
                                         sub[sub.variant == v]["change"].iloc[0],
                                         "combined" in sub[sub.variant == v]["change"].iloc[0], v))
        y = np.arange(len(variants))
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            if sub[sub["metric"] == metric].empty:
                _placeholder(ax, _F4_LABELS[metric], "same rows as left", NO_TRUTH)
                ax.set_title(f"{ds}", fontsize=9)
                continue
            m = sub[sub["metric"] == metric].set_index("variant").reindex(variants)
            for yi, v in zip(y, variants):
                row = m.loc[v]
                if not isinstance(row["base"], str):
                    ax.text(0, yi, " n/a", va="center", fontsize=7, color="0.4")
                    continue
                color = arch_color(row["base"])
                ax.barh(yi, row["delta"], color=color, alpha=0.55, height=0.7)
                if np.isfinite(row["se"]):
                    ax.errorbar(row["delta"], yi, xerr=row["se"], color="k", capsize=3, lw=1)
                vals = np.asarray(row["values"], np.float64)
                ax.scatter(vals, np.full(len(vals), yi), color="k", s=9, zorder=3)
            ax.axvline(0, color="k", lw=0.8)
            ax.xaxis.set_major_locator(MaxNLocator(4))  # no colliding tick labels
            labels = [_f4_label(v, m.loc[v], (ds, v) in unconverged or
                                (ds, m.loc[v, "base"]) in unconverged) for v in variants]
            # The variants' names once, on the left; the other panels share its rows.
            ax.set_yticks(y, labels if c == 0 else [""] * len(y), fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(_F4_LABELS[metric], fontsize=9)
            ax.set_ylabel("variant (against its base)" if c == 0 else "same rows as left",
                          fontsize=8)
            k, w = int(sub["k"].iloc[0]), int(sub["width"].iloc[0])
            ax.set_title(f"{ds}, k={k}, width={w}", fontsize=9)
    handles = [Line2D([], [], color=arch_color("topk"), lw=6, alpha=0.55, label="against topk"),
               Line2D([], [], color=arch_color("isae"), lw=6, alpha=0.55, label="against isae"),
               Line2D([], [], color="k", marker="o", ls="none", ms=3,
                      label="one seed (FVU, truth) or seed pair (seed |cos|)"),
               Line2D([], [], color="k", marker="|", ls="-", label="± standard error (seeds only)")]
    if unconverged:
        handles.append(Line2D([], [], ls="none",
                              label="† the variant or its base has a run that did not converge"))
    return _finish(fig, title, handles, ncol=2)


# ----------------------------------------------------------------------------- F5


def f5_fvu_l0(runs: pd.DataFrame) -> Figure:
    """Held-out FVU against mean L0 over the k sweep (one seed), per arch, one panel per
    dataset; each point annotated with its k."""
    title = "F5 · reconstruction–sparsity trade-off: FVU against L0 over the k sweep"
    xlabel, ylabel = "mean L0 (active latents per held-out row; = k here)", "held-out FVU"
    runs = _rows(runs, "sweep")
    if runs.empty:
        return _empty_figure(title, xlabel, ylabel, "no k sweep in the config")
    datasets = _datasets(runs)
    archs = _archs(runs)
    fig, axes = _grid(1, len(datasets))
    for ax, ds in zip(axes[0], datasets):
        sub = runs[runs["dataset"] == ds]
        for i, a in enumerate(archs):
            s = sub[sub["arch"] == a].sort_values("k")
            if s.empty:
                continue
            color = arch_color(a, i)
            ax.plot(s["l0"], s["fvu"], color=color, lw=1.5)
            for _, r in s.iterrows():
                conv = bool(r.get("converged", True))
                ax.plot(r["l0"], r["fvu"], "o", color=color, mfc=color if conv else "white")
        ax.set_xscale("log", base=2)
        _ticks_at(ax, sorted(set(sub["k"])))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ds} (seed {int(sub['seed'].min())})")
    return _finish(fig, title, [*_arch_handles(archs), _hollow_handle()])


# ----------------------------------------------------------------------------- F6


def with_convergence(df: pd.DataFrame, runs: pd.DataFrame | None) -> pd.DataFrame:
    """``df`` (rows of runs: dataset, arch, k, width, rows, seed) with the runs' ``converged``
    flag joined on (True where ``runs`` does not say)."""
    keys = [c for c in ("dataset", "arch", "k", "width", "rows", "seed") if c in df.columns]
    if runs is None or runs.empty or "converged" not in runs.columns or df.empty:
        return df.assign(converged=True) if "converged" not in df.columns else df
    flags = runs[[*keys, "converged"]].drop_duplicates(keys)
    out = df.drop(columns=["converged"], errors="ignore").merge(flags, on=keys, how="left")
    out["converged"] = out["converged"].fillna(True).astype(bool)
    return out


def f6_fidelity(fidelity: pd.DataFrame, runs: pd.DataFrame | None = None) -> Figure:
    """Downstream fidelity against L0: the fraction of the clean model's behaviour that the
    SAE reconstruction spliced in at the hook recovers, relative to zero ablation (circles)
    and mean ablation (squares, dashed); cross-entropy for a causal LM, sentence-embedding
    similarity for an encoder (the ``kind`` column says which). Every seed with a fidelity
    row at each k: mean ± sd over them (the panel's title says how many per point; one seed
    has no bar); hollow where a run (``runs``' flag) has not converged."""
    title = "F6 · downstream fidelity with the reconstruction spliced in at the hook"
    xlabel = "mean L0 (active latents per token; = k here)"
    ylabel = "fraction recovered (1 = clean model)\n(mean ± sd over seeds)"
    fidelity = _rows(fidelity, "sweep", "main")
    if fidelity.empty or "kind" not in fidelity.columns:
        return _empty_figure(title, xlabel, ylabel,
                             "no dataset with fidelity: true in the config")
    # The runs of the fidelity rows' grids: a trained reference has their keys, not their flag.
    fidelity = with_convergence(fidelity, _rows(runs, "sweep", "main") if runs is not None else None)
    datasets = _datasets(fidelity)
    archs = _archs(fidelity)
    fig, axes = _grid(1, len(datasets), width=5.6, height=3.8)
    for ax, ds in zip(axes[0], datasets):
        sub = fidelity[fidelity["dataset"] == ds]
        counts = sub.drop_duplicates(["arch", "k", "seed"]).groupby(["arch", "k"])["seed"].nunique()
        for i, a in enumerate(archs):
            s = sub[sub["arch"] == a]
            if s.empty:
                continue
            c = arch_color(a, i)
            l0 = _seed_stats(s, "k", "l0").set_index("k")["mean"]
            for col, marker, ls in (("frac_recovered_zero", "o", "-"),
                                    ("frac_recovered_mean", "s", "--")):
                st = _seed_stats(s, "k", col)
                xs = _dodge(l0.reindex(st["k"]).to_numpy(), i, len(archs))
                ax.plot(xs, st["mean"], color=c, ls=ls)
                for xi, (_, r) in zip(xs, st.iterrows()):
                    _errbar(ax, float(xi), r["mean"], r["sd"], c, bool(r["converged"]),
                            marker=marker, ms=5)
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        kinds = ", ".join(FIDELITY_KINDS.get(k, k) for k in sorted(set(sub["kind"].astype(str))))
        ax.set_xscale("log", base=2)
        _ticks_at(ax, sorted(set(sub["k"])))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel, fontsize=9)
        spread = "" if counts.max() > 1 else ": no spread to show"
        ax.set_title(f"{ds} ({_count_label(counts, 'seed')} per point{spread})\n({kinds})",
                     fontsize=9)
    handles = [*_arch_handles(archs),
               Line2D([], [], color="0.3", marker="o", label="against zero ablation"),
               Line2D([], [], color="0.3", marker="s", ls="--", label="against mean ablation"),
               _hollow_handle()]
    return _finish(fig, title, handles, ncol=3)


# ----------------------------------------------------------------------------- F7


def budget_curves(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x width x arch x training rows of the budget grid: the mean, sd, min, max
    and n of held-out FVU and truth |cos| over seeds, of seed |cos| over seed pairs, and
    whether every run converged. A budget grid may span widths (the width axis's own
    budgets); tables without a width column get width 0.

    -> columns dataset, width, arch, rows, metric (fvu | truth_abs_cos | seed_abs_cos), mean,
    sd, lo, hi, n, converged."""
    cols = ["dataset", "width", "arch", "rows", "metric", "mean", "sd", "lo", "hi", "n",
            "converged"]
    keys = ["dataset", "width", "arch", "rows"]
    r = _rows(runs, "budget")
    p = _rows(seed_pairs(pairs), "budget")
    out = []
    if r.empty:
        return pd.DataFrame(columns=cols)
    r = r if "width" in r.columns else r.assign(width=0)
    p = p if "width" in p.columns or p.empty else p.assign(width=0)
    conv = r.groupby(keys)["converged"].agg(lambda v: bool(v.all())) \
        if "converged" in r.columns else None
    sources = [("fvu", r, "fvu"), ("truth_abs_cos", r, "truth_abs_cos"),
               ("seed_abs_cos", p, "mean_abs_cos")]
    for metric, df, col in sources:
        if df.empty or col not in df.columns:
            continue
        for (ds, width, arch, rows), g in df.groupby(keys):
            mean, sd, lo, hi, n = _stats(g[col])
            if n == 0:
                continue
            c = bool(conv.get((ds, width, arch, rows), True)) if conv is not None else True
            out.append(dict(dataset=ds, width=int(width), arch=arch, rows=int(rows),
                            metric=metric, mean=mean, sd=sd, lo=lo, hi=hi, n=n, converged=c))
    return pd.DataFrame(out, columns=cols)


_F7_METRICS = [
    ("seed_abs_cos", "matched |cos| between seeds\n(mean, range over seed pairs)"),
    ("truth_abs_cos", "matched |cos| to the truth\n(mean ± sd over seeds)"),
    ("fvu", "held-out FVU\n(mean ± sd over seeds)"),
]


def budget_label(rows: float) -> str:
    """A training budget to two significant figures: 500_736 -> "500k", 2_502_656 -> "2.5M"."""
    if not rows > 0:
        return str(rows)
    r = float(f"{rows:.2g}")
    if r >= 1e6:
        return f"{r / 1e6:g}M"
    if r >= 1e3:
        return f"{r / 1e3:g}k"
    return f"{r:g}"


def f7_budget(runs: pd.DataFrame, pairs: pd.DataFrame, chance: pd.DataFrame | None = None) -> Figure:
    """Seed stability, truth recovery and held-out FVU against the training rows (log x),
    per arch, one row of panels per dataset and budget width (the budget grid)."""
    title = "F7 · the training budget as an axis"
    xlabel = "training rows (tokens) per SAE"
    d = budget_curves(runs, pairs)
    widths_of = d.groupby("dataset")["width"].nunique()
    # A panel needs two budgets to be an axis: a width whose runs all have one budget (the
    # main width when only the width axis's largest width has budgets) says nothing here.
    if not d.empty:
        n_rows = d.groupby(["dataset", "width"])["rows"].transform("nunique")
        d = d[n_rows > 1]
    if d.empty:
        return _empty_figure(title, xlabel, "metric", "no budget axis (two budgets or more) in the config")
    # One row of panels per dataset, or per dataset and width where a dataset's budget
    # axis spans widths (the width axis's own budgets).
    panels = list(dict.fromkeys(zip(d["dataset"], d["width"])))
    metrics = [(m, label) for m, label in _F7_METRICS if m in set(d["metric"])]
    archs = _archs(d)
    fig, axes = _grid(len(panels), len(metrics), width=4.2, height=3.1)
    for r, (ds, width) in enumerate(panels):
        name = f"{ds} · {width:,} latents" if widths_of[ds] > 1 else ds
        for c, (metric, label) in enumerate(metrics):
            ax = axes[r][c]
            sub = d[(d["dataset"] == ds) & (d["width"] == width) & (d["metric"] == metric)]
            if sub.empty:
                _placeholder(ax, xlabel, label, NO_TRUTH)
                continue
            for i, a in enumerate(archs):
                s = sub[sub["arch"] == a].sort_values("rows")
                if s.empty:
                    continue
                color = arch_color(a, i)
                ax.plot(s["rows"], s["mean"], color=color, lw=1.3)
                for _, row in s.iterrows():
                    err = (row["lo"], row["hi"]) if metric == "seed_abs_cos" else row["sd"]
                    _errbar(ax, row["rows"], row["mean"], err, color, bool(row["converged"]))
            if metric == "seed_abs_cos" and chance is not None and not chance.empty:
                # At the budget runs' width: the chance table holds every width of the set.
                ch = chance[(chance["dataset"] == ds) & (chance["target"] == "seed") &
                            (chance["kind"] == "data_rows")]
                if "width" in ch.columns and width:
                    ch = ch[ch["width"] == width]
                ch = ch["mean_abs_cos"].mean()
                if np.isfinite(ch):
                    ax.axhline(ch, color="0.15", lw=1)
            ax.set_xscale("log")
            # A tick at each budget, labelled in words: the log axis's own minor labels
            # (3×10⁶, 4×10⁶, ...) overlap at these ranges.
            _ticks_at(ax, sorted(set(sub["rows"])), budget_label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{name} ({_count_label(sub['n'], metric)} per point)", fontsize=9)
    handles = [*_arch_handles(archs), _hollow_handle()]
    if chance is not None and not chance.empty:
        handles.append(Line2D([], [], color="0.15", label="chance: random training rows"))
    return _finish(fig, title, handles)


# ----------------------------------------------------------------------------- F8


def iter_steps(arch: str) -> tuple[str, int] | None:
    """``isae-iter`` -> ("isae", 3), ``topk+iter10`` -> ("topk", 10), ``topk`` -> ("topk", 0);
    None for an arch that is not a base plus thresholding steps."""
    return thresholding_steps(arch)


def own_rate(arch: str, base: str) -> bool:
    """Whether ``arch`` (a point of F8 on ``base``) trains at a rate of its own rather than
    its base's: a preset other than the base (``isae-iter``: its own lr sweep), where a
    variant (``isae+iter10``) inherits its preset's rate."""
    try:
        parsed = parse_arch(arch)
    except UserError:
        return False
    return not parsed.changes and parsed.preset != base


def iter_curves(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x base x thresholding steps (the iter grid): mean, sd, min, max, n of
    held-out FVU, truth |cos| and encode FLOPs per row over seeds, of seed |cos| over seed
    pairs. ``own_rate``: the point is a preset with a learning rate of its own (``own_rate``:
    ``isae-iter``), not its base's; the grid trains ``base+iter`` at the base's rate beside
    it, so that every step count of a base stands on one footing, and both are kept (F8
    draws the curve through the base's rate and the preset apart). -> columns dataset,
    base, steps, metric, mean, sd, lo, hi, n, converged, own_rate, arch; sorted by dataset,
    base, steps, metric, own_rate."""
    cols = ["dataset", "base", "steps", "metric", "mean", "sd", "lo", "hi", "n", "converged",
            "own_rate", "arch"]
    r = _rows(runs, "iter")
    p = _rows(seed_pairs(pairs), "iter")
    if r.empty:
        return pd.DataFrame(columns=cols)
    out = []
    sources = [("fvu", r, "fvu"), ("truth_abs_cos", r, "truth_abs_cos"),
               ("encode_flops", r, "encode_flops"), ("seed_abs_cos", p, "mean_abs_cos")]
    for metric, df, col in sources:
        if df.empty or col not in df.columns:
            continue
        for (ds, arch), g in df.groupby(["dataset", "arch"]):
            parsed = iter_steps(arch)
            if parsed is None:
                continue
            mean, sd, lo, hi, n = _stats(g[col])
            if n == 0:
                continue
            rr = r[(r["dataset"] == ds) & (r["arch"] == arch)]
            out.append(dict(dataset=ds, base=parsed[0], steps=parsed[1], metric=metric,
                            mean=mean, sd=sd, lo=lo, hi=hi, n=n, converged=_all_converged(rr),
                            own_rate=own_rate(arch, parsed[0]), arch=arch))
    d = pd.DataFrame(out, columns=cols)
    if d.empty:
        return d
    return d.sort_values(["dataset", "base", "steps", "metric", "own_rate"]).reset_index(drop=True)


#: F8: the factor (on 1 + steps) that moves a point at its own rate off its step count.
OWN_RATE_SHIFT = 1.12

_F8_METRICS = [
    ("fvu", "held-out FVU (mean ± sd)"),
    ("seed_abs_cos", "matched |cos| between seeds\n(mean, range over pairs)"),
    ("truth_abs_cos", "matched |cos| to the truth (mean ± sd)"),
    ("encode_flops", "encode cost per row (thousand FLOPs)"),
]


def f8_iter(runs: pd.DataFrame, pairs: pd.DataFrame) -> Figure:
    """Iterative hard thresholding against its number of steps (0 = the base arch), per
    base (topk: topk+iterN; isae: isae+iterN), every step count at the base's rate: FVU,
    stability, truth recovery and the encoder's cost per row, on a numeric axis of steps
    (symmetric log: 0, 1, 3, 10 at their values). A diamond off the curve marks a preset at
    a learning rate of its own (``isae-iter``'s sweep), beside the curve's point at its
    step count."""
    title = "F8 · iterative hard thresholding: steps against quality and cost"
    xlabel = "thresholding steps in the encoder (0 = the base)"
    d = iter_curves(runs, pairs)
    if d.empty:
        return _empty_figure(title, xlabel, "metric", "no iter runs (config iter.datasets is empty)")
    datasets = _datasets(d)
    metrics = [(m, label) for m, label in _F8_METRICS if m in set(d["metric"])]
    bases = _archs(d, "base")
    fig, axes = _grid(len(datasets), len(metrics), width=3.9, height=3.1)
    for r, ds in enumerate(datasets):
        for c, (metric, label) in enumerate(metrics):
            ax = axes[r][c]
            sub = d[(d["dataset"] == ds) & (d["metric"] == metric)]
            if sub.empty:
                _placeholder(ax, xlabel, label, NO_TRUTH)
                ax.set_xlabel(xlabel, fontsize=9)  # the sizes of the panels beside it
                ax.set_ylabel(label, fontsize=8)
                continue
            steps = sorted(set(d[d["dataset"] == ds]["steps"]))
            scale = 1e-3 if metric == "encode_flops" else 1.0  # FLOPs shown in thousands
            for i, b in enumerate(bases):
                s = sub[sub["base"] == b].sort_values("steps")
                if s.empty:
                    continue
                color = arch_color(b, i)
                # Side by side at one step count (1 + steps: the symlog axis is linear
                # below 1, where a factor would not move the 0-step points).
                xs = _dodge(1.0 + s["steps"].to_numpy(np.float64), i, len(bases)) - 1.0
                # A preset at its own rate: off the curve (which is at the base's rate), just
                # right of the curve's point at its step count.
                own = s["own_rate"].to_numpy(bool)
                xs = np.where(own, (1.0 + xs) * OWN_RATE_SHIFT - 1.0, xs)
                ax.plot(xs[~own], scale * s["mean"].to_numpy()[~own], color=color, lw=1.3)
                for xi, (_, row) in zip(xs, s.iterrows()):
                    err = ((row["lo"], row["hi"]) if metric == "seed_abs_cos"
                           else scale * row["sd"])
                    _errbar(ax, float(xi), scale * row["mean"], err, color,
                            bool(row["converged"]), marker="D" if row["own_rate"] else "o")
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
            _ticks_at(ax, steps)
            ax.set_xlim(-0.3, max(steps) * 1.25 + 0.5)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{ds} ({_count_label(sub['n'], metric)} per point)", fontsize=9)
    handles = [*[Line2D([], [], color=arch_color(b, i), marker="o", label=f"{b} + N steps, "
                        f"at {b}'s rate") for i, b in enumerate(bases)], _hollow_handle()]
    if d["own_rate"].any():
        names = ", ".join(sorted(set(d.loc[d["own_rate"], "arch"])))
        handles.append(Line2D([], [], color="0.3", marker="D", ls="none",
                              label=f"at its own tuned rate, not its base's ({names})"))
    return _finish(fig, title, handles, ncol=2)


# ----------------------------------------------------------------------------- F9


#: F9's metrics: (name, source table, column, scale, y label). Run metrics are per seed
#: (mean ± sd), pair metrics per seed pair (mean and range: pairs share seeds).
F9_METRICS = [
    ("seed_abs_cos", "pairs", "mean_abs_cos", 1.0,
     "matched |cos| between seeds, all latents\n(mean, range over seed pairs)"),
    ("live_abs_cos", "pairs", "live_mean_abs_cos", 1.0,
     "matched |cos| between seeds, live latents\n(mean, range over seed pairs)"),
    ("frac_gt_0.9", "pairs", "frac_gt_0.9", 1.0,
     "fraction of latents matched above 0.9\n(mean, range over seed pairs)"),
    # Dead atoms can collapse onto a few shared directions and match across seeds (isae-iter
    # at 32 x d on MiniLM), so the fraction above 0.9 is drawn over the live latents too.
    ("live_frac_gt_0.9", "pairs", "live_frac_gt_0.9", 1.0,
     "fraction of live latents matched above 0.9\n(mean, range over seed pairs)"),
    # On a synthetic set, whether the extra latents of an over-complete dictionary cost the
    # truth: the stability over all latents falls with width there while recovery does not.
    ("truth_abs_cos", "runs", "truth_abs_cos", 1.0,
     "matched |cos| to the true dictionary\n(mean ± sd over seeds)"),
    ("fvu", "runs", "fvu", 1.0, "held-out FVU\n(mean ± sd over seeds)"),
    ("dead_pct", "runs", "dead_frac", 100.0,
     "dead latents %: never fire on held-out rows\n(mean ± sd over seeds)"),
    ("delta_median", "runs", "ric_observed_q50", 1.0,
     "median δ_U on observed supports\n(mean ± sd over seeds)"),
    ("delta_max", "runs", "ric_observed_max", 1.0,
     "largest δ_U sampled (≤ δ_2k)\n(mean ± sd over seeds)"),
]
#: F9's metrics measured per seed pair (mean and range), not per seed.
PAIR_METRICS = {m for m, source, *_ in F9_METRICS if source == "pairs"}
#: F9's reference lines: the chance level of the live latents' matching (per pair, as many
#: random training rows as live latents), drawn beside the live stability.
F9_LIVE_CHANCE = ("live_chance", "pairs", "live_chance_data_rows", 1.0, "")


def width_curves(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x arch x width of the width axis (flag ``width_axis``): mean, sd, min,
    max and n of each of F9's metrics over seeds (run metrics) or seed pairs (pair
    metrics), scaled, and whether every run at that point converged.

    -> columns dataset, arch, width, metric (F9_METRICS' names and live_chance), mean, sd,
    lo, hi, n, converged."""
    cols = ["dataset", "arch", "width", "metric", "mean", "sd", "lo", "hi", "n", "converged"]
    r = _rows(runs, "width_axis")
    if r.empty or "width_axis" not in r.columns:
        return pd.DataFrame(columns=cols)
    p = _rows(seed_pairs(pairs), "width_axis")
    tables = {"runs": r, "pairs": p}
    conv = {key: _all_converged(g) for key, g in r.groupby(["dataset", "arch", "width"])}
    out = []
    for metric, source, col, scale, _ in [*F9_METRICS, F9_LIVE_CHANCE]:
        df = tables[source]
        if df.empty or col not in df.columns:
            continue
        for (ds, arch, width), g in df.groupby(["dataset", "arch", "width"]):
            mean, sd, lo, hi, n = _stats(g[col])
            if n == 0:
                continue
            out.append(dict(dataset=ds, arch=arch, width=int(width), metric=metric,
                            mean=scale * mean, sd=scale * sd, lo=scale * lo, hi=scale * hi,
                            n=n, converged=conv.get((ds, arch, width), True)))
    return pd.DataFrame(out, columns=cols)


def width_label(width: int, d: float | None, unit: str = "d") -> str:
    """A tick of the width axis: 1536 -> "1536\n4×d" when d (384) divides it, else the
    width alone. ``unit`` names what ``d`` counts ("atoms" on a synthetic set, whose
    widths are multiples of its true dictionary, not of its dimension)."""
    if d and np.isfinite(d) and d > 0 and width % int(d) == 0:
        return f"{width}\n{width // int(d)}×{unit}"
    return str(width)


def width_units(runs: pd.DataFrame) -> dict[str, tuple[float, str]]:
    """Per dataset, what its width ticks count in: the true dictionary's atoms where the
    runs table has them (synthetic sets), else the activations' dimension."""
    out: dict[str, tuple[float, str]] = {}
    for ds, g in runs.groupby("dataset"):
        atoms = g["truth_n_atoms"].max() if "truth_n_atoms" in g.columns else np.nan
        if np.isfinite(atoms) and atoms > 0:
            out[ds] = (float(atoms), "atoms")
        elif "ric_d" in g.columns and np.isfinite(g["ric_d"].max()):
            out[ds] = (float(g["ric_d"].max()), "d")
    return out


def f9_width(runs: pd.DataFrame, pairs: pd.DataFrame, chance: pd.DataFrame | None = None
             ) -> Figure:
    """Stability, reconstruction, dead latents and restricted isometry against the width
    (log axis), one line per arch, one row of panels per dataset of the width axis: seed
    |cos| over all latents (with the chance level of two dictionaries of random training
    rows at each width) and over the live latents (with, dotted in the arch's colour, the
    chance level of as many random rows), the fraction above 0.9, recovery of the true
    dictionary (synthetic sets), held-out FVU, dead %, the median and the largest δ_U (with
    the 1/3 and √2−1 lines)."""
    title = "F9 · the width (expansion factor) as an axis"
    xlabel = "latents (width), log scale"
    d = width_curves(runs, pairs)
    if d.empty:
        return _empty_figure(title, xlabel, "metric",
                             "no width axis in the config (width_study.datasets is empty)")
    datasets = _datasets(d)
    metrics = [(m, label) for m, _, _, _, label in F9_METRICS if m in set(d["metric"])]
    archs = _archs(d)
    units = width_units(runs)
    # One row of panels per dataset; a single dataset's eight panels wrap after four, so
    # that the figure stays readable at a page's width.
    per_row = len(metrics) if len(datasets) > 1 else min(4, len(metrics))
    wraps = -(-len(metrics) // per_row)
    fig, axes = _grid(len(datasets) * wraps, per_row, width=3.6, height=3.1)
    for ax in axes.flat[len(datasets) * len(metrics):]:
        ax.set_visible(False)
    for r, ds in enumerate(datasets):
        widths = sorted(set(d[d["dataset"] == ds]["width"]))
        for c, (metric, label) in enumerate(metrics):
            ax = axes[r * wraps + c // per_row][c % per_row]
            sub = d[(d["dataset"] == ds) & (d["metric"] == metric)]
            if sub.empty:
                why = NO_TRUTH if metric == "truth_abs_cos" else "not measured here"
                _placeholder(ax, xlabel, label, why)
                continue
            for i, a in enumerate(archs):
                s = sub[sub["arch"] == a].sort_values("width")
                if s.empty:
                    continue
                color = arch_color(a, i)
                xs = _dodge(s["width"], i, len(archs), step=0.06)
                ax.plot(xs, s["mean"], color=color, lw=1.3)
                pair = metric in PAIR_METRICS
                for xi, (_, row) in zip(xs, s.iterrows()):
                    err = (row["lo"], row["hi"]) if pair else row["sd"]
                    _errbar(ax, float(xi), row["mean"], err, color, bool(row["converged"]))
                if metric == "live_abs_cos":
                    lc = d[(d["dataset"] == ds) & (d["metric"] == "live_chance") &
                           (d["arch"] == a)].sort_values("width")
                    ax.plot(lc["width"], lc["mean"], color=color, lw=0.9, ls=":")
            if metric == "seed_abs_cos" and chance is not None and not chance.empty:
                ch = chance[(chance["dataset"] == ds) & (chance["target"] == "seed") &
                            (chance["kind"] == "data_rows") & chance["width"].isin(widths)]
                ch = ch.groupby("width")["mean_abs_cos"].mean()
                ax.plot(ch.index, ch.to_numpy(), color="0.15", lw=1, ls="--")
            if metric.startswith("delta"):
                for t, ls in zip(DELTA_THRESHOLDS.values(), ["-.", ":"]):
                    ax.axhline(t, color="tab:orange", ls=ls, lw=1.2)
            ax.set_xscale("log", base=2)
            _ticks_at(ax, widths, lambda w, ds=ds: width_label(int(w), *units.get(ds, (None,))))
            ax.tick_params(axis="x", labelsize=7)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(label, fontsize=7)
            unit = "pair" if metric in PAIR_METRICS else "seed"
            lo, hi = int(sub["n"].min()), int(sub["n"].max())
            count = str(lo) if lo == hi else f"{lo}–{hi}"
            ax.set_title(f"{ds} ({count} {unit}{'s' if hi != 1 else ''} per point)", fontsize=8)
    handles = [*_arch_handles(archs), _hollow_handle()]
    if chance is not None and not chance.empty:
        handles.append(Line2D([], [], color="0.15", ls="--",
                              label="chance: random training rows, all latents"))
    if (d["metric"] == "live_chance").any():
        handles.append(Line2D([], [], color="0.3", ls=":",
                              label="chance: as many random rows as live latents"))
    handles += [Line2D([], [], color="tab:orange", ls="-.", label="δ = 1/3"),
                Line2D([], [], color="tab:orange", ls=":", label="δ = √2−1")]
    return _finish(fig, title, handles, ncol=4)


# ----------------------------------------------------------------------------- entrance

#: Figure name -> the function that draws it. The workflow has one rule per figure, named
#: after its function (isae.study.plan.FIGURE_RULES), and one script (scripts/figure.py).
FIGURES = {
    "F1": f1_stability,
    "F2": f2_truth_recovery,
    "F3": f3_ric,
    "F4": f4_ablation,
    "F5": f5_fvu_l0,
    "F6": f6_fidelity,
    "F7": f7_budget,
    "F8": f8_iter,
    "F9": f9_width,
}


def draw(name: str, tables: dict[str, pd.DataFrame], **params) -> Figure:
    """Figure ``name`` (F1 ... F9) from the collected tables it reads (by table name:
    runs, pairs, latents, chance, fidelity) and its other parameters."""
    if name not in FIGURES:
        raise UserError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    return FIGURES[name](**tables, **params)


# ----------------------------------------------------------------------------- saving


def save_figure(fig: Figure, paths: Sequence[str | os.PathLike], dpi: int = 150) -> None:
    """Save to each path (format from its suffix) under a temporary name, then rename."""
    for path in paths:
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fmt = os.path.splitext(path)[1].lstrip(".")
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    plt.close(fig)
