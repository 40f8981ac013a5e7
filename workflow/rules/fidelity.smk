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
    params:
        model=lambda wc: dataset_cfg(wc)["extract"]["model"],
        hook=lambda wc: dataset_cfg(wc)["extract"]["hook"],
        text=lambda wc: dataset_cfg(wc)["extract"]["text"],
        context=lambda wc: dataset_cfg(wc)["extract"]["context"],
        max_tokens=config["fidelity"]["max_tokens"],
        batch_size=config["fidelity"]["batch_size"],
        device=config["device"],
    threads: res("fidelity", "threads")
    resources:
        mem_mb=res("fidelity", "mem_mb"),
        runtime=res("fidelity", "runtime"),
        gpu=gpu_count(),
    script:
        "../../scripts/fidelity.py"
