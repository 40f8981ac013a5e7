# Per-group and per-run tables gathered into one Parquet per kind (identity columns from the
# paths, grid flags from the config), then T1, T2 and the learning-rate table.


rule collect_runs:
    input:
        tables=measure_tables("runs"),
    output:
        table="results/runs/runs.parquet",
    log:
        "logs/collect_runs/all.log",
    benchmark:
        "results/benchmarks/collect_runs/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=group_ids(),
        flags=grid_flags(),
        kind="runs",
    script:
        "../../scripts/collect.py"


rule collect_pairs:
    input:
        tables=measure_tables("pairs"),
    output:
        table="results/runs/pairs.parquet",
    log:
        "logs/collect_pairs/all.log",
    benchmark:
        "results/benchmarks/collect_pairs/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=group_ids(),
        flags=grid_flags(),
        kind="pairs",
    script:
        "../../scripts/collect.py"


rule collect_latents:
    input:
        tables=measure_tables("latents"),
    output:
        table="results/runs/latents.parquet",
    log:
        "logs/collect_latents/all.log",
    benchmark:
        "results/benchmarks/collect_latents/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=group_ids(),
        flags=grid_flags(),
        kind="latents",
    script:
        "../../scripts/collect.py"


rule collect_fidelity:
    input:
        tables=fidelity_tables,
    output:
        table="results/runs/fidelity.parquet",
    log:
        "logs/collect_fidelity/all.log",
    benchmark:
        "results/benchmarks/collect_fidelity/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=fidelity_ids(),
    script:
        "../../scripts/collect.py"


rule collect_chance:
    input:
        tables=chance_tables,
    output:
        table="results/runs/chance.parquet",
    log:
        "logs/collect_chance/all.log",
    benchmark:
        "results/benchmarks/collect_chance/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=[{"dataset": n} for n in DATASETS],
    script:
        "../../scripts/collect.py"


rule collect_lr:
    input:
        tables=lr_tables,
    output:
        table="results/runs/lr.parquet",
    log:
        "logs/collect_lr/all.log",
    benchmark:
        "results/benchmarks/collect_lr/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=[{"dataset": n} for n in SWEPT],
    script:
        "../../scripts/collect.py"


rule collect_split:
    input:
        tables=split_tables,
    output:
        table="results/runs/split.parquet",
    log:
        "logs/collect_split/all.log",
    benchmark:
        "results/benchmarks/collect_split/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=[p.key() for p in SPLIT_PAIRS],
    script:
        "../../scripts/collect.py"


rule table_t1:
    input:
        runs=rules.collect_runs.output.table,
        pairs=rules.collect_pairs.output.table,
        chance=rules.collect_chance.output.table,
        lr=rules.collect_lr.output.table,
        split=rules.collect_split.output.table,
    output:
        table="results/tables/T1.parquet",
        md=report("results/tables/T1.md", caption="../report/T1.rst", category="Tables"),
        tex="results/tables/T1.tex",
    log:
        "logs/table_t1/all.log",
    benchmark:
        "results/benchmarks/table_t1/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/table_t1.py"


rule table_t2:
    input:
        runs=rules.collect_runs.output.table,
        pairs=rules.collect_pairs.output.table,
    output:
        table="results/tables/T2.parquet",
        md=report("results/tables/T2.md", caption="../report/T2.rst", category="Tables"),
        tex="results/tables/T2.tex",
    log:
        "logs/table_t2/all.log",
    benchmark:
        "results/benchmarks/table_t2/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/table_t2.py"


rule table_lr:
    input:
        lr=rules.collect_lr.output.table,
    output:
        table="results/tables/lr.parquet",
        md=report("results/tables/lr.md", caption="../report/lr.rst", category="Tables"),
    log:
        "logs/table_lr/all.log",
    benchmark:
        "results/benchmarks/table_lr/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/table_lr.py"


# T3: T1's and T2's main columns at the largest width of each dataset's width axis.
rule table_t3:
    input:
        runs=rules.collect_runs.output.table,
        pairs=rules.collect_pairs.output.table,
        chance=rules.collect_chance.output.table,
        lr=rules.collect_lr.output.table,
        lr_width=width_lr_tables,
    output:
        table="results/tables/T3.parquet",
        md=report("results/tables/T3.md", caption="../report/T3.rst", category="Tables"),
        tex="results/tables/T3.tex",
    log:
        "logs/table_t3/all.log",
    benchmark:
        "results/benchmarks/table_t3/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        lr_width_ids=WIDTH_LR_SWEEPS,
    script:
        "../../scripts/table_t3.py"
