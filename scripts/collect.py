"""Rule entry point: stack per-run Parquet tables with their identity columns."""

import sys

from isae.data.atomic import write_table
from isae.study.tables import collect

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    df = collect(
        list(snakemake.input.tables),
        snakemake.params.ids,
        columns=snakemake.params.get("columns"),
        where=snakemake.params.get("where"),
    )
    write_table(df, snakemake.output.table)
    print(f"{len(df)} rows from {len(snakemake.input.tables)} tables", file=log)
