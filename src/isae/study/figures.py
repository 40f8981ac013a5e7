"""The study's figures F1–F6: one function each, from the collected tables to a Figure.

Every function takes the DataFrames written by the workflow's collect rules (identity
columns dataset / arch / k / width / seed or seed_a, seed_b, grid flags main / sweep /
ablation, and the stage's own columns), returns a ``matplotlib.figure.Figure`` with labelled
axes, and draws a labelled placeholder panel when the config produced no data for it (e.g.
F2 without a synthetic dataset), so that every target exists for every config.

The numbers behind F4 come from ``ablation_deltas``, a pure function, tested on its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display (CI, SLURM nodes)

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from isae.errors import UserError
from isae.models.config import parse_arch
from isae.study.tables import arch_sort_key

DELTA_THRESHOLDS = {"δ = 1/3": 1.0 / 3.0, "δ = √2−1": math.sqrt(2.0) - 1.0}
#: Fixed colours so an arch looks the same in every figure.
ARCH_COLORS = {
    "topk": "#d62728",
    "relu": "#9467bd",
    "isae": "#1f77b4",
    "isae-iter": "#2ca02c",
    "dl": "#7f7f7f",
}
ISAE_PRESETS = ("isae", "isae-iter")
#: What the fidelity fraction is computed on, by model kind (isae.analysis.fidelity).
FIDELITY_KINDS = {"lm": "next-token cross-entropy", "encoder": "sentence-embedding similarity"}


def arch_color(arch: str, i: int = 0) -> str:
    return ARCH_COLORS.get(arch, plt.get_cmap("tab10")(i % 10))


def _rows(df: pd.DataFrame, *grids: str) -> pd.DataFrame:
    """Rows flagged with any of ``grids`` (all rows when the flags are absent)."""
    if df.empty or not all(g in df.columns for g in grids):
        return df
    mask = np.zeros(len(df), bool)
    for g in grids:
        mask |= df[g].astype(bool).to_numpy()
    return df[mask]


def _archs(df: pd.DataFrame) -> list[str]:
    return sorted(set(df["arch"]), key=arch_sort_key)


def _datasets(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["dataset"]))


def _panels(n: int, width: float = 4.6, height: float = 3.6):
    n = max(n, 1)
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _placeholder(ax, xlabel: str, ylabel: str, why: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True,
            color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _empty_figure(title: str, xlabel: str, ylabel: str, why: str) -> Figure:
    fig, (ax,) = _panels(1)
    _placeholder(ax, xlabel, ylabel, why)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _mean_sd(df: pd.DataFrame, by: list[str], col: str) -> pd.DataFrame:
    g = df.groupby(by, sort=True)[col]
    out = g.agg(["mean", "count"]).reset_index()
    out["sd"] = g.std(ddof=1).fillna(0.0).to_numpy()
    return out


def _swept(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the archs trained at two or more k (the sweep); all rows if there are none.

    Curves against k need several k; a single-k arch such as relu (whose L0 is not k)
    would only stretch the axis."""
    n_k = df.groupby("arch")["k"].nunique()
    swept = set(n_k[n_k > 1].index)
    return df[df["arch"].isin(swept)] if swept else df


# ----------------------------------------------------------------------------- F1


