"""Validation of the config, wildcard constraints, input functions and path helpers.

The study's design (which SAEs are trained, in which groups, and what each job's command
is told) lives in the library: ``isae.study.grid`` (runs, groups, the grids) and
``isae.study.plan`` (the flags of each job). This file wires them to the rules.
"""

import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from isae.errors import UserError
from isae.study import grid as study_grid
from isae.study import plan

# Snakemake reads nested --config values as strings (YAML's BaseLoader): re-typed here.
plan.typed_overrides(config, workflow.config_settings.overwrite_config or {})

# Fails before any job, naming the offending key (additionalProperties: false everywhere);
# also fills in the schema's defaults.
validate(config, "../../config/schema.yaml")

# The checks the schema cannot express (known archs, datasets named by the grids, k below
# width), each naming the key.
try:
    study_grid.check_config(config)
except UserError as e:
    raise WorkflowError(f"config: {e}")


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    group=r"k\d+-w\d+-r\d+(-[a-z0-9]+)*",
    arch=r"[a-z][a-z0-9+\-]*",
    seed=r"\d+",
    seed_a=r"\d+",
    seed_b=r"\d+",
    width=r"\d+",
    half=r"[01]",
    shape=r"k\d+-w\d+-r\d+",


#: The software of all jobs (the `conda` directive): the project's one environment, the
#: same that the README's setup installs. Relative to the .smk files.
ENV = "../../environment.yml"

DATASETS = config["datasets"]
#: The runs, their grids and their training groups.
GRID = study_grid.Grid.of(config)
GROUPS = GRID.groups
#: Downstream fidelity (F6): the k sweep's and main grid's runs of the datasets that ask.
FIDELITY_RUNS = study_grid.fidelity_runs(config, GRID)


def group_of(wildcards) -> study_grid.Group:
    return GROUPS[(wildcards.dataset, wildcards.group)]


def grid_flags() -> list:
    """One row per trained run: its identity and the grids it belongs to (collect rules)."""
    return GRID.flags()


# ----------------------------------------------------------------------------- helpers


def dataset_cfg(wildcards) -> dict:
    return DATASETS[wildcards.dataset]


def res(stage: str, key: str):
    """A resource of a class of jobs (config `resources`), e.g. res("train", "mem_mb")."""
    return config["resources"][stage][key]


def gpu_count() -> int:
    return plan.gpu_count(config)


def has_lr_sweep(name: str) -> bool:
    return study_grid.has_lr_sweep(config, GRID, name)


#: The datasets with an lr sweep, and (dataset, width) of the width axis's second sweeps.
SWEPT = [n for n in DATASETS if has_lr_sweep(n)]
WIDTH_LR_SWEEPS = study_grid.width_lr_sweeps(config, GRID)


# The flags of each job's command. Every config value that reaches a shell command goes
# through these, and plan.cli_flags quotes each for the shell; the other placeholders of
# the rules' commands are paths made of wildcards (constrained above), integers and enums
# (typed by the schema), which need no quoting.


def extract_flags(wildcards) -> str:
    return plan.cli_flags(plan.extract_options(config, wildcards.dataset))


def lr_sweep_flags(wildcards) -> str:
    return plan.cli_flags(plan.lr_sweep_options(config, GRID, wildcards.dataset))


def train_flags(wildcards) -> str:
    return plan.cli_flags(plan.train_options(config, GRID, group_of(wildcards)))


def measure_flags(wildcards) -> str:
    return plan.cli_flags(plan.measure_options(config, GRID, group_of(wildcards)))


def fidelity_flags(wildcards) -> str:
    return plan.cli_flags(plan.fidelity_options(config))


def browser_pairs() -> list:
    """Wildcards of the feature-browser pages (per lm dataset and main arch, two seeds)."""
    return study_grid.browser_pairs(config, GRID)


def true_k() -> dict:
    """Synthetic dataset -> the k its codes were generated with (F2 marks it)."""
    return study_grid.true_k(config)


# ----------------------------------------------------------------------------- inputs


def derived_set(dataset: str, data: str) -> str:
    """The folder of a dataset's own activation set (data "") or of one derived from it."""
    if not data:
        return rules.activations.output.acts.format(dataset=dataset)
    name, wc = plan.derived_set_job(dataset, data)
    return getattr(rules, name).output.acts.format(**wc)


def group_acts(wildcards) -> str:
    """The activation set a group trains on (Group.data)."""
    return derived_set(wildcards.dataset, group_of(wildcards).data)


