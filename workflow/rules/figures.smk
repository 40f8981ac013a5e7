# One rule per figure, all alike: the collected tables it reads -> PNG for the report, PDF
# for the paper, drawn by the one figure script (scripts/figure.py) with the figure's name.

#: Figure -> the collected tables it reads (the outputs of collect_<table>). The rule's
#: name is plan.FIGURE_RULES[figure] (f1_stability, ...).
FIGURE_TABLES = {
    "F1": ["latents", "pairs", "runs", "chance", "split"],
    "F2": ["runs"],
    "F3": ["runs"],
    "F4": ["runs", "pairs"],
    "F5": ["runs"],
    "F6": ["fidelity", "runs"],
    "F7": ["runs", "pairs", "chance"],
    "F8": ["runs", "pairs"],
    "F9": ["runs", "pairs", "chance"],
}
#: Figure -> what it is given besides tables.
FIGURE_PARAMS = {"F2": {"true_k": true_k()}}


for figure, tables in FIGURE_TABLES.items():
    rule_name = plan.FIGURE_RULES[figure]

    rule:
        name:
            rule_name
        input:
            **{t: getattr(rules, f"collect_{t}").output.table for t in tables},
        output:
            png=report(
                f"results/figures/{figure}.png",
                caption=f"../report/{figure}.rst",
                category="Figures",
            ),
            pdf=f"results/figures/{figure}.pdf",
        log:
            f"logs/{rule_name}/all.log",
        benchmark:
            f"results/benchmarks/{rule_name}/all.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=res("report", "mem_mb"),
            runtime=res("report", "runtime"),
        params:
            **FIGURE_PARAMS.get(figure, {}),
            figure=figure,
        script:
            "../../scripts/figure.py"


#: Every figure's PNG and PDF (the targets `rule all` asks for).
FIGURE_OUTPUTS = [
    getattr(rules, plan.FIGURE_RULES[figure]).output for figure in FIGURE_TABLES
]