def f1_stability(latents: pd.DataFrame, matches: pd.DataFrame) -> Figure:
    """Distribution of matched |cos| between seeds, per arch, one panel per dataset.

    ``latents``: per matched latent (dataset, arch, seed_a, seed_b, abs_cos) of the main
    grid's seed pairs; ``matches``: per-pair summaries (mean_abs_cos) drawn as dots.
    """
    title = "F1 · dictionary stability across seeds: TopK vs iSAE presets"
    xlabel, ylabel = "architecture", "matched |cos| between seeds (per latent)"
    if latents.empty:
        return _empty_figure(title, xlabel, ylabel, "no seed pairs (needs ≥ 2 seeds)")
    matches = _rows(matches, "main")
    datasets = _datasets(latents)
    fig, axes = _panels(len(datasets))
    for ax, ds in zip(axes, datasets):
        sub = latents[latents["dataset"] == ds]
        archs = _archs(sub)
        data = [sub.loc[sub["arch"] == a, "abs_cos"].to_numpy(np.float64) for a in archs]
        pos = np.arange(len(archs))
        parts = ax.violinplot(data, positions=pos, showmedians=True, widths=0.8)
        for body, a in zip(parts["bodies"], archs):
            body.set_facecolor(arch_color(a))
            body.set_alpha(0.45)
        for x, a in zip(pos, archs):
            m = matches[(matches["dataset"] == ds) & (matches["arch"] == a)]["mean_abs_cos"]
            ax.scatter(np.full(len(m), x), m, color="k", s=14, zorder=3,
                       label="mean of one seed pair" if x == 0 else None)
        ax.axhline(0.9, color="0.5", lw=0.8, ls=":")
        if "chance_mean_abs_cos" in matches:
            chance = matches.loc[matches["dataset"] == ds, "chance_mean_abs_cos"].mean()
            if np.isfinite(chance):
                ax.axhline(chance, color="0.3", lw=1, ls="--",
                           label=f"two random dictionaries ({chance:.2f})")
        ax.set_xticks(pos, archs, rotation=30, ha="right")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        n_pairs = sub.groupby(["arch", "seed_a", "seed_b"]).ngroups
        ax.set_title(f"{ds} ({n_pairs} seed pairs)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- F2


def f2_truth_recovery(truth: pd.DataFrame, true_k: dict | None = None) -> Figure:
    """Mean matched |cos| to the true dictionary against k, per arch (synthetic sets).

    ``truth``: per-checkpoint truth-match summaries (dataset, arch, k, seed, mean_abs_cos);
    mean ± sd over seeds. ``true_k``: dataset -> the true k, drawn as a vertical line.
    """
    title = "F2 · ground-truth recovery against k (synthetic)"
    xlabel, ylabel = "k (active latents per row)", "matched |cos| to the true dictionary"
    truth = _rows(truth, "main", "sweep")
    if truth.empty:
        return _empty_figure(title, xlabel, ylabel, "no synthetic dataset in the config")
    datasets = _datasets(truth)
    fig, axes = _panels(len(datasets))
    for ax, ds in zip(axes, datasets):
        sub = truth[truth["dataset"] == ds]
        for i, a in enumerate(_archs(sub)):
            s = _mean_sd(sub[sub["arch"] == a], ["k"], "mean_abs_cos")
            ax.errorbar(s["k"], s["mean"], yerr=s["sd"], marker="o", capsize=3,
                        color=arch_color(a, i), label=a)
        if true_k and ds in true_k:
            ax.axvline(true_k[ds], color="0.3", ls=":", lw=1, label=f"true k = {true_k[ds]}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ds} (mean ± sd over seeds)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- F3


def f3_ric(ric: pd.DataFrame) -> Figure:
    """δ_U on observed supports against k, per arch, with thresholds and calibrations.

    ``ric``: per-checkpoint ric summaries (observed_q50, observed_q90, random_support_q50,
    gaussian_q50, optional truth_q50). Lines: median δ over the sampled unions (band to the
    90% quantile); dashed: random supports of the same sizes on the same dictionary; grey:
    a Gaussian dictionary of the same shape; black: the true dictionary on its own supports.
    """
    title = "F3 · restricted isometry δ_U on observed supports against k"
    xlabel, ylabel = "k (active latents per row)", "δ_U (median; band to q90)"
    ric = _rows(ric, "main", "sweep")
    if ric.empty:
        return _empty_figure(title, xlabel, ylabel, "no checkpoints")
    datasets = _datasets(ric)
    fig, axes = _panels(len(datasets), width=5.2)
    for ax, ds in zip(axes, datasets):
        sub = _swept(ric[ric["dataset"] == ds])
        for i, a in enumerate(_archs(sub)):
            c = arch_color(a, i)
            s = sub[sub["arch"] == a].groupby("k").mean(numeric_only=True).reset_index()
            ax.plot(s["k"], s["observed_q50"], marker="o", color=c, label=f"{a}")
            ax.fill_between(s["k"], s["observed_q50"], s["observed_q90"], color=c, alpha=0.15)
            ax.plot(s["k"], s["random_support_q50"], ls="--", color=c, lw=1)
        by_k = sub.groupby("k").mean(numeric_only=True).reset_index()
        ax.plot(by_k["k"], by_k["gaussian_q50"], color="0.55", lw=2, alpha=0.7,
                label="Gaussian dictionary (same |U|)")
        if "truth_q50" in by_k and by_k["truth_q50"].notna().any():
            ax.plot(by_k["k"], by_k["truth_q50"], color="k", ls=":", lw=1.5,
                    label="true dictionary, true supports")
        ax.plot([], [], ls="--", color="0.3", lw=1, label="random supports (same dict.)")
        for (name, t), ls in zip(DELTA_THRESHOLDS.items(), ["-.", ":"]):
            ax.axhline(t, color="tab:orange", ls=ls, lw=1.2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- F4


def ablation_base(variant: str) -> tuple[str, str] | None:
    """``topk+signed`` -> ("topk", "+signed"); ``isae-tied`` -> ("isae", "-tied"); a preset
    (or a name that is no architecture) -> None."""
    try:
        arch = parse_arch(variant)
    except UserError:
        return None
    return (arch.preset, arch.changes) if arch.changes else None


def ablation_deltas(evals: pd.DataFrame, matches: pd.DataFrame,
                    truth: pd.DataFrame | None = None) -> pd.DataFrame:
    """Change of each ablation variant against its base preset, on the ablation grid.

    For a variant v of base b (``topk+x`` against topk, ``isae-x`` against isae) at the same
    dataset, k and width: Δ = mean(v) − mean(b), with means over ablation seeds (MSE/dim,
    truth |cos|) or ablation seed pairs (seed |cos|), and sd = sqrt(sd_v²/n_v + sd_b²/n_b)
    (the standard error of the difference; NaN with fewer than 2 values on either side).

    -> columns dataset, k, width, variant, base, change, metric, delta, se, n_variant, n_base.
    """
    sources = [("mse_per_dim", _rows(evals, "ablation"), "mse_per_dim"),
               ("seed_abs_cos", _rows(matches, "ablation"), "mean_abs_cos")]
    if truth is not None and not truth.empty:
        sources.append(("truth_abs_cos", _rows(truth, "ablation"), "mean_abs_cos"))
    rows = []
    for metric, df, col in sources:
        if df.empty:
            continue
        stats = {key: g[col].astype(float).dropna().to_numpy()
                 for key, g in df.groupby(["dataset", "k", "width", "arch"])}
        for (ds, k, w, arch), v in stats.items():
            parsed = ablation_base(arch)
            if parsed is None:
                continue
            base, change = parsed
            b = stats.get((ds, k, w, base))
            if b is None or len(v) == 0 or len(b) == 0:
                continue
            se = (math.sqrt(v.var(ddof=1) / len(v) + b.var(ddof=1) / len(b))
                  if len(v) > 1 and len(b) > 1 else math.nan)
            rows.append(dict(dataset=ds, k=int(k), width=int(w), variant=arch, base=base,
                             change=change, metric=metric, delta=float(v.mean() - b.mean()),
                             se=se, n_variant=len(v), n_base=len(b)))
    cols = ["dataset", "k", "width", "variant", "base", "change", "metric", "delta", "se",
            "n_variant", "n_base"]
    return pd.DataFrame(rows, columns=cols)


_F4_METRICS = {
    "seed_abs_cos": "Δ matched |cos| between seeds",
    "mse_per_dim": "Δ held-out MSE/dim (normalised)",
    "truth_abs_cos": "Δ matched |cos| to the truth",
}


def f4_ablation(evals: pd.DataFrame, matches: pd.DataFrame,
                truth: pd.DataFrame | None = None) -> Figure:
    """Each switch added alone to topk (+x) and removed alone from isae (−x): the change in
    stability, in MSE and (synthetic) in truth recovery, one row of panels per dataset."""
    title = "F4 · ablation: one switch added to TopK or removed from iSAE"
    d = ablation_deltas(evals, matches, truth)
    if d.empty:
        return _empty_figure(title, "change against the base preset", "variant",
                             "no ablation runs (config ablation.datasets is empty)")
    datasets = _datasets(d)
    metrics = [m for m in _F4_METRICS if m in set(d["metric"])]
    fig, axes = plt.subplots(len(datasets), len(metrics), squeeze=False,
                             figsize=(4.4 * len(metrics), 0.9 + 0.45 * d["variant"].nunique()
                                      * len(datasets) + 1.2 * len(datasets)))
    for r, ds in enumerate(datasets):
        sub = d[d["dataset"] == ds]
        variants = sorted(set(sub["variant"]), key=lambda v: (v.startswith("isae"), v))
        y = np.arange(len(variants))
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            m = sub[sub["metric"] == metric].set_index("variant").reindex(variants)
            colors = [arch_color(b) for b in m["base"].fillna("topk")]
            ax.barh(y, m["delta"].fillna(0.0), xerr=m["se"].fillna(0.0), color=colors,
                    alpha=0.8, capsize=3)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(y, variants)
            ax.invert_yaxis()
            ax.set_xlabel(_F4_METRICS[metric])
            ax.set_ylabel("variant (vs topk or isae)")
            k, w = int(sub["k"].iloc[0]), int(sub["width"].iloc[0])
            ax.set_title(f"{ds}, k={k}, width={w}", fontsize=9)
    fig.suptitle(title + " (bars: mean difference; whiskers: standard error)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- F5


def f5_fvu_l0(evals: pd.DataFrame) -> Figure:
    """Held-out FVU against mean L0 over the k sweep, per arch, one panel per dataset
    (mean over seeds at each k; each point annotated with its k)."""
    title = "F5 · reconstruction–sparsity trade-off: FVU against L0 over the k sweep"
    xlabel, ylabel = "mean L0 (active latents per held-out row)", "held-out FVU"
    evals = _rows(evals, "main", "sweep")
    if evals.empty:
        return _empty_figure(title, xlabel, ylabel, "no checkpoints")
    datasets = _datasets(evals)
    fig, axes = _panels(len(datasets))
    for ax, ds in zip(axes, datasets):
        sub = evals[evals["dataset"] == ds]
        for i, a in enumerate(_archs(sub)):
            s = sub[sub["arch"] == a].groupby("k").mean(numeric_only=True).reset_index()
            s = s.sort_values("k")
            ax.plot(s["l0"], s["fvu"], marker="o", color=arch_color(a, i), label=a)
            for _, r in s.iterrows():
                ax.annotate(f"k={int(r['k'])}", (r["l0"], r["fvu"]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(ds)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- F6


def f6_fidelity(fidelity: pd.DataFrame) -> Figure:
    """Downstream fidelity against L0: the fraction of the clean model's behaviour that the
    SAE reconstruction spliced in at the hook recovers, relative to zero ablation (solid) and
    mean ablation (dashed); cross-entropy for a causal LM, sentence-embedding similarity for
    an encoder (the ``kind`` column says which)."""
    title = "F6 · downstream fidelity with the reconstruction spliced in at the hook"
    xlabel = "mean L0 (active latents per token)"
    ylabel = "fraction recovered (1 = clean model)"
    fidelity = _rows(fidelity, "main", "sweep")
    if fidelity.empty or "kind" not in fidelity.columns:
        return _empty_figure(title, xlabel, ylabel,
                             "no dataset with fidelity: true in the config")
    datasets = _datasets(fidelity)
    fig, axes = _panels(len(datasets), width=6.0, height=4.0)
    for ax, ds in zip(axes, datasets):
        sub = fidelity[fidelity["dataset"] == ds]
        for i, a in enumerate(_archs(sub)):
            s = sub[sub["arch"] == a].groupby("k").mean(numeric_only=True).reset_index()
            s = s.sort_values("k")
            c = arch_color(a, i)
            ax.plot(s["l0"], s["frac_recovered_zero"], marker="o", color=c,
                    label=f"{a} vs zero abl.")
            ax.plot(s["l0"], s["frac_recovered_mean"], marker="s", ls="--", color=c,
                    label=f"{a} vs mean abl.")
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        kinds = ", ".join(FIDELITY_KINDS.get(k, k) for k in sorted(set(sub["kind"].astype(str))))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ds} ({kinds})" if kinds else ds)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


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
