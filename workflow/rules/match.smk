rule match_pair:
    input:
        a=ckpt_of("seed_a"),
        b=ckpt_of("seed_b"),
        acts=rules.activations.output.acts,
    output:
        table="results/match/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.parquet",
        summary="results/match/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.summary.parquet",
    log:
        "logs/match_pair/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.log",
    benchmark:
        "benchmarks/rules/match_pair/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.tsv"
    conda:
        ENV
    threads: res("match", "threads")
    resources:
        mem_mb=res("match", "mem_mb"),
        runtime=res("match", "runtime"),
        gpu=gpu_count(),
    params:
        flags=match_flags,
    shell:
        "isae match {input.a} {input.b} --activations {input.acts} {params.flags}"
        " --out {output.table} --summary {output.summary} > {log} 2>&1"


rule match_truth:
    input:
        ckpt=rules.train.output.ckpt,
        acts=rules.activations.output.acts,
    output:
        table="results/match/{dataset}/{arch}/k{k}-w{width}/seed{seed}-truth.parquet",
        summary="results/match/{dataset}/{arch}/k{k}-w{width}/seed{seed}-truth.summary.parquet",
    log:
        "logs/match_truth/{dataset}/{arch}/k{k}-w{width}/seed{seed}.log",
    benchmark:
        "benchmarks/rules/match_truth/{dataset}/{arch}/k{k}-w{width}/seed{seed}.tsv"
    conda:
        ENV
    threads: res("match", "threads")
    resources:
        mem_mb=res("match", "mem_mb"),
        runtime=res("match", "runtime"),
        gpu=gpu_count(),
    params:
        flags=match_flags,
    shell:
        # The synthetic set's truth/ folder is a checkpoint of the true dictionary.
        "isae match {input.ckpt} {input.acts}/truth --activations {input.acts} {params.flags}"
        " --out {output.table} --summary {output.summary} > {log} 2>&1"
