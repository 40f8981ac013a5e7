"""After the smoke run: T1, T2 and T3 hold the golden numbers, within their tolerances.

    python .ci/check_study.py RESULTS --golden tests/smoke/golden.yaml [--refresh]

Exit 0: every row, metric and count matches; exit 1: each difference is printed, one line
each. --refresh rewrites the golden file's values from RESULTS (keeping its tolerances and
skip list): do it only after a change meant to move the numbers, and say why in the commit.
Also checked, since no table holds it: every feature-browser page shows at least 10 latent
pairs with highlighted tokens.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from isae.study import golden

#: The tables checked: each one the golden file holds; one it does not hold yet (T3 before
#: a refresh) is read where it exists but not compared, and --refresh records it.
TABLES = ("T1", "T2", "T3")

HEADER = """\
# Golden values of CI's smoke run (tests/smoke/config.yaml on top of config/config.yaml),
# checked by `python .ci/check_study.py results --golden tests/smoke/golden.yaml` after
# the run. Refresh after a change meant to move the numbers (and say why in the commit):
#   snakemake --workflow-profile workflow/profiles/local \\
#       --configfile config/config.yaml tests/smoke/config.yaml
#   python .ci/check_study.py results --golden tests/smoke/golden.yaml --refresh
# Written by .ci/check_study.py --refresh; tolerance.why says how the tolerances were chosen.
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--golden", type=Path, required=True)
    p.add_argument("--refresh", action="store_true")
    a = p.parse_args()
    spec = yaml.safe_load(a.golden.read_text())
    # Every table the golden file holds must be there (compare says which is missing); the
    # others are read where they exist.
    paths = {t: a.results / "tables" / f"{t}.parquet" for t in TABLES}
    try:
        tables = {t: pd.read_parquet(p) for t, p in paths.items()
                  if t in spec.get("tables", {}) or p.exists()}
    except OSError as e:
        print(f"smoke study: cannot read the tables under {a.results}: {e}", file=sys.stderr)
        return 2
    if a.refresh:
        new = golden.refresh(tables, spec)
        tmp = a.golden.with_name(f".{a.golden.name}.tmp")
        tmp.write_text(HEADER + yaml.safe_dump(new, sort_keys=False, width=96, default_flow_style=None))
        tmp.replace(a.golden)
        print(f"{a.golden}: values of {sum(len(v) for v in new['tables'].values())} rows rewritten")
        return 0
    bad = golden.compare(tables, spec)
    pages = sorted((a.results / "browser").rglob("*.html"))
    if not pages:
        bad.append(f"no feature-browser page under {a.results / 'browser'}")
    for page in pages:
        text = page.read_text()
        if text.count('<section class="pair"') < 10 or "<mark>" not in text:
            bad.append(f"{page}: fewer than 10 pairs or no highlighted token")
    if bad:
        print("smoke study: FAILED\n  " + "\n  ".join(bad))
        return 1
    n = sum(len(v) for v in spec["tables"].values())
    names = ", ".join(spec["tables"])
    print(f"smoke study: {names} match {a.golden} ({n} rows), {len(pages)} browser pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
