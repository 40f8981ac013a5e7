"""After the smoke run: every F/T artifact exists and holds what it should."""

import sys
from pathlib import Path

import pandas as pd

root = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
bad = []
for i in range(1, 7):
    for ext in ("png", "pdf"):
        p = root / "figures" / f"F{i}.{ext}"
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
    print(t1.to_string(max_cols=12))
if bad:
    print("study artifacts: FAILED\n  " + "\n  ".join(bad))
    sys.exit(1)
print(f"study artifacts: all F1-F6 and T1-T2 present, {len(pages)} browser pages")
