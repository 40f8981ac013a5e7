"""Rule entry point: one figure (PNG + PDF) from the collected tables; which figure is the
rule's `figure` parameter (F1 ... F8), its other parameters go to the figure's function."""

import sys

import pandas as pd

from isae.study import figures

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    params = dict(snakemake.params.items())
    name = params.pop("figure")
    tables = {table: pd.read_parquet(path) for table, path in snakemake.input.items()}
    fig = figures.draw(name, tables, **params)
    figures.save_figure(fig, [snakemake.output.png, snakemake.output.pdf])
    print(f"{name} from {', '.join(tables)}", file=log)
