"""Rule entry point: split-data reproducibility at one (dataset, shape): every SAE trained on
the first half matched with the one of the same arch and seed on the second
(isae.analysis.split_data), one Parquet row per pair."""

import logging
import sys

import torch

from isae.analysis.split_data import match_halves
from isae.data.atomic import write_table

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    logging.basicConfig(stream=log, level=logging.INFO)
    p = snakemake.params
    torch.set_num_threads(p.torch_threads)
    i = snakemake.input
    table = match_halves(i.half0, i.half1, i.acts, max_rows=p.max_rows, device=p.device)
    write_table(table, snakemake.output.table)
    print(f"{len(table)} pairs", file=log)
