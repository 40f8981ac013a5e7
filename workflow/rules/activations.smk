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
