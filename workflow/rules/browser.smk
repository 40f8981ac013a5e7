# The cross-seed feature browser: on every language-model dataset, for each architecture of
# the main grid, its two lowest seeds side by side in one static HTML page (`isae browse`).


rule browser:
    input:
        ckpts=rules.train.output.ckpts,
        acts=rules.activations.output.acts,
    output:
        html=report(
            "results/browser/{dataset}/{group}/{arch}/seed{seed_a}-seed{seed_b}.html",
            caption="../report/browser.rst",
            category="Browser",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "arch": "{arch}",
                "seeds": "{seed_a} vs {seed_b}",
            },
        ),
    log:
        "logs/browser/{dataset}/{group}/{arch}/seed{seed_a}-seed{seed_b}.log",
    benchmark:
        "results/benchmarks/browser/{dataset}/{group}/{arch}/seed{seed_a}-seed{seed_b}.tsv"
    conda:
        ENV
    threads: res("measure", "threads")
    resources:
        mem_mb=res("measure", "mem_mb"),
        runtime=res("measure", "runtime"),
        gpu=gpu_count(),
    params:
        torch_threads=res("measure", "threads"),
        a=lambda wc, input: f"{input.ckpts}/{wc.arch}/seed{wc.seed_a}",
        b=lambda wc, input: f"{input.ckpts}/{wc.arch}/seed{wc.seed_b}",
        device=config["device"],
    shell:
        "isae --threads {params.torch_threads} browse {params.a} {params.b}"
        " --activations {input.acts} --device {params.device} --out {output.html} > {log} 2>&1"


#: The pages `rule all` asks for.
BROWSER_PAGES = [rules.browser.output.html.format(**w) for w in browser_pairs()]
