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
        flags=fidelity_flags,
    shell:
        # Model, hook, text, context and the held-out split come from the activation set's
        # meta.json, so the splice uses exactly the setting the SAE was trained on.
        "isae fidelity {input.ckpt} --activations {input.acts} {params.flags}"
        " --out {output.table} > {log} 2>&1"
