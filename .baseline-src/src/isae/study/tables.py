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
from isae.study.grid import GRIDS

#: Keys of one table row: a dataset and one SAE configuration.
ROW_KEYS = ["dataset", "arch", "k", "width"]
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
    spread: str = "sd"
    """How the cell shows the spread: ``sd`` (mean ± sample sd, for independent runs),
    ``range`` (mean and [min, max], for seed pairs, which share seeds), ``count`` (a
    boolean column as "true count/n"), or ``none`` (the mean alone)."""
    fmt: str = "f"
    """Number format: ``f`` (``digits`` decimals) or ``g`` (``digits`` significant digits)."""
    hide_when_empty: bool = False
    """Leave the column out of the renderings when no row has a value (a reference the
    config did not ask for)."""

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


def collect_groups(
    paths: Sequence[str | os.PathLike],
    ids: Sequence[dict],
    flags: Sequence[dict],
    kind: str,
) -> pd.DataFrame:
    """Stack the per-group tables of ``isae measure`` and tag each row with the grids its
    runs belong to.

    ``ids[i]``: the dataset and group of ``paths[i]``. ``flags``: one dict per run with
    dataset, group, arch, seed, k, width, rows and a boolean per grid (the names of
    isae.study.grid.GRIDS). ``kind``: ``runs`` (one row per run), ``pairs`` (arch_a,
    seed_a, arch_b, seed_b) or ``latents`` (arch, seed_a, seed_b); a pair belongs to a grid when both of its runs do. Every row
    gets k, width and rows from the flags; runs missing from ``flags`` belong to no grid.
    """
    if kind not in ("runs", "pairs", "latents"):
        raise ValueError(f"unknown table kind {kind!r}")
    frames = []
    for path, ident in zip(paths, ids):
        df = pd.read_parquet(path)
        frames.append(df.assign(**{c: v for c, v in ident.items()}))
    if len(paths) != len(ids):
        raise UserError(f"collect: {len(paths)} tables but {len(ids)} identity rows")
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    F = pd.DataFrame(list(flags))
    grids = [g for g in GRIDS if g in F.columns]
    on = ["dataset", "group", "arch", "seed"]
    F = F.drop_duplicates(on).set_index(on)
    if df.empty:
        return df
    df = df.drop(columns=[c for c in ("k", "width", "rows", *grids) if c in df.columns])
    shape = F.groupby(level=["dataset", "group"])[["k", "width", "rows"]].first()
    df = df.join(shape, on=["dataset", "group"])

    def flags_of(arch_col: str, seed_col: str) -> pd.DataFrame:
        keys = pd.MultiIndex.from_arrays([df["dataset"], df["group"], df[arch_col], df[seed_col]])
        return F.reindex(keys)[grids].fillna(False).astype(bool).reset_index(drop=True)

    if kind == "runs":
        fl = flags_of("arch", "seed")
    elif kind == "pairs":
        fl = flags_of("arch_a", "seed_a") & flags_of("arch_b", "seed_b")
    else:
        fl = flags_of("arch", "seed_a") & flags_of("arch", "seed_b")
    for g in grids:
        df[g] = fl[g].to_numpy()
    return df


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
    """Per group of ``by``: ``<key>_mean``, ``<key>_sd`` (ddof 1), ``<key>_n``, ``<key>_min``
    and ``<key>_max`` of each metric (scaled), ignoring NaN. An empty input gives an empty
    table with those columns."""
    out_cols = [f"{m.key}_{s}" for m in metrics for s in ("mean", "sd", "n", "min", "max")]
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
            row[f"{m.key}_min"] = float(v.min()) if len(v) else math.nan
            row[f"{m.key}_max"] = float(v.max()) if len(v) else math.nan
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

