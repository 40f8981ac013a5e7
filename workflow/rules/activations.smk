rule activations:
    output:
        acts=directory("results/activations/{dataset}"),
    log:
        "logs/activations/{dataset}.log",
    benchmark:
        "results/benchmarks/activations/{dataset}.tsv"
    # First: every other job waits for an activation set (the language model's is the longest).
    priority: 3
    conda:
        ENV
    threads: res("extract", "threads")
    resources:
        mem_mb=res("extract", "mem_mb"),
        runtime=res("extract", "runtime"),
        gpu=lambda wc: 0 if dataset_cfg(wc)["source"] == "synthetic" else gpu_count(),
    params:
        torch_threads=res("extract", "threads"),
        source=lambda wc: dataset_cfg(wc)["source"],
        flags=extract_flags,
    shell:
        "isae --threads {params.torch_threads} extract {params.source} {params.flags} --out {output.acts} > {log} 2>&1"


# The trained references' activation sets (config `references`), derived from a dataset's own.


rule null_activations:
    input:
        acts=rules.activations.output.acts,
    output:
        acts=directory("results/activations/{dataset}-null"),
    log:
        "logs/null_activations/{dataset}.log",
    benchmark:
        "results/benchmarks/null_activations/{dataset}.tsv"
    priority: 3
    conda:
        ENV
    threads: res("extract", "threads")
    resources:
        mem_mb=res("extract", "mem_mb"),
        runtime=res("extract", "runtime"),
    params:
        torch_threads=res("extract", "threads"),
        flags=plan.cli_flags(plan.null_set_options(config)),
    shell:
        # Gaussian rows with the mean and covariance of every training row of the set, and
        # its held-out split: the trained null's data.
        "isae --threads {params.torch_threads} extract gaussian --like {input.acts} {params.flags}"
        " --out {output.acts} > {log} 2>&1"


rule split_activations:
    input:
        acts=rules.activations.output.acts,
    output:
        acts=directory("results/activations/{dataset}-half{half}"),
    log:
        "logs/split_activations/{dataset}-half{half}.log",
    benchmark:
        "results/benchmarks/split_activations/{dataset}-half{half}.tsv"
    priority: 3
    conda:
        ENV
    threads: res("extract", "threads")
    resources:
        mem_mb=res("extract", "mem_mb"),
        runtime=res("extract", "runtime"),
    params:
        torch_threads=res("extract", "threads"),
        flags=plan.cli_flags(plan.split_set_options(config)),
    shell:
        # One half of the training documents (the same seed for both halves) and every
        # held-out row, so that SAEs on the two halves are evaluated on the same rows.
        "isae --threads {params.torch_threads} split {input.acts} --half {wildcards.half} {params.flags}"
        " --out {output.acts} > {log} 2>&1"
