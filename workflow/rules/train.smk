rule lr_sweep:
    input:
        acts=rules.activations.output.acts,
    output:
        choice="results/lr/{dataset}/lr.json",
        table="results/lr/{dataset}/sweep.parquet",
        ckpts=directory("results/lr/{dataset}/ckpt"),
    log:
        "logs/lr_sweep/{dataset}.log",
    benchmark:
        "results/benchmarks/lr_sweep/{dataset}.tsv"
    # Before the rest: every training job of the dataset waits for its learning rates.
    priority: 2
    conda:
        ENV
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=gpu_count(),
    params:
        torch_threads=res("train", "threads"),
        flags=lr_sweep_flags,
        out=lambda wc: f"results/lr/{wc.dataset}",
    shell:
        "isae --threads {params.torch_threads} lr-sweep --activations {input.acts} {params.flags} --out {params.out}"
        " > {log} 2>&1"


# The width axis's second sweep, at a larger width: it confirms the √ rule (a choice of 1x
# the carried base rate) or overrides it for the widths nearest to it.
rule lr_sweep_width:
    input:
        acts=rules.activations.output.acts,
    output:
        choice="results/lr/{dataset}-w{width}/lr.json",
        table="results/lr/{dataset}-w{width}/sweep.parquet",
        ckpts=directory("results/lr/{dataset}-w{width}/ckpt"),
    log:
        "logs/lr_sweep_width/{dataset}/w{width}.log",
    benchmark:
        "results/benchmarks/lr_sweep_width/{dataset}/w{width}.tsv"
    priority: 2
    conda:
        ENV
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=gpu_count(),
    params:
        torch_threads=res("train", "threads"),
        flags=width_lr_sweep_flags,
        # Beside the main sweep's folder, not in it (an lr-sweep output holds only its own).
        out=lambda wc: f"results/lr/{wc.dataset}-w{wc.width}",
    shell:
        "isae --threads {params.torch_threads} lr-sweep --activations {input.acts} {params.flags} --out {params.out}"
        " > {log} 2>&1"


rule train:
    input:
        acts=group_acts,
        lr=lr_choice,
        reuse=lr_runs,
    output:
        ckpts=directory("results/checkpoints/{dataset}/{group}"),
    log:
        "logs/train/{dataset}/{group}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{group}.tsv"
    # Training before measuring: the long jobs start while there is work to overlap them.
    priority: 1
    conda:
        ENV
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=gpu_count(),
    params:
        torch_threads=res("train", "threads"),
        flags=train_flags,
        lr=lambda wc, input: f"--lr-from {input.lr}" if input.lr else "",
        # The lr sweep's run at the chosen rate is the group's seed at that rate: copied,
        # not trained again (isae train --reuse checks that every setting is the same).
        reuse=lambda wc, input: f"--reuse {input.reuse}" if input.reuse else "",
    shell:
        "isae --threads {params.torch_threads} train --activations {input.acts} {params.flags}"
        " {params.lr} {params.reuse}"
        " --out '{output.ckpts}/{{arch}}/seed{{seed}}' > {log} 2>&1"