#: T1: the learning rate chosen by the lr sweep, reconstruction (held-out, per seed) ...
T1_EVAL = [
    Metric("lr", "lr", r"lr", digits=2, fmt="g", spread="none"),
    Metric("mse_per_dim", "MSE/dim", r"MSE/dim"),
    Metric("fvu", "FVU", r"FVU"),
    Metric("l0", "L0", r"$L_0$", digits=1),
    Metric("dead_frac", "dead %", r"dead \%", digits=1, scale=100.0),
]
#: ... convergence controls (per seed) ...
T1_CONVERGENCE = [
    Metric("converged", "converged", r"conv.", spread="count"),
    Metric("fvu_trend", "FVU fall %", r"FVU fall \%", digits=1, scale=100.0),
    Metric("init_abs_cos", "init |cos|", r"init $|\cos|$"),
]
#: ... stability: seed pairs (which share seeds: range, not sd), the same seed across
#: architectures, and the chance levels (independent draws) ...
T1_MATCH = [
    Metric("mean_abs_cos", "seed |cos|", r"seed $|\cos|$", spread="range"),
    Metric("frac_gt_0.9", "seed >0.9", r"seed $>0.9$", spread="range"),
    Metric("arch_abs_cos", "same-seed arch |cos|", r"same-seed arch $|\cos|$", spread="range",
           optional=True),
    Metric("chance_data_rows", "chance rows", r"chance rows", optional=True),
    Metric("chance_data_cov", "chance cov", r"chance cov.", optional=True),
    Metric("chance_gaussian", "chance iso", r"chance iso.", optional=True),
]
#: ... the same over the latents live in both seeds (matched among themselves), their
#: count, and the chance level of that many random training rows (per seed pair) ...
T1_LIVE = [
    Metric("live_mean_abs_cos", "live seed |cos|", r"live seed $|\cos|$", spread="range",
           optional=True, hide_when_empty=True),
    Metric("live_n_matched", "live n", r"live $n$", digits=0, spread="range", optional=True,
           hide_when_empty=True),
    Metric("live_chance_data_rows", "live chance rows", r"live chance rows", optional=True,
           spread="none", hide_when_empty=True),
]
#: ... the trained references, per pair (``reference_rows``): the same recipe on Gaussian
#: data with the activations' moments, and on two disjoint halves of the data by document.
T1_REFS = [
    Metric("null_abs_cos", "trained null |cos|", r"null $|\cos|$", spread="range",
           optional=True, hide_when_empty=True),
    Metric("split_abs_cos", "split-data |cos|", r"split $|\cos|$", spread="range",
           optional=True, hide_when_empty=True),
]
#: The kinds of trained reference, and the T1 column each fills.
REFERENCES = {"null": "null_abs_cos", "split": "split_abs_cos"}
#: ... and ground-truth recovery where there is a truth (per seed).
T1_TRUTH = [
    Metric("truth_abs_cos", "truth |cos|", r"truth $|\cos|$", optional=True),
    Metric("truth_frac_gt_0.9", "truth >0.9", r"truth $>0.9$", optional=True),
    Metric("chance_truth_data_rows", "truth chance rows", r"truth chance rows", optional=True),
]
#: T2 code consistency between seeds (per seed pair) ...
T2_MATCH = [
    Metric("code_pearson_all", "code corr", r"code corr.", spread="range"),
    Metric("code_jaccard", "support Jaccard", r"supp.\ Jaccard", spread="range"),
    Metric("code_rel_dist", "rel. code dist", r"rel.\ code dist.", spread="range"),
]
#: ... and restricted isometry on observed supports, its two sides, its calibrations and
#: the dictionary's own geometry (per seed).
T2_RIC = [
    Metric("ric_observed_q50", "δ median", r"$\delta$ med."),
    # The largest δ over the sampled unions: a lower bound on δ_2k, the constant recovery
    # theory needs under its threshold on every support (the median says nothing of that).
    Metric("ric_observed_max", "δ max (≤ δ_2k)", r"$\delta$ max ($\le\delta_{2k}$)"),
    Metric("ric_observed_frac_lt_1/3", "frac δ<1/3", r"frac.\ $\delta<1/3$"),
    Metric("ric_observed_frac_lt_sqrt2-1", "frac δ<√2−1", r"frac.\ $\delta<\sqrt2-1$"),
    Metric("ric_observed_q90", "δ q90", r"$\delta$ q90"),
    Metric("ric_observed_lower_q50", "lower side med.", r"lower med."),
    Metric("ric_observed_upper_q50", "upper side med.", r"upper med."),
    Metric("ric_observed_frac_singular", "near-singular %", r"near-sing.\ \%", digits=1,
           scale=100.0),
    Metric("ric_random_support_q50", "δ med. random supp.", r"$\delta$ med.\ rand.\ supp."),
    Metric("ric_gaussian_q50", "δ med. Gaussian dict.", r"$\delta$ med.\ Gauss.\ dict."),
    Metric("ric_dict_dup_frac", "near-dup. atoms %", r"near-dup.\ \%", digits=1, scale=100.0),
    # The true dictionary is the same for every seed, and so are its numbers: no spread.
    Metric("ric_truth_coherence", "true dict. coherence", r"true coh.", optional=True,
           spread="none"),
    Metric("ric_truth_q50", "true δ med.", r"true $\delta$ med.", optional=True, spread="none"),
    Metric("ric_truth_max", "true δ max", r"true $\delta$ max", optional=True, spread="none"),
    Metric("ric_truth_frac_lt_sqrt2-1", "true frac δ<√2−1", r"true frac.\ $\delta<\sqrt2-1$",
           optional=True, spread="none"),
]


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the main grid (all rows when the table has no grid flag)."""
    if "main" not in df.columns or df.empty:
        return df
    return df[df["main"].astype(bool)]


def seed_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The seed pairs (two seeds of one arch) of ``isae measure``'s pairs table, with an
    ``arch`` column."""
    if pairs.empty:
        return pairs.assign(arch=pd.Series(dtype=object))
    p = pairs[pairs["kind"] == "seed"] if "kind" in pairs.columns else pairs
    return p.assign(arch=p["arch_a"]) if "arch_a" in p.columns else p


