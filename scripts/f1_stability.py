"""Rule entry point: figure F1 (PNG + PDF) from the collected runs."""

import sys

import pandas as pd

from isae.study import figures

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive
read = pd.read_parquet

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    i, o = snakemake.input, snakemake.output
    fig = figures.f1_stability(read(i.latents), read(i.match))
    figures.save_figure(fig, [o.png, o.pdf])
