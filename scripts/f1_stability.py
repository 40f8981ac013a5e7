"""Rule entry point: figure F1 (PNG + PDF) from the collected tables."""

import sys

import pandas as pd

from isae.study import figures

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    tables = {name: pd.read_parquet(path) for name, path in snakemake.input.items()}
    fig = figures.f1_stability(**tables, **dict(snakemake.params.items()))
    figures.save_figure(fig, [snakemake.output.png, snakemake.output.pdf])
