rule eval:
    input:
        ckpt=rules.train.output.ckpt,
        acts=rules.activations.output.acts,
    output:
        table="results/eval/{dataset}/{arch}/k{k}-w{width}/seed{seed}.parquet",
    log:
        "logs/eval/{dataset}/{arch}/k{k}-w{width}/seed{seed}.log",
    benchmark:
        "benchmarks/rules/eval/{dataset}/{arch}/k{k}-w{width}/seed{seed}.tsv"
    conda:
        ENV
    threads: res("eval", "threads")
    resources:
        mem_mb=res("eval", "mem_mb"),
        runtime=res("eval", "runtime"),
        gpu=gpu_count(),
    params:
        device=config["device"],
    shell:
        "isae eval {input.ckpt} --activations {input.acts} --device {params.device}"
        " --out {output.table} > {log} 2>&1"
