"""Rule entry point: table T1 (Parquet, Markdown, LaTeX) from the collected tables."""

import sys

import pandas as pd

from isae.study import tables

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    inputs = {name: pd.read_parquet(path) for name, path in snakemake.input.items()}
    table = tables.table_t1(**inputs)
    o = snakemake.output
    tables.write_renderings(table, tables.T1_METRICS, tables.T1_CAPTION, "tab:t1",
                            o.table, o.md, o.tex)
    print(f"{len(table)} rows", file=log)
