rule fidelity:
    input:
        ckpts=rules.train.output.ckpts,
        acts=rules.activations.output.acts,
    output:
        table="results/fidelity/{dataset}/{group}/{arch}/seed{seed}.parquet",
    log:
        "logs/fidelity/{dataset}/{group}/{arch}/seed{seed}.log",
    benchmark:
        "results/benchmarks/fidelity/{dataset}/{group}/{arch}/seed{seed}.tsv"
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
        flags=fidelity_flags,
    shell:
        # Model, hook, text, context and the held-out split come from the activation set's
        # meta.json, so the splice uses exactly the setting the SAE was trained on.
        "isae --threads {params.torch_threads} fidelity {params.ckpt} --activations {input.acts}"
        " {params.flags} --out {output.table} > {log} 2>&1"
