"""Rule entry point: table T2 (Parquet, Markdown, LaTeX) from the collected runs."""

import sys

import pandas as pd

from isae.study.tables import T2_CAPTION, T2_METRICS, table_t2, write_renderings

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive
read = pd.read_parquet

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    i, o = snakemake.input, snakemake.output
    table = table_t2(read(i.match), read(i.ric))
    write_renderings(table, T2_METRICS, T2_CAPTION, "tab:t2", o.table, o.md, o.tex)
    print(f"{len(table)} rows", file=log)
