"""Rule entry point: downstream fidelity of one checkpoint (isae.analysis.fidelity), one-row Parquet."""

import logging
import sys

import pandas as pd
import torch

from isae.analysis.fidelity import fidelity
from isae.data.atomic import write_table

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    logging.basicConfig(level=logging.INFO, stream=log, format="%(asctime)s %(message)s")
    p = snakemake.params
    # The configured threads, not the scheduler's (possibly fewer): the numbers depend on it.
    torch.set_num_threads(p.torch_threads)
    # Model, hook, text, context and the held-out split are read from the activation set's
    # meta.json, so the splice uses exactly the setting the SAE was trained on.
    row = fidelity(
        snakemake.params.ckpt,
        activations=snakemake.input.acts,
        max_tokens=p.max_tokens,
        batch_size=p.batch_size,
        device=p.device,
    )
    write_table(pd.DataFrame([row]), snakemake.output.table)
    print(row, file=log)
