"""Rule entry point: table T1 (Parquet, Markdown, LaTeX) from the collected runs."""

import sys

import pandas as pd

from isae.study.tables import T1_CAPTION, T1_METRICS, table_t1, write_renderings

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive
read = pd.read_parquet

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    i, o = snakemake.input, snakemake.output
    table = table_t1(read(i.eval), read(i.match), read(i.truth))
    write_renderings(table, T1_METRICS, T1_CAPTION, "tab:t1", o.table, o.md, o.tex)
    print(f"{len(table)} rows", file=log)
