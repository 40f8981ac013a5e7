"""Aggregation of per-run Parquet files into the study's tables T1 and T2.

Each stage of the workflow writes one small Parquet per checkpoint (eval, ric, truth match)
or per seed pair (match). ``collect`` stacks them with identity columns taken from the
workflow (dataset, arch, k, width, seed or seed_a/seed_b, and the grid flags main / sweep /
ablation), ``summarize`` reduces them to mean, sample standard deviation and count per
dataset x arch x k x width, and ``to_markdown`` / ``to_latex`` render "mean ± sd" cells.

Conventions: the standard deviation is the sample one (ddof = 1) over seeds (or over seed
pairs for pair metrics); with one value it is NaN and the cell shows the mean alone. NaN
values (a metric that does not apply) are left out of mean, sd and n; a metric with no
value at all renders as an em dash.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from isae.errors import UserError
from isae.models.config import PRESETS, parse_arch

#: Keys of one table row: a dataset and one SAE configuration.
ROW_KEYS = ["dataset", "arch", "k", "width"]
#: Grid flags stored by the workflow beside the identity columns.
GRIDS = ["main", "sweep", "ablation"]
#: Presets first, in the order the text discusses them; other archs (variants) after.
ARCH_ORDER = list(PRESETS)


@dataclass(frozen=True)
class Metric:
    """One column of a summary table."""

    column: str
    """Column of the per-run (or per-pair) table it is computed from."""
    label: str
    """Header in Markdown."""
    tex: str
    """Header in LaTeX (math mode where needed)."""
    digits: int = 3
    """Decimals shown."""
    scale: float = 1.0
    """Factor applied before display and storage (100 for a percentage)."""
    name: str | None = None
    """Prefix of the output columns ``<name>_mean/_sd/_n``; default ``column``."""
    optional: bool = False
    """A source table without this column gives NaN (e.g. truth calibration off synthetic)."""

    @property
    def key(self) -> str:
        return self.name or self.column


# ----------------------------------------------------------------------------- collect


def collect(
    paths: Sequence[str | os.PathLike],
    ids: Sequence[dict],
    columns: Sequence[str] | None = None,
    where: str | None = None,
) -> pd.DataFrame:
    """Stack Parquet tables, each tagged with its identity columns.

    ``ids[i]`` (e.g. dataset, arch, k, width, seed, grid flags) is added to every row of
    ``paths[i]`` and replaces columns of the same name there: the workflow's identity is
    the authority. ``where`` keeps only rows where that boolean column is true, ``columns``
    keeps only those data columns.
    """
    if len(paths) != len(ids):
        raise UserError(f"collect: {len(paths)} tables but {len(ids)} identity rows")
    frames = []
    for path, ident in zip(paths, ids):
        df = pd.read_parquet(path)
        if where is not None:
            if where not in df.columns:
                raise UserError(f"{path}: no column {where!r} to filter on")
            df = df[df[where].astype(bool)]
        if columns is not None:
            missing = [c for c in columns if c not in df.columns]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
            df = df[list(columns)]
        df = df.drop(columns=[c for c in ident if c in df.columns])
        tags = pd.DataFrame({c: [v] * len(df) for c, v in ident.items()}, index=df.index)
        frames.append(pd.concat([tags, df], axis=1))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ROW_KEYS})
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- summarize


def arch_sort_key(arch: str) -> tuple:
    """Presets in ARCH_ORDER, then variants grouped under their preset, alphabetically; names
    that are no architecture last."""
    try:
        preset = parse_arch(arch).preset
    except UserError:
        return (len(ARCH_ORDER), arch)
    return (ARCH_ORDER.index(preset), "" if arch == preset else arch)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by dataset (as given), arch (ARCH_ORDER), k, width."""
    if df.empty:
        return df.reset_index(drop=True)
    datasets = list(dict.fromkeys(df["dataset"]))
    order = sorted(
        range(len(df)),
        key=lambda i: (
            datasets.index(df["dataset"].iloc[i]),
            arch_sort_key(str(df["arch"].iloc[i])),
            int(df["k"].iloc[i]),
            int(df["width"].iloc[i]),
        ),
    )
    return df.iloc[order].reset_index(drop=True)


