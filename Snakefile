# The iSAE study: every figure and table of "Toward Identifiable Sparse Autoencoders".
#
#   snakemake --cores 2 --workflow-profile workflow/profiles/local     # embedded default
#   snakemake --cores 2 results/tables/T1.md                          # one target
#   snakemake --report results/report.html                             # after a run
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless config files are named with --configfile: those replace it
# (instead of being merged into it), so config/paper.yaml runs exactly what it lists.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/fidelity.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/browser.smk"


rule all:
    default_target: True
    input:
        rules.table_t1.output,
        rules.table_t2.output,
        rules.table_lr.output,
        rules.table_t3.output,
        FIGURE_OUTPUTS,
        BROWSER_PAGES,
        run_artifacts,
