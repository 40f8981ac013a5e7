# One rule and one script per figure; PNG for the report, PDF for the paper.


rule f1_stability:
    input:
        latents=rules.collect_latents.output.table,
        pairs=rules.collect_pairs.output.table,
        runs=rules.collect_runs.output.table,
        chance=rules.collect_chance.output.table,
    output:
        png=report(
            "results/figures/F1.png", caption="../report/F1.rst", category="Figures"
        ),
        pdf="results/figures/F1.pdf",
    log:
        "logs/f1_stability/all.log",
    benchmark:
        "benchmarks/rules/f1_stability/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f1_stability.py"


rule f2_truth_recovery:
    input:
        runs=rules.collect_runs.output.table,
    output:
        png=report(
            "results/figures/F2.png", caption="../report/F2.rst", category="Figures"
        ),
        pdf="results/figures/F2.pdf",
    log:
        "logs/f2_truth_recovery/all.log",
    benchmark:
        "benchmarks/rules/f2_truth_recovery/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    params:
        true_k=true_k(),
    script:
        "../../scripts/f2_truth_recovery.py"


rule f3_ric:
    input:
        runs=rules.collect_runs.output.table,
    output:
        png=report(
            "results/figures/F3.png", caption="../report/F3.rst", category="Figures"
        ),
        pdf="results/figures/F3.pdf",
    log:
        "logs/f3_ric/all.log",
    benchmark:
        "benchmarks/rules/f3_ric/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f3_ric.py"


rule f4_ablation:
    input:
        runs=rules.collect_runs.output.table,
        pairs=rules.collect_pairs.output.table,
    output:
        png=report(
            "results/figures/F4.png", caption="../report/F4.rst", category="Figures"
        ),
        pdf="results/figures/F4.pdf",
    log:
        "logs/f4_ablation/all.log",
    benchmark:
        "benchmarks/rules/f4_ablation/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f4_ablation.py"


rule f5_fvu_l0:
    input:
        runs=rules.collect_runs.output.table,
    output:
        png=report(
            "results/figures/F5.png", caption="../report/F5.rst", category="Figures"
        ),
        pdf="results/figures/F5.pdf",
    log:
        "logs/f5_fvu_l0/all.log",
    benchmark:
        "benchmarks/rules/f5_fvu_l0/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f5_fvu_l0.py"


rule f6_fidelity:
    input:
        fidelity=rules.collect_fidelity.output.table,
        runs=rules.collect_runs.output.table,
    output:
        png=report(
            "results/figures/F6.png", caption="../report/F6.rst", category="Figures"
        ),
        pdf="results/figures/F6.pdf",
    log:
        "logs/f6_fidelity/all.log",
    benchmark:
        "benchmarks/rules/f6_fidelity/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f6_fidelity.py"


rule f7_budget:
    input:
        runs=rules.collect_runs.output.table,
        pairs=rules.collect_pairs.output.table,
        chance=rules.collect_chance.output.table,
    output:
        png=report(
            "results/figures/F7.png", caption="../report/F7.rst", category="Figures"
        ),
        pdf="results/figures/F7.pdf",
    log:
        "logs/f7_budget/all.log",
    benchmark:
        "benchmarks/rules/f7_budget/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f7_budget.py"


rule f8_iter:
    input:
        runs=rules.collect_runs.output.table,
        pairs=rules.collect_pairs.output.table,
    output:
        png=report(
            "results/figures/F8.png", caption="../report/F8.rst", category="Figures"
        ),
        pdf="results/figures/F8.pdf",
    log:
        "logs/f8_iter/all.log",
    benchmark:
        "benchmarks/rules/f8_iter/all.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    script:
        "../../scripts/f8_iter.py"
