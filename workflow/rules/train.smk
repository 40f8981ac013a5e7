rule train:
    input:
        acts=rules.activations.output.acts,
    output:
        ckpt=directory("results/checkpoints/{dataset}/{arch}/k{k}-w{width}/seed{seed}"),
    log:
        "logs/train/{dataset}/{arch}/k{k}-w{width}/seed{seed}.log",
    benchmark:
        "benchmarks/rules/train/{dataset}/{arch}/k{k}-w{width}/seed{seed}.tsv"
    conda:
        ENV
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=gpu_count(),
    params:
        flags=train_flags,
    shell:
        "isae train --activations {input.acts} --arch {wildcards.arch}"
        " --k {wildcards.k} --width {wildcards.width} --seed {wildcards.seed}"
        " {params.flags} --out {output.ckpt} > {log} 2>&1"
