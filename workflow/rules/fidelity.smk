rule fidelity:
    input:
        ckpt=rules.train.output.ckpt,
        acts=rules.activations.output.acts,
    output:
        table="results/fidelity/{dataset}/{arch}/k{k}-w{width}/seed{seed}.parquet",
    log:
        "logs/fidelity/{dataset}/{arch}/k{k}-w{width}/seed{seed}.log",
    benchmark:
        "benchmarks/rules/fidelity/{dataset}/{arch}/k{k}-w{width}/seed{seed}.tsv"
    conda:
        ENV
    threads: res("fidelity", "threads")
    resources:
        mem_mb=res("fidelity", "mem_mb"),
        runtime=res("fidelity", "runtime"),
        gpu=gpu_count(),
    params:
        max_tokens=config["fidelity"]["max_tokens"],
        batch_size=config["fidelity"]["batch_size"],
        device=config["device"],
    script:
        "../../scripts/fidelity.py"
