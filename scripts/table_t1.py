"""Rule entry point: table T1 (Parquet, Markdown, LaTeX) from the collected runs."""

import sys

import pandas as pd

from isae.io import write_table
from isae.study.tables import (
    T1_CAPTION,
    T1_METRICS,
    table_t1,
    to_latex,
    to_markdown,
    write_text_atomic,
)

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive
read = pd.read_parquet

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    i, o = snakemake.input, snakemake.output
    table = table_t1(read(i.eval), read(i.match), read(i.truth))
    write_table(table, o.table)
    write_text_atomic(to_markdown(table, T1_METRICS, T1_CAPTION), o.md)
    write_text_atomic(to_latex(table, T1_METRICS, T1_CAPTION, label="tab:t1"), o.tex)
    print(f"{len(table)} rows", file=log)
