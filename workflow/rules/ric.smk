rule ric:
    input:
        ckpt=rules.train.output.ckpt,
        acts=rules.activations.output.acts,
    output:
        table="results/ric/{dataset}/{arch}/k{k}-w{width}/seed{seed}.parquet",
        summary="results/ric/{dataset}/{arch}/k{k}-w{width}/seed{seed}.summary.parquet",
    log:
        "logs/ric/{dataset}/{arch}/k{k}-w{width}/seed{seed}.log",
    benchmark:
        "benchmarks/rules/ric/{dataset}/{arch}/k{k}-w{width}/seed{seed}.tsv"
    conda:
        ENV
    threads: res("ric", "threads")
    resources:
        mem_mb=res("ric", "mem_mb"),
        runtime=res("ric", "runtime"),
        gpu=gpu_count(),
    params:
        flags=ric_flags,
    shell:
        "isae ric {input.ckpt} --activations {input.acts} {params.flags}"
        " --out {output.table} --summary {output.summary} > {log} 2>&1"