def mean_sd(
    df: pd.DataFrame, metrics: Sequence[Metric], by: Sequence[str] = ROW_KEYS
) -> pd.DataFrame:
    """Per group of ``by``: ``<key>_mean``, ``<key>_sd`` (ddof 1) and ``<key>_n`` of each
    metric (scaled), ignoring NaN. An empty input gives an empty table with those columns."""
    out_cols = [f"{m.key}_{s}" for m in metrics for s in ("mean", "sd", "n")]
    if df.empty:
        return pd.DataFrame(columns=[*by, *out_cols])
    missing = [m.column for m in metrics if m.column not in df.columns and not m.optional]
    if missing:
        raise UserError(f"table is missing column(s) {', '.join(missing)}")
    rows = []
    for key, g in df.groupby(list(by), sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            if m.column not in g.columns:
                v = np.array([], np.float64)
            else:
                v = pd.to_numeric(g[m.column], errors="coerce").to_numpy(np.float64) * m.scale
            v = v[~np.isnan(v)]
            row[f"{m.key}_mean"] = float(v.mean()) if len(v) else math.nan
            row[f"{m.key}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            row[f"{m.key}_n"] = len(v)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *out_cols])


def summarize(
    sources: Iterable[tuple[pd.DataFrame, Sequence[Metric]]], by: Sequence[str] = ROW_KEYS
) -> pd.DataFrame:
    """Outer-join ``mean_sd`` of several sources on ``by`` (a row exists where any source
    has data), sorted by ``sort_rows``."""
    table = None
    for df, metrics in sources:
        part = mean_sd(df, metrics, by)
        for c in by:
            part[c] = part[c].astype(object)
        table = part if table is None else table.merge(part, on=list(by), how="outer")
    if table is None:
        raise UserError("summarize: no sources")
    for c in table.columns:
        if c.endswith("_n"):
            table[c] = table[c].fillna(0).astype(int)
    return sort_rows(table)


# ----------------------------------------------------------------------------- T1 and T2

#: T1 reconstruction (held-out, per seed) ...
T1_EVAL = [
    Metric("mse_per_dim", "MSE/dim", r"MSE/dim"),
    Metric("fvu", "FVU", r"FVU"),
    Metric("l0", "L0", r"$L_0$", digits=1),
    Metric("dead_frac", "dead %", r"dead \%", digits=1, scale=100.0),
]
#: ... and stability (per seed pair) ...
T1_MATCH = [
    Metric("mean_abs_cos", "seed |cos|", r"seed $|\cos|$"),
    Metric("frac_gt_0.9", "seed >0.9", r"seed $>0.9$"),
    Metric("chance_mean_abs_cos", "chance |cos|", r"chance $|\cos|$"),
]
#: ... and ground-truth recovery where there is a truth (per seed).
T1_TRUTH = [
    Metric("mean_abs_cos", "truth |cos|", r"truth $|\cos|$", name="truth_abs_cos"),
    Metric("frac_gt_0.9", "truth >0.9", r"truth $>0.9$", name="truth_frac_gt_0.9"),
]
#: T2 code consistency between seeds (per seed pair) ...
T2_MATCH = [
    Metric("code_pearson_all", "code corr", r"code corr."),
    Metric("code_jaccard", "support Jaccard", r"supp.\ Jaccard"),
    Metric("code_rel_dist", "rel. code dist", r"rel.\ code dist."),
]
#: ... and restricted isometry on observed supports with its calibrations (per seed).
T2_RIC = [
    Metric("observed_q50", "δ median", r"$\delta$ med."),
    Metric("observed_q90", "δ q90", r"$\delta$ q90"),
    Metric("observed_frac_lt_1/3", "frac δ<1/3", r"frac.\ $\delta<1/3$"),
    Metric("observed_frac_lt_sqrt2-1", "frac δ<√2−1", r"frac.\ $\delta<\sqrt2-1$"),
    Metric("random_support_q50", "δ med. random supp.", r"$\delta$ med.\ rand.\ supp."),
    Metric("gaussian_q50", "δ med. Gaussian dict.", r"$\delta$ med.\ Gauss.\ dict."),
    Metric("truth_q50", "δ med. true dict.", r"$\delta$ med.\ true dict.", optional=True),
]


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the main grid (all rows when the table has no grid flag)."""
    if "main" not in df.columns or df.empty:
        return df
    return df[df["main"].astype(bool)]


def table_t1(evals: pd.DataFrame, matches: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """T1: reconstruction and stability per dataset x arch on the main grid."""
    return summarize(
        [
            (main_rows(evals), T1_EVAL),
            (main_rows(matches), T1_MATCH),
            (main_rows(truth), T1_TRUTH),
        ]
    )


def table_t2(matches: pd.DataFrame, ric: pd.DataFrame, ric_metrics=None) -> pd.DataFrame:
    """T2: code consistency and restricted-isometry summary on the main grid."""
    return summarize([(main_rows(matches), T2_MATCH), (main_rows(ric), ric_metrics or T2_RIC)])


# ----------------------------------------------------------------------------- rendering


def format_cell(mean: float, sd: float, digits: int, pm: str = " ± ", dash: str = "—") -> str:
    """'0.143 ± 0.004'; the mean alone when sd is NaN; ``dash`` when the mean is NaN."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return dash
    cell = f"{mean:.{digits}f}"
    if sd is not None and not math.isnan(sd):
        cell += f"{pm}{sd:.{digits}f}"
    return cell


def _cells(table: pd.DataFrame, metrics: Sequence[Metric], pm: str, dash: str) -> list[list[str]]:
    rows = []
    for _, r in table.iterrows():
        cells = [str(r["dataset"]), str(r["arch"]), str(int(r["k"])), str(int(r["width"]))]
        for m in metrics:
            cells.append(format_cell(r[f"{m.key}_mean"], r[f"{m.key}_sd"], m.digits, pm, dash))
        rows.append(cells)
    return rows


def to_markdown(table: pd.DataFrame, metrics: Sequence[Metric], caption: str = "") -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned."""
    header = ["dataset", "arch", "k", "width", *[m.label for m in metrics]]
    lines = [f"{caption}\n"] if caption else []
    lines.append("| " + " | ".join(h.replace("|", r"\|") for h in header) + " |")
    lines.append("|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|")
    for cells in _cells(table, metrics, " ± ", "—"):
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, metrics: Sequence[Metric], caption: str = "",
             label: str = "") -> str:
    """A booktabs ``table`` environment with ``$a \\pm b$`` cells."""
    header = ["dataset", "arch", "$k$", "width", *[m.tex for m in metrics]]
    out = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        out.append(r"\caption{" + tex_escape(caption) + "}")
    if label:
        out.append(r"\label{" + label + "}")
    out.append(r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}")
    out += [r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for cells in _cells(table, metrics, r" \pm ", "--"):
        text = [tex_escape(c) for c in cells[:4]]
        text += [c if c == "--" else f"${c}$" for c in cells[4:]]
        out.append(" & ".join(text) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


#: Columns of T1 and T2, in display order.
T1_METRICS = [*T1_EVAL, *T1_MATCH, *T1_TRUTH]
T2_METRICS = [*T2_MATCH, *T2_RIC]
T1_CAPTION = (
    "T1. Held-out reconstruction (normalised activations) and dictionary stability per "
    "dataset x arch at the main k and width: mean ± sd over seeds (MSE/dim, FVU, L0, dead %, "
    "truth) or over seed pairs (seed |cos|, fraction of matched latents above 0.9)."
)
T2_CAPTION = (
    "T2. Code consistency between seeds after signed-permutation matching (mean ± sd over "
    "seed pairs) and restricted isometry δ_U on unions of observed supports with its "
    "calibrations (mean ± sd over seeds)."
)


def write_renderings(table: pd.DataFrame, metrics: Sequence[Metric], caption: str, label: str,
                     parquet: str | os.PathLike, md: str | os.PathLike, tex: str | os.PathLike) -> None:
    """One summary table as Parquet, Markdown and LaTeX, each written atomically."""
    from isae.data.atomic import write_table, write_text_atomic

    write_table(table, parquet)
    write_text_atomic(to_markdown(table, metrics, caption), md)
    write_text_atomic(to_latex(table, metrics, caption, label=label), tex)