def arch_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The same-seed pairs of two archs, one row per member arch (so that each arch's row of
    a table averages its pairs with every other arch), value column ``arch_abs_cos``."""
    cols = [*ROW_KEYS, "arch_abs_cos"]
    if pairs.empty or "kind" not in pairs.columns:
        return pd.DataFrame(columns=cols)
    p = pairs[pairs["kind"] == "arch"]
    if "main" in p.columns:
        p = p[p["main"].astype(bool)]
    both = [p.assign(arch=p[side], arch_abs_cos=p["mean_abs_cos"]) for side in ("arch_a", "arch_b")]
    return pd.concat(both, ignore_index=True)[cols] if len(p) else pd.DataFrame(columns=cols)


def chance_columns(runs: pd.DataFrame, chance: pd.DataFrame) -> pd.DataFrame:
    """One row per run of ``runs`` (dataset, arch, k, width) with the dataset's chance
    levels at the run's width: ``chance_<kind>`` (two random dictionaries) and
    ``chance_truth_<kind>`` (one against the truth), each a mean over the draws."""
    keys = runs[ROW_KEYS].drop_duplicates()
    if chance.empty:
        return keys
    c = chance.copy()
    c["col"] = np.where(c["target"] == "truth", "chance_truth_", "chance_") + c["kind"].astype(str)
    wide = c.pivot_table(index=["dataset", "width"], columns="col", values="mean_abs_cos",
                         aggfunc="mean").reset_index()
    wide.columns.name = None
    keys = keys.astype({"width": "int64"})
    wide = wide.astype({"width": "int64"})
    return keys.merge(wide, on=["dataset", "width"], how="left")


def converged_marks(runs: pd.DataFrame) -> dict:
    """(dataset, arch, k, width) -> True where some run of the main grid has not converged."""
    r = main_rows(runs)
    if r.empty or "converged" not in r.columns:
        return {}
    g = r.groupby(ROW_KEYS)["converged"].agg(lambda v: not bool(np.all(v.astype(bool))))
    return {tuple(k): bool(v) for k, v in g.items()}


def reference_rows(pairs: pd.DataFrame, split: pd.DataFrame | None = None) -> pd.DataFrame:
    """The trained references' pairs, as ``table_t1``'s and F1's ``refs`` read them.

    ``pairs``: the collected pairs of ``isae measure`` with their grid flags: the seed pairs
    flagged ``null`` (isae.study.grid's null grid: the same recipe on ``isae extract
    gaussian --like`` data) are the trained null's. ``split``: the split-data comparisons
    (the collected tables of the workflow's split_pairs rule, isae.analysis.split_data: an
    SAE on one half of ``isae split`` against the same arch and seed on the other half),
    one row per pair with dataset, arch, k, width and mean_abs_cos.

    -> one row per pair: dataset, arch, k, width, reference (null | split), mean_abs_cos."""
    cols = [*ROW_KEYS, "reference", "mean_abs_cos"]
    out = []
    if not pairs.empty and "null" in pairs.columns:
        p = seed_pairs(pairs)
        out.append(p[p["null"].astype(bool)].assign(reference="null")[cols])
    if split is not None and not split.empty:
        out.append(split.assign(reference="split")[cols])
    out = [o for o in out if len(o)]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def _reference_sources(refs: pd.DataFrame | None) -> list:
    """(table, [metric]) per kind of trained reference in ``refs`` (``reference_rows``)."""
    if refs is None or refs.empty:
        return [(pd.DataFrame(columns=ROW_KEYS), T1_REFS)]  # the columns, empty
    by_col = {m.column: m for m in T1_REFS}
    return [(refs[refs["reference"] == kind].assign(**{col: lambda d: d["mean_abs_cos"]}),
             [by_col[col]]) for kind, col in REFERENCES.items()]


def table_t1(runs: pd.DataFrame, pairs: pd.DataFrame, chance: pd.DataFrame | None = None,
             lr: pd.DataFrame | None = None, refs: pd.DataFrame | None = None,
             split: pd.DataFrame | None = None) -> pd.DataFrame:
    """T1: reconstruction, convergence and stability per dataset x arch on the main grid,
    with a ``not_converged`` column (some seed's run has not converged). ``lr`` (the lr
    sweep's table) marks a rate chosen at its grid's edge; the chosen rate itself is in
    ``runs``. ``refs``: the trained references' pairs (``reference_rows``), shown beside the
    chance levels; without it, those of ``pairs`` (the null grid's seed pairs) and
    ``split`` (the split-data comparisons)."""
    if refs is None:
        refs = reference_rows(pairs, split)
    r = main_rows(runs)
    sources = [(r, [*T1_EVAL, *T1_CONVERGENCE]),
               (main_rows(seed_pairs(pairs)), [*T1_MATCH[:2], *T1_LIVE]),
               (arch_pairs(pairs), T1_MATCH[2:3]),
               (chance_columns(r, chance if chance is not None else pd.DataFrame()), T1_MATCH[3:]),
               *_reference_sources(refs),
               (r, T1_TRUTH[:2]),
               (chance_columns(r, chance if chance is not None else pd.DataFrame()), T1_TRUTH[2:])]
    table = summarize(sources)
    marks = converged_marks(runs)
    table["not_converged"] = [marks.get((d, a, int(k), int(w)), False) for d, a, k, w in
                              zip(table["dataset"], table["arch"], table["k"], table["width"])]
    edges = lr_edge_marks(lr if lr is not None else pd.DataFrame())
    table["lr_at_edge"] = [edges.get((d, _preset(a)), False)
                           for d, a in zip(table["dataset"], table["arch"])]
    return table


def _preset(arch: str) -> str:
    try:
        return parse_arch(arch).preset
    except UserError:
        return arch


def lr_edge_marks(lr: pd.DataFrame) -> dict:
    """(dataset, arch) -> True where the lr sweep's choice is its grid's smallest or largest
    factor (from the collected sweep tables: dataset, arch, factor, chosen)."""
    need = {"dataset", "arch", "factor", "chosen"}
    if lr.empty or not need <= set(lr.columns):
        return {}
    out = {}
    for (ds, arch), g in lr.groupby(["dataset", "arch"]):
        chosen = g.loc[g["chosen"].astype(bool), "factor"]
        lo, hi = lr.loc[lr["dataset"] == ds, "factor"].agg(["min", "max"])
        out[(ds, arch)] = bool(len(chosen) == 1 and chosen.iloc[0] in (lo, hi))
    return out


def table_t2(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """T2: code consistency and restricted isometry per dataset x arch on the main grid."""
    table = summarize([(main_rows(seed_pairs(pairs)), T2_MATCH), (main_rows(runs), T2_RIC)])
    marks = converged_marks(runs)
    table["not_converged"] = [marks.get((d, a, int(k), int(w)), False) for d, a, k, w in
                              zip(table["dataset"], table["arch"], table["k"], table["width"])]
    return table


# ----------------------------------------------------------------------------- the lr choice


def lr_sensitivity(table: pd.DataFrame) -> pd.DataFrame:
    """Each arch's choice and its neighbours on the grid, from a sweep table with arch,
    factor, lr, heldout_fvu, chosen (and seed_abs_cos where a second seed was trained).

    -> one row per arch: factor, lr, heldout_fvu, seed_abs_cos of the choice; factor_below /
    factor_above (the grid's next smaller / larger factor, NaN past an edge) with their
    heldout_fvu_* and seed_abs_cos_*; at_edge (the choice is the grid's smallest or largest
    factor); tied (the factors within the tolerance, comma-separated)."""
    rows = []
    for arch, g in table.groupby("arch", sort=False):
        g = g.sort_values("factor").reset_index(drop=True)
        at = g.index[g["chosen"].astype(bool)]
        if len(at) != 1:
            raise UserError(f"lr sweep table: {len(at)} chosen rates for {arch}")
        i = int(at[0])
        row = {"arch": arch, "factor": g["factor"][i], "lr": g["lr"][i],
               "heldout_fvu": g["heldout_fvu"][i],
               "seed_abs_cos": g["seed_abs_cos"][i] if "seed_abs_cos" in g else math.nan,
               "at_edge": i in (0, len(g) - 1)}
        for side, j in (("below", i - 1), ("above", i + 1)):
            inside = 0 <= j < len(g)
            row[f"factor_{side}"] = g["factor"][j] if inside else math.nan
            row[f"heldout_fvu_{side}"] = g["heldout_fvu"][j] if inside else math.nan
            row[f"seed_abs_cos_{side}"] = (g["seed_abs_cos"][j] if inside and "seed_abs_cos" in g
                                           else math.nan)
        tied = g["within_tolerance"] if "within_tolerance" in g else g["chosen"]
        row["tied"] = ",".join(f"{f:g}" for f in g["factor"][tied.astype(bool)])
        rows.append(row)
    return pd.DataFrame(rows)


def table_lr(lr: pd.DataFrame) -> pd.DataFrame:
    """The lr table: ``lr_sensitivity`` per dataset of the collected sweeps (``lr``: the
    sweep tables with a dataset column), rows in dataset order and ARCH_ORDER."""
    if lr.empty:
        return pd.DataFrame(columns=["dataset", "arch"])
    parts = [lr_sensitivity(g).assign(dataset=ds) for ds, g in lr.groupby("dataset", sort=False)]
    out = pd.concat(parts, ignore_index=True)
    out = out[["dataset", *[c for c in out.columns if c != "dataset"]]]
    order = sorted(range(len(out)), key=lambda i: (list(dict.fromkeys(out["dataset"])).index(
        out["dataset"][i]), arch_sort_key(str(out["arch"][i]))))
    return out.iloc[order].reset_index(drop=True)


def _factor_cell(factor: float, value: float, digits: int = 4) -> str:
    if factor is None or (isinstance(factor, float) and math.isnan(factor)):
        return "— (edge)"
    v = "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
    return f"{v} ({factor:g}×)"


def lr_markdown(table: pd.DataFrame, caption: str = "") -> str:
    """The lr table in Markdown: per dataset x arch the chosen factor and rate, its held-out
    FVU and seed stability, the same at the grid's neighbouring factors, the tied factors,
    and whether the choice sits at the grid's edge."""
    header = ["dataset", "arch", "chosen (lr)", "FVU", "FVU below", "FVU above", "seed |cos|",
              "seed |cos| below", "seed |cos| above", "tied", "at edge"]
    lines = [f"{caption}\n"] if caption else []
    lines.append("| " + " | ".join(h.replace("|", r"\|") for h in header) + " |")
    lines.append("|:---|:---|:---|" + "|".join(["---:"] * 6) + "|:---|:---|")
    for _, r in table.iterrows():
        cos = r.get("seed_abs_cos", math.nan)
        cells = [str(r["dataset"]), str(r["arch"]), f"{r['factor']:g}× ({r['lr']:.2g})",
                 f"{r['heldout_fvu']:.4f}",
                 _factor_cell(r["factor_below"], r["heldout_fvu_below"]),
                 _factor_cell(r["factor_above"], r["heldout_fvu_above"]),
                 "—" if not math.isfinite(cos) else f"{cos:.3f}",
                 _factor_cell(r["factor_below"], r.get("seed_abs_cos_below", math.nan), 3),
                 _factor_cell(r["factor_above"], r.get("seed_abs_cos_above", math.nan), 3),
                 str(r["tied"]).replace(",", ", "), "**yes**" if r["at_edge"] else "no"]
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


LR_CAPTION = (
    "Learning rates. Each architecture was trained at each factor × its default rate (one "
    "seed, the main budget). Rule: the lowest held-out FVU; the factors within the tie "
    "tolerance of it (relative; 1 % by default, as GPU reruns of one sweep move the FVU by "
    "0.5–1 %) are tied (column tied), and of those the factor closest to 1× in log scale is "
    "chosen. Beside each choice: the FVU and, where the sweep trained a second seed, the "
    "matched |cos| between the two seeds at the neighbouring factors of the grid. At edge: "
    "the choice is the grid's smallest or largest factor, so the best rate may lie beyond "
    "it; extend the grid there."
)


# ----------------------------------------------------------------------------- rendering


def _num(x: float, digits: int, fmt: str) -> str:
    return f"{x:.{digits}{fmt}}"


def format_cell(mean: float, sd: float, digits: int, pm: str = " ± ", dash: str = "—",
                spread: str = "sd", lo: float = math.nan, hi: float = math.nan,
                n: int = 0, fmt: str = "f", en: str = "–") -> str:
    """'0.143 ± 0.004' (sd), '0.491 [0.488, 0.494]' (range), '2/3' (count of a boolean
    mean over n), or the mean alone (one value, or spread none); ``dash`` when the mean is
    NaN."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return dash
    if spread == "count":
        return f"{int(round(mean * n))}/{n}"
    cell = _num(mean, digits, fmt)
    if spread == "sd" and sd is not None and not math.isnan(sd):
        cell += f"{pm}{_num(sd, digits, fmt)}"
    elif spread == "range" and n > 1 and not math.isnan(lo):
        cell += f" [{_num(lo, digits, fmt)}, {_num(hi, digits, fmt)}]"
    return cell


#: Appended to the arch of a row with a run that has not converged.
NOT_CONVERGED = " †"
#: Appended to a learning rate that the lr sweep chose at its grid's edge.
LR_AT_EDGE = " ‡"


def _cells(table: pd.DataFrame, metrics: Sequence[Metric], pm: str, dash: str) -> list[list[str]]:
    rows = []
    for _, r in table.iterrows():
        arch = str(r["arch"]) + (NOT_CONVERGED if r.get("not_converged", False) else "")
        cells = [str(r["dataset"]), arch, str(int(r["k"])), str(int(r["width"]))]
        for m in metrics:
            cells.append(format_cell(r[f"{m.key}_mean"], r[f"{m.key}_sd"], m.digits, pm, dash,
                                     spread=m.spread, lo=r.get(f"{m.key}_min", math.nan),
                                     hi=r.get(f"{m.key}_max", math.nan),
                                     n=int(r.get(f"{m.key}_n", 0)), fmt=m.fmt))
            if m.key == "lr" and bool(r.get("lr_at_edge", False)):
                cells[-1] += LR_AT_EDGE
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
T1_METRICS = [*T1_EVAL, *T1_CONVERGENCE, *T1_MATCH[:2], *T1_LIVE, *T1_MATCH[2:], *T1_REFS,
              *T1_TRUTH]
T2_METRICS = [*T2_MATCH, *T2_RIC]
T1_CAPTION = (
    "T1. Per dataset x arch at the main k, width and training rows: the learning rate the lr "
    "sweep chose; held-out reconstruction (normalised activations), mean ± sd over seeds; "
    "convergence (runs whose smoothed training FVU moved by less than the threshold over the "
    "20 % of steps before the learning-rate decay, that fall in %, each atom's |cos| with "
    "its own initial atom); stability: "
    "matched |cos| between seeds and fraction above 0.9, mean [min, max] over the seed "
    "pairs (they share seeds, so no sd), the same over the latents that fire on some held-out "
    "row in both seeds (matched among themselves), their number, and the chance level of as "
    "many random training rows, matched |cos| with the other architectures trained "
    "from the same seed, and chance levels of two random dictionaries drawn from the "
    "training rows (rows, a uniform sample of the whole training split), with the data's "
    "covariance (cov) and isotropic (iso); where the config trains them, the trained "
    "references: seeds of the same recipe on Gaussian data with the activations' mean and "
    "covariance (trained null) and the same seed on two disjoint halves of the data by "
    "document (split-data), mean [min, max] over pairs; truth: "
    "matched |cos| to the true dictionary (synthetic), and that of random training rows. "
    "† marks a row with a run that has not converged: its stability still measures its "
    "initialisation; ‡ a learning rate the sweep chose at its grid's smallest or largest "
    "factor (the best rate may lie beyond it)."
)
T2_CAPTION = (
    "T2. Code consistency between seeds after signed-permutation matching (mean [min, max] "
    "over seed pairs) and restricted isometry on unions of observed supports, mean ± sd over "
    "seeds: δ = max(lower, upper), its median and its largest value over the sampled unions "
    "(a lower bound on δ_2k, which recovery guarantees need under the threshold on every "
    "support), the lower side 1 − σ_min² (1 = singular) and the upper "
    "side σ_max² − 1 (coherent atoms), the unions with σ_min < 0.1, the fractions under 1/3 "
    "and √2−1, the calibrations (random supports, a Gaussian dictionary), the atoms with a "
    "near-duplicate (|cos| > 0.95), and, on a synthetic set, the true dictionary's coherence "
    "and δ on its true supports (median and largest). † as in T1."
)


def shown_metrics(table: pd.DataFrame, metrics: Sequence[Metric]) -> list[Metric]:
    """``metrics`` less those marked ``hide_when_empty`` that have no value in ``table``."""
    return [m for m in metrics if not (m.hide_when_empty and
                                       int(table.get(f"{m.key}_n", pd.Series([0])).sum()) == 0)]


def write_renderings(table: pd.DataFrame, metrics: Sequence[Metric], caption: str, label: str,
                     parquet: str | os.PathLike, md: str | os.PathLike, tex: str | os.PathLike) -> None:
    """One summary table as Parquet, Markdown and LaTeX, each written atomically."""
    from isae.data.atomic import write_table, write_text_atomic

    metrics = shown_metrics(table, metrics)
    write_table(table, parquet)
    write_text_atomic(to_markdown(table, metrics, caption), md)
    write_text_atomic(to_latex(table, metrics, caption, label=label), tex)


# ----------------------------------------------------------------------------- T3

#: The grid (isae.study.grid.GRIDS) whose runs T3 and F9 read.
WIDTH_GRID = "width_axis"


def largest_width(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the width axis (flag ``width_axis``) at each dataset's largest width of
    it; none when the table has no such rows."""
    if df.empty or WIDTH_GRID not in df.columns:
        return df.iloc[:0]
    r = df[df[WIDTH_GRID].astype(bool)]
    return r[r["width"] == r.groupby("dataset")["width"].transform("max")]


def lr_factors(rows: pd.DataFrame, lr: pd.DataFrame, lr_width: pd.DataFrame) -> pd.DataFrame:
    """Per row key of ``rows`` (dataset, arch, k, width): the factor over the default rate
    that the lr sweep at the main width chose for the arch's preset (``lr_factor_main``,
    from the collected main sweeps: dataset, arch, factor, chosen) and the one the sweep at
    the row's own width chose (``lr_factor_here``, from the collected width sweeps, which
    add a width column); NaN where there is no such sweep. The two agree where the √ rule
    holds: a factor chosen at one width is the same factor at the other."""
    keys = rows[ROW_KEYS].drop_duplicates().reset_index(drop=True)

    def chosen(table: pd.DataFrame, by: list[str]) -> dict:
        need = {*by, "arch", "factor", "chosen"}
        if table is None or table.empty or not need <= set(table.columns):
            return {}
        c = table[table["chosen"].astype(bool)]
        return {tuple(r[b] for b in (*by, "arch")): float(r["factor"]) for _, r in c.iterrows()}

    main, here = chosen(lr, ["dataset"]), chosen(lr_width, ["dataset", "width"])
    presets = keys["arch"].map(_preset)
    keys["lr_factor_main"] = [main.get((d, a), math.nan) for d, a in zip(keys["dataset"], presets)]
    keys["lr_factor_here"] = [here.get((d, int(w), a), math.nan)
                              for d, w, a in zip(keys["dataset"], keys["width"], presets)]
    return keys


def _pick(metrics: Sequence[Metric], *keys: str) -> list[Metric]:
    by = {m.key: m for m in metrics}
    return [by[k] for k in keys]


#: T3's columns: the learning rate, its factor at the main width and at this one, and the
#: budget; T1's reconstruction, convergence, stability (all latents and live latents) and
#: truth columns; T2's code consistency and restricted isometry.
T3_LR = [
    _pick(T1_EVAL, "lr")[0],
    Metric("lr_factor_main", "lr factor, main width", r"lr fact.\ main", digits=3, fmt="g",
           spread="none", optional=True, hide_when_empty=True),
    Metric("lr_factor_here", "lr factor, this width", r"lr fact.\ here", digits=3, fmt="g",
           spread="none", optional=True, hide_when_empty=True),
    Metric("rows", "rows (M)", r"rows (M)", digits=3, fmt="g", scale=1e-6, spread="none"),
]
T3_RUNS = [*_pick(T1_EVAL, "fvu", "dead_frac"), *_pick(T1_CONVERGENCE, "converged", "fvu_trend")]
#: The fraction of live latents matched above 0.9: dead atoms that collapse onto shared
#: directions match across seeds and inflate the fraction over all latents.
T3_LIVE_FRAC = Metric("live_frac_gt_0.9", "live seed >0.9", r"live seed $>0.9$", spread="range",
                      optional=True, hide_when_empty=True)
T3_PAIRS = [*T1_MATCH[:2], *T1_LIVE[:1], T3_LIVE_FRAC, *T1_LIVE[1:]]
T3_CHANCE = _pick(T1_MATCH, "chance_data_rows")
T3_TRUTH = T1_TRUTH[:2]
T3_CODES = _pick(T2_MATCH, "code_pearson_all", "code_jaccard")
T3_RIC = _pick(T2_RIC, "ric_observed_q50", "ric_observed_max", "ric_observed_frac_lt_sqrt2-1",
               "ric_dict_dup_frac")
T3_METRICS = [*T3_LR, *T3_RUNS, *T3_PAIRS, *T3_CHANCE, *T3_TRUTH, *T3_CODES, *T3_RIC]


def _not_converged(runs: pd.DataFrame) -> dict:
    """(dataset, arch, k, width) -> True where some run of ``runs`` has not converged."""
    if runs.empty or "converged" not in runs.columns:
        return {}
    g = runs.groupby(ROW_KEYS)["converged"].agg(lambda v: not bool(np.all(v.astype(bool))))
    return {tuple(k): bool(v) for k, v in g.items()}


def table_t3(runs: pd.DataFrame, pairs: pd.DataFrame, chance: pd.DataFrame | None = None,
             lr: pd.DataFrame | None = None, lr_width: pd.DataFrame | None = None) -> pd.DataFrame:
    """T3: per dataset x arch of the width axis at the dataset's largest width of it, T1's
    and T2's main columns with the budget, dead % and live-latent stability, the factor of
    the rate at the main width and at this one, a ``not_converged`` column (some seed's run
    has not converged) and ``lr_at_edge`` (the sweep at this width, or the main one where
    there is none here, chose its grid's edge). ``lr_width``: the width axis's second lr
    sweeps (``sweep.parquet`` with dataset and width columns)."""
    r = largest_width(runs)
    p = largest_width(seed_pairs(pairs))
    chance = chance if chance is not None else pd.DataFrame()
    lr = lr if lr is not None else pd.DataFrame()
    lr_width = lr_width if lr_width is not None else pd.DataFrame()
    table = summarize([(r, [*T3_LR[:1], T3_LR[3], *T3_RUNS]),
                       (lr_factors(r, lr, lr_width), T3_LR[1:3]),
                       (p, T3_PAIRS), (chance_columns(r, chance), T3_CHANCE), (r, T3_TRUTH),
                       (p, T3_CODES), (r, T3_RIC)])
    marks = _not_converged(r)
    keys = list(zip(table["dataset"], table["arch"], table["k"], table["width"]))
    table["not_converged"] = [marks.get((d, a, int(k), int(w)), False) for d, a, k, w in keys]
    # The sweep at the row's width where there is one (its rows: at_edge = chosen at an
    # edge), else the main width's.
    edges: dict = {}
    if {"dataset", "width", "arch", "at_edge"} <= set(lr_width.columns):
        cols = lr_width[["dataset", "width", "arch", "at_edge"]]
        for d, w, a, e in cols.itertuples(index=False):
            edges[(d, int(w), a)] = edges.get((d, int(w), a), False) or bool(e)
    main = lr_edge_marks(lr)
    table["lr_at_edge"] = [edges.get((d, int(w), _preset(a)), main.get((d, _preset(a)), False))
                           for d, a, _, w in keys]
    return table


T3_CAPTION = (
    "T3. The width axis at each dataset's largest width (the paper's 32 × d on a language "
    "model): per dataset x arch, the learning rate, the factor over the default rate chosen "
    "by the lr sweep at the main width and by the sweep at this width (equal factors confirm "
    "that the rate scales as the default, 1/√width; every other width trains at the factor of "
    "the swept width nearest to it), the training rows; held-out FVU and dead % (latents "
    "that never fire on the held-out rows), mean ± sd over seeds; convergence as in T1; "
    "stability between seeds over all latents and over the latents live in both seeds "
    "(matched among themselves: |cos| and the fraction above 0.9, since dead atoms can "
    "collapse onto shared directions that match across seeds), their number and the chance "
    "level of as many random "
    "training rows, mean [min, max] over the seed pairs; the chance level of two dictionaries "
    "of random training rows at this width; truth recovery (synthetic); T2's code "
    "consistency (mean [min, max] over pairs) and restricted isometry on observed supports "
    "(median and largest δ, the fraction under √2−1, near-duplicate atoms), mean ± sd over "
    "seeds. † and ‡ as in T1 (‡: the sweep at this width, or the main width's where there is "
    "none here)."
)
