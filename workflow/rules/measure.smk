rule measure:
    input:
        ckpts=rules.train.output.ckpts,
        acts=group_acts,
    output:
        runs="results/measure/{dataset}/{group}/runs.parquet",
        pairs="results/measure/{dataset}/{group}/pairs.parquet",
        latents="results/measure/{dataset}/{group}/latents.parquet",
    log:
        "logs/measure/{dataset}/{group}.log",
    benchmark:
        "results/benchmarks/measure/{dataset}/{group}.tsv"
    conda:
        ENV
    threads: res("measure", "threads")
    resources:
        mem_mb=res("measure", "mem_mb"),
        runtime=res("measure", "runtime"),
        gpu=gpu_count(),
    params:
        torch_threads=res("measure", "threads"),
        flags=measure_flags,
        out=lambda wc, output: os.path.dirname(output.runs),
    shell:
        "isae --threads {params.torch_threads} measure {input.ckpts} --activations {input.acts} {params.flags}"
        " --out {params.out} > {log} 2>&1"


rule split_pairs:
    input:
        unpack(split_halves),
        # Both halves hold every held-out row of the dataset's own set: codes are compared
        # on those.
        acts=rules.activations.output.acts,
    output:
        table="results/split/{dataset}/{shape}.parquet",
    log:
        "logs/split_pairs/{dataset}/{shape}.log",
    benchmark:
        "results/benchmarks/split_pairs/{dataset}/{shape}.tsv"
    conda:
        ENV
    threads: res("measure", "threads")
    resources:
        mem_mb=res("measure", "mem_mb"),
        runtime=res("measure", "runtime"),
        gpu=gpu_count(),
    params:
        **plan.split_pairs_options(config),
        torch_threads=res("measure", "threads"),
    script:
        "../../scripts/split_pairs.py"


rule chance:
    input:
        acts=rules.activations.output.acts,
    output:
        table="results/chance/{dataset}.parquet",
    log:
        "logs/chance/{dataset}.log",
    benchmark:
        "results/benchmarks/chance/{dataset}.tsv"
    conda:
        ENV
    threads: res("measure", "threads")
    resources:
        mem_mb=res("measure", "mem_mb"),
        runtime=res("measure", "runtime"),
    params:
        torch_threads=res("measure", "threads"),
        # Every width the dataset's SAEs have: each is read against its own chance level.
        widths=chance_widths,
        draws=config["chance"]["draws"],
        seed=config["data_seed"],
    shell:
        "isae --threads {params.torch_threads} chance --activations {input.acts} {params.widths}"
        " --draws {params.draws} --seed {params.seed} --out {output.table} > {log} 2>&1"
