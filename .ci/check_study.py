"""After the smoke run: every F/T artifact exists and holds what it should."""

import sys
from pathlib import Path

import pandas as pd

root = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
FIGURES = [f"F{i}" for i in range(1, 9)]
bad = []
for name in FIGURES:
    for ext in ("png", "pdf"):
        p = root / "figures" / f"{name}.{ext}"
        if not p.is_file() or p.stat().st_size < 2000:
            bad.append(f"{p} missing or empty")
for t in ("T1", "T2"):
    for ext in ("parquet", "md", "tex"):
        p = root / "tables" / f"{t}.{ext}"
        if not p.is_file() or p.stat().st_size == 0:
            bad.append(f"{p} missing or empty")
# The feature browser: one page per arch of the main grid on the language-model set.
pages = sorted((root / "browser").rglob("*.html"))
if not pages:
    bad.append(f"no feature-browser page under {root / 'browser'}")
for p in pages:
    text = p.read_text()
    if text.count('<section class="pair"') < 10 or "<mark>" not in text:
        bad.append(f"{p}: fewer than 10 pairs or no highlighted token")
if not bad:
    t1 = pd.read_parquet(root / "tables" / "T1.parquet")
    t2 = pd.read_parquet(root / "tables" / "T2.parquet")
    for name, t in (("T1", t1), ("T2", t2)):
        if len(t) < 2:
            bad.append(f"{name} has {len(t)} rows")
        # Means must exist somewhere (sds are empty where there is a single seed pair).
        means = t[[c for c in t.columns if c.endswith("_mean")]]
        if means.isna().all().any():
            bad.append(f"{name}: metrics with no value at all: {list(means.columns[means.isna().all()])}")
    # Every row carries its convergence control, and the mark follows it.
    if "not_converged" not in t1.columns or t1["converged_n"].min() < 1:
        bad.append("T1: a row without its convergence control")
    elif (t1["not_converged"] != (t1["converged_mean"] < 1)).any():
        bad.append("T1: the † mark disagrees with the converged runs")
    runs = pd.read_parquet(root / "runs" / "runs.parquet")
    for col in ("fvu_trend", "converged", "init_abs_cos", "encode_flops"):
        if col not in runs.columns:
            bad.append(f"runs.parquet: no column {col}")
    lr = pd.read_parquet(root / "runs" / "lr.parquet")
    if lr.groupby(["dataset", "arch"])["chosen"].sum().ne(1).any():
        bad.append("lr sweep: not exactly one chosen rate per dataset and arch")
    print(t1.to_string(max_cols=12))
if bad:
    print("study artifacts: FAILED\n  " + "\n  ".join(bad))
    sys.exit(1)
print(f"study artifacts: all {FIGURES[0]}-{FIGURES[-1]} and T1-T2 present, {len(pages)} browser pages")
