# The cross-seed feature browser: on every language-model dataset, for each architecture of
# the main grid, its two lowest seeds side by side in one static HTML page (`isae browse`).


#: Per (dataset, arch, k, width) of the main grid on a language-model set, its lowest seed
#: pair (seed 0 vs seed 1 with the default seeds). Later keys overwrite earlier ones, so the
#: pairs go in by descending seeds.
BROWSER_PAIRS = {
    a.group: (a, b)
    for a, b in sorted(MAIN_PAIRS, key=lambda p: (p[0].seed, p[1].seed), reverse=True)
    if DATASETS[a.dataset]["source"] == "lm"
}


rule browser:
    input:
        a=ckpt_of("seed_a"),
        b=ckpt_of("seed_b"),
        acts=rules.activations.output.acts,
    output:
        html=report(
            "results/browser/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.html",
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
        "logs/browser/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.log",
    benchmark:
        "benchmarks/rules/browser/{dataset}/{arch}/k{k}-w{width}/seed{seed_a}-seed{seed_b}.tsv"
    conda:
        ENV
    threads: res("match", "threads")
    resources:
        mem_mb=res("match", "mem_mb"),
        runtime=res("match", "runtime"),
        gpu=gpu_count(),
    params:
        device=config["device"],
    shell:
        "isae browse {input.a} {input.b} --activations {input.acts}"
        " --device {params.device} --out {output.html} > {log} 2>&1"


#: The pages `rule all` asks for.
BROWSER_PAGES = [
    rules.browser.output.html.format(**pair_wildcards(a, b))
    for a, b in BROWSER_PAIRS.values()
]
