"""Rule entry point: table T2 (Parquet, Markdown, LaTeX) from the collected tables."""

import sys

import pandas as pd

from isae.study import tables

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    inputs = {name: pd.read_parquet(path) for name, path in snakemake.input.items()}
    table = tables.table_t2(**inputs)
    o = snakemake.output
    tables.write_renderings(table, tables.T2_METRICS, tables.T2_CAPTION, "tab:t2",
                            o.table, o.md, o.tex)
    print(f"{len(table)} rows", file=log)
