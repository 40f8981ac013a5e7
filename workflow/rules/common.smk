"""Validation of the config, wildcard constraints, input functions and path helpers.

The study's design (which SAEs are trained, in which groups, and what each job's command
is told) lives in the library: ``isae.study.grid`` (runs, groups, the grids) and
``isae.study.plan`` (the flags of each job). This file wires them to the rules.
"""

import os

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from isae.errors import UserError
from isae.study import grid as study_grid
from isae.study import plan


def _retype(value):
    """A --config string such as "5", "0.1", "true" or "null" -> its YAML value."""
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip() else value
        return parsed if isinstance(parsed, (bool, int, float, type(None))) else value
    if isinstance(value, list):
        return [_retype(v) for v in value]
    if isinstance(value, dict):
        return {k: _retype(v) for k, v in value.items()}
    return value


def _typed_overrides(cfg: dict, overrides: dict) -> None:
    """Snakemake parses the values of --config (e.g. seeds=[0,1] or datasets={...}) with
    YAML's BaseLoader, which makes every nested scalar a string; re-read those, and only
    those, so that command-line overrides mean what they say."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            _typed_overrides(cfg[key], value)
        elif key in cfg and cfg[key] == value:
            cfg[key] = _retype(value)


_typed_overrides(config, workflow.config_settings.overwrite_config or {})

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


#: The software of all jobs (the `conda` directive): the project's one environment, the
#: same that the README's setup installs. Relative to the .smk files.
ENV = "../../environment.yml"

DATASETS = config["datasets"]
#: The runs, their grids and their training groups.
GRID = study_grid.Grid.of(config)
GROUPS = GRID.groups
#: Downstream fidelity (F6): the k sweep's runs of the datasets that ask for it.
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


def lr_output(name: str, width: int, key: str) -> str:
    """An output (choice, table, ckpts) of a dataset's lr sweep at ``width``: the main
    sweep's at the main width, the width axis's second sweep's elsewhere."""
    if width == DATASETS[name]["train"]["width"]:
        return getattr(rules.lr_sweep.output, key).format(dataset=name)
    return getattr(rules.lr_sweep_width.output, key).format(dataset=name, width=width)


def lr_width(wildcards) -> int | None:
    """The swept width whose rates the group trains at (the nearest to its own)."""
    return study_grid.lr_width_of(
        config, GRID, wildcards.dataset, group_of(wildcards).width
    )


def lr_runs(wildcards) -> list:
    """The checkpoints of the lr sweep at the group's width, which the group reuses."""
    w = lr_width(wildcards)
    if w is None or w != group_of(wildcards).width:
        return []
    return [lr_output(wildcards.dataset, w, "ckpts")]


def lr_choice(wildcards) -> list:
    """The choice file of the lr sweep nearest to the group's width (none without a sweep):
    isae train carries its rates to the group's width."""
    w = lr_width(wildcards)
    return [] if w is None else [lr_output(wildcards.dataset, w, "choice")]


def width_lr_sweeps() -> list:
    """Wildcards (dataset, width) of the width axis's second lr sweeps."""
    return [
        {"dataset": n, "width": w}
        for n in DATASETS
        for w in study_grid.lr_sweep_widths(config, GRID, n)[1:]
    ]


def width_lr_sweep_flags(wildcards) -> str:
    return plan.cli_flags(
        plan.width_lr_sweep_options(
            config, GRID, wildcards.dataset, int(wildcards.width)
        )
    )


def width_lr_tables(wildcards) -> list:
    return [rules.lr_sweep_width.output.table.format(**w) for w in width_lr_sweeps()]


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


def chance_tables(wildcards) -> list:
    return [rules.chance.output.table.format(dataset=name) for name in DATASETS]


def lr_tables(wildcards) -> list:
    return [
        rules.lr_sweep.output.table.format(dataset=name)
        for name in DATASETS
        if has_lr_sweep(name)
    ]


def run_artifacts(wildcards) -> list:
    """Every per-group artifact (activation sets, lr sweeps, checkpoints, measurements).

    They are targets of `rule all` next to the tables and figures, so that deleting one, a
    group's checkpoints say, makes the next plain `snakemake` rebuild it and then everything
    that depends on it (and nothing else); without this, Snakemake treats a missing
    intermediate file under up-to-date results as nothing to do."""
    out = [rules.activations.output.acts.format(dataset=name) for name in DATASETS]
    out += [
        rules.lr_sweep.output.choice.format(dataset=n)
        for n in DATASETS
        if has_lr_sweep(n)
    ]
    out += [rules.lr_sweep_width.output.choice.format(**w) for w in width_lr_sweeps()]
    out += [rules.train.output.ckpts.format(**g.wildcards()) for g in GROUPS.values()]
    out += measure_tables("runs")(wildcards) + fidelity_tables(wildcards)
    out += chance_tables(wildcards)
    return out
