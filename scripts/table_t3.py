"""Rule entry point: table T3 (Parquet, Markdown, LaTeX) from the collected tables and the
width axis's lr sweeps."""

import sys

import pandas as pd

from isae.study import tables

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    i = snakemake.input
    inputs = {name: pd.read_parquet(getattr(i, name)) for name in ("runs", "pairs", "chance", "lr")}
    lr_width = tables.collect(list(i.lr_width), snakemake.params.lr_width_ids)
    table = tables.table_t3(**inputs, lr_width=lr_width)
    o = snakemake.output
    tables.write_renderings(table, tables.T3_METRICS, tables.T3_CAPTION, "tab:t3",
                            o.table, o.md, o.tex)
    print(f"{len(table)} rows", file=log)
