rule fidelity:
    input:
        ckpts=rules.train.output.ckpts,
        acts=rules.activations.output.acts,
    output:
        table="results/fidelity/{dataset}/{group}/{arch}/seed{seed}.parquet",
    log:
        "logs/fidelity/{dataset}/{group}/{arch}/seed{seed}.log",
    benchmark:
        "benchmarks/rules/fidelity/{dataset}/{group}/{arch}/seed{seed}.tsv"
    conda:
        ENV
    threads: res("fidelity", "threads")
    resources:
        mem_mb=res("fidelity", "mem_mb"),
        runtime=res("fidelity", "runtime"),
        gpu=gpu_count(),
    params:
        torch_threads=res("fidelity", "threads"),
        ckpt=lambda wc, input: f"{input.ckpts}/{wc.arch}/seed{wc.seed}",
        max_tokens=config["fidelity"]["max_tokens"],
        batch_size=config["fidelity"]["batch_size"],
        device=config["device"],
    script:
        "../../scripts/fidelity.py"
