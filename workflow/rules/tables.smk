# Per-run tables gathered into one Parquet per stage (identity columns from the paths, grid
# flags from the config), then T1 and T2.


rule collect_eval:
    input:
        tables=eval_tables,
    output:
        table="results/runs/eval.parquet",
    log:
        "logs/collect_eval/all.log",
    benchmark:
        "benchmarks/rules/collect_eval/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=run_keys(RUNS),
    script:
        "../../scripts/collect.py"


rule collect_match:
    input:
        tables=match_summaries,
    output:
        table="results/runs/match.parquet",
    log:
        "logs/collect_match/all.log",
    benchmark:
        "benchmarks/rules/collect_match/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=pair_keys(PAIRS),
    script:
        "../../scripts/collect.py"


rule collect_match_latents:
    input:
        tables=main_match_tables,
    output:
        table="results/runs/match_latents.parquet",
    log:
        "logs/collect_match_latents/all.log",
    benchmark:
        "benchmarks/rules/collect_match_latents/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=pair_keys(MAIN_PAIRS),
        columns=["abs_cos"],
        where="matched",
    script:
        "../../scripts/collect.py"


rule collect_truth:
    input:
        tables=truth_summaries,
    output:
        table="results/runs/truth.parquet",
    log:
        "logs/collect_truth/all.log",
    benchmark:
        "benchmarks/rules/collect_truth/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=run_keys(TRUTH_RUNS),
    script:
        "../../scripts/collect.py"


rule collect_ric:
    input:
        tables=ric_summaries,
    output:
        table="results/runs/ric.parquet",
    log:
        "logs/collect_ric/all.log",
    benchmark:
        "benchmarks/rules/collect_ric/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=run_keys(RIC_RUNS),
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
        "benchmarks/rules/collect_fidelity/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        ids=run_keys(FIDELITY_RUNS),
    script:
        "../../scripts/collect.py"


rule table_t1:
    input:
        eval=rules.collect_eval.output.table,
        match=rules.collect_match.output.table,
        truth=rules.collect_truth.output.table,
    output:
        table="results/tables/T1.parquet",
        md=report("results/tables/T1.md", caption="../report/T1.rst", category="Tables"),
        tex="results/tables/T1.tex",
    log:
        "logs/table_t1/all.log",
    benchmark:
        "benchmarks/rules/table_t1/all.tsv"
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
        match=rules.collect_match.output.table,
        ric=rules.collect_ric.output.table,
    output:
        table="results/tables/T2.parquet",
        md=report("results/tables/T2.md", caption="../report/T2.rst", category="Tables"),
        tex="results/tables/T2.tex",
    log:
        "logs/table_t2/all.log",
    benchmark:
        "benchmarks/rules/table_t2/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/table_t2.py"
