"""Rule entry point: stack per-run or per-group Parquet tables with their identity columns
(and, for the tables of `isae measure`, the grids each run belongs to)."""

import sys

from isae.data.atomic import write_table
from isae.study.tables import collect, collect_groups

snakemake = globals()["snakemake"]  # injected by Snakemake's script: directive

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    p = snakemake.params
    paths = list(snakemake.input.tables)
    if p.get("kind"):
        df = collect_groups(paths, p.ids, p.flags, p.kind)
    else:
        df = collect(paths, p.ids, columns=p.get("columns"), where=p.get("where"))
    write_table(df, snakemake.output.table)
    print(f"{len(df)} rows from {len(paths)} tables", file=log)
