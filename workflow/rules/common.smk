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
    half=r"[01]",
    shape=r"k\d+-w\d+-r\d+",


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


def derived_set(dataset: str, data: str) -> str:
    """The folder of a dataset's own activation set (data "") or of one derived from it."""
    if not data:
        return rules.activations.output.acts.format(dataset=dataset)
    name, wc = plan.derived_set_job(dataset, data)
    return getattr(rules, name).output.acts.format(**wc)


def group_acts(wildcards) -> str:
    """The activation set a group trains on (Group.data)."""
    return derived_set(wildcards.dataset, group_of(wildcards).data)


def lr_runs(wildcards) -> list:
    """The lr sweep's checkpoints of the group's dataset, which a group on the dataset's
    own set reuses."""
    if not has_lr_sweep(wildcards.dataset) or group_of(wildcards).data:
        return []
    return [rules.lr_sweep.output.ckpts.format(dataset=wildcards.dataset)]


def lr_choice(wildcards) -> list:
    """The lr sweep's choice file of the group's dataset (none without a sweep)."""
    if not has_lr_sweep(wildcards.dataset):
        return []
    return [rules.lr_sweep.output.choice.format(dataset=wildcards.dataset)]


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
    out += [derived_set(d, data) for d, data in study_grid.derived_sets(GRID)]
    out += [
        rules.lr_sweep.output.choice.format(dataset=n)
        for n in DATASETS
        if has_lr_sweep(n)
    ]
    out += [rules.train.output.ckpts.format(**g.wildcards()) for g in GROUPS.values()]
    out += measure_tables("runs")(wildcards) + fidelity_tables(wildcards)
    out += chance_tables(wildcards) + split_tables(wildcards)
    return out
