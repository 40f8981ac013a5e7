"""Rule entry point: the learning-rate table (Parquet, Markdown) from the collected lr sweeps:
each choice, its neighbours on the grid and whether it sits at the grid's edge."""

import sys

import pandas as pd

from isae.data.atomic import write_table, write_text_atomic
from isae.study import tables

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    table = tables.table_lr(pd.read_parquet(snakemake.input.lr))
    write_table(table, snakemake.output.table)
    write_text_atomic(tables.lr_markdown(table, tables.LR_CAPTION), snakemake.output.md)
    print(f"{len(table)} rows, {int(table.get('at_edge', pd.Series(dtype=bool)).sum())} at an edge",
          file=log)