def lr_output(name: str, width: int, key: str) -> str:
    """An output (choice, table, ckpts) of a dataset's lr sweep at ``width``: the main
    sweep's at the main width, the width axis's second sweep's elsewhere."""
    if width == DATASETS[name]["train"]["width"]:
        return getattr(rules.lr_sweep.output, key).format(dataset=name)
    return getattr(rules.lr_sweep_width.output, key).format(dataset=name, width=width)


def lr_runs(wildcards) -> list:
    """The checkpoints of the lr sweep the group reuses (study_grid.lr_source)."""
    w, reuse = study_grid.lr_source(config, GRID, group_of(wildcards))
    return [lr_output(wildcards.dataset, w, "ckpts")] if reuse else []


def lr_choice(wildcards) -> list:
    """The choice file of the lr sweep nearest to the group's width (none without a sweep):
    isae train carries its rates to the group's width."""
    w, _ = study_grid.lr_source(config, GRID, group_of(wildcards))
    return [] if w is None else [lr_output(wildcards.dataset, w, "choice")]


def width_lr_sweep_flags(wildcards) -> str:
    return plan.cli_flags(
        plan.width_lr_sweep_options(
            config, GRID, wildcards.dataset, int(wildcards.width)
        )
    )


def width_lr_tables(wildcards) -> list:
    return [rules.lr_sweep_width.output.table.format(**w) for w in WIDTH_LR_SWEEPS]


def chance_widths(wildcards) -> str:
    """--width flags of the dataset's chance levels: every width its SAEs have."""
    widths = study_grid.dataset_widths(config, GRID, wildcards.dataset)
    return " ".join(f"--width {w}" for w in widths)


def measure_tables(name: str):
    def inner(wildcards) -> list:
        return [
            getattr(rules.measure.output, name).format(**g.wildcards())
            for g in GROUPS.values()
        ]

    return inner


def group_ids() -> list:
    """(dataset, group) of every group, in the order of measure_tables."""
    return [g.wildcards() for g in GROUPS.values()]


def fidelity_tables(wildcards) -> list:
    return [
        rules.fidelity.output.table.format(
            dataset=r.dataset, group=r.group, arch=r.arch, seed=r.seed
        )
        for r in FIDELITY_RUNS
    ]


def fidelity_ids() -> list:
    return [dict(r.key(), group=r.group) for r in FIDELITY_RUNS]


#: Split-data reproducibility: the two halves' groups per (dataset, shape).
SPLIT_PAIRS = study_grid.split_pairs(GRID)


def split_halves(wildcards) -> dict:
    """The checkpoint folders of the two halves of a (dataset, shape)."""
    (pair,) = [p for p in SPLIT_PAIRS if p.wildcards() == dict(wildcards)]
    halves = [rules.train.output.ckpts.format(**g.wildcards()) for g in pair.halves]
    return dict(zip(("half0", "half1"), halves))


def split_tables(wildcards) -> list:
    return [rules.split_pairs.output.table.format(**p.wildcards()) for p in SPLIT_PAIRS]


def chance_tables(wildcards) -> list:
    return [rules.chance.output.table.format(dataset=name) for name in DATASETS]


def lr_tables(wildcards) -> list:
    return [rules.lr_sweep.output.table.format(dataset=n) for n in SWEPT]


def run_artifacts(wildcards) -> list:
    """Every per-group artifact (activation sets, lr sweeps, checkpoints, measurements).

    They are targets of `rule all` next to the tables and figures, so that deleting one, a
    group's checkpoints say, makes the next plain `snakemake` rebuild it and then everything
    that depends on it (and nothing else); without this, Snakemake treats a missing
    intermediate file under up-to-date results as nothing to do."""
    out = [rules.activations.output.acts.format(dataset=name) for name in DATASETS]
    out += [derived_set(d, data) for d, data in study_grid.derived_sets(GRID)]
    out += [rules.lr_sweep.output.choice.format(dataset=n) for n in SWEPT]
    out += [rules.lr_sweep_width.output.choice.format(**w) for w in WIDTH_LR_SWEEPS]
    out += [rules.train.output.ckpts.format(**g.wildcards()) for g in GROUPS.values()]
    out += measure_tables("runs")(wildcards) + fidelity_tables(wildcards)
    out += chance_tables(wildcards) + split_tables(wildcards)
    return out
