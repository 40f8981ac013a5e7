# One rule and one script per figure; PNG for the report, PDF for the paper.


rule f1_stability:
    input:
        latents=rules.collect_match_latents.output.table,
        match=rules.collect_match.output.table,
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
        truth=rules.collect_truth.output.table,
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
        ric=rules.collect_ric.output.table,
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
        eval=rules.collect_eval.output.table,
        match=rules.collect_match.output.table,
        truth=rules.collect_truth.output.table,
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
        eval=rules.collect_eval.output.table,
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
