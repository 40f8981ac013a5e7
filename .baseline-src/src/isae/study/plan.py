"""The jobs a study config plans, and the flags each job's command is given.

The workflow's rules (``workflow/rules/*.smk``) turn the grid (``isae.study.grid``) into
jobs; this module says the same in Python, so that the compute plan (jobs, GPUs, SAEs and
training tokens per job) is read from the grid, not from Snakemake's dry-run text. A test
(tests/test_workflow.py) holds ``jobs`` equal to the jobs of ``snakemake -n``; a rule added
to the workflow is added to ``jobs`` too.

Every value that reaches a shell command goes through ``cli_flags``, which quotes it for
the shell: a config value is an argument, never shell syntax.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from isae.study.grid import (
    Grid,
    Group,
    base_lr,
    browser_pairs,
    derived_sets,
    fidelity_runs,
    has_lr_sweep,
    lr_sweep_widths,
    main_archs,
    measures_isometry,
    split_pairs,
    train_extra,
    width_rows,
    width_sweep_archs,
)

#: The rules that run once per study, in the order the workflow defines them.
REPORT_RULES = (
    "collect_runs",
    "collect_pairs",
    "collect_latents",
    "collect_fidelity",
    "collect_chance",
    "collect_lr",
    "collect_split",
    "table_t1",
    "table_t2",
    "table_lr",
    "table_t3",
)
#: Figure -> its rule (one rule per figure, generated in workflow/rules/figures.smk).
FIGURE_RULES = {
    "F1": "f1_stability",
    "F2": "f2_truth_recovery",
    "F3": "f3_ric",
    "F4": "f4_ablation",
    "F5": "f5_fvu_l0",
    "F6": "f6_fidelity",
    "F7": "f7_budget",
    "F8": "f8_iter",
    "F9": "f9_width",
}


# ----------------------------------------------------------------------------- flags


def cli_flags(options: Mapping[str, object]) -> str:
    """{"max_tokens": 5, "text": "my corpus", "coherence": None} ->
    "--max-tokens 5 --text 'my corpus'": None, False and "" are left out, True is a bare
    flag, every value is quoted for the shell."""
    parts = []
    for key, value in options.items():
        if value is None or value is False or value == "":
            continue
        flag = f"--{key.replace('_', '-')}"
        parts.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def gpu_count(cfg: dict) -> int:
    """GPUs per device job: the `gpu` resource of the SLURM executor plugin (--gpus), and
    the slots of the local profile's `gpu` resource."""
    return 1 if cfg["device"] == "cuda" else 0


def extract_options(cfg: dict, name: str) -> dict:
    """The flags of a dataset's `isae extract <source>` (its `extract` block, one to one)."""
    ds = cfg["datasets"][name]
    options = dict(ds["extract"])
    if ds["source"] in ("lm", "vision"):
        options["device"] = cfg["device"]
    return options


def lr_sweep_options(cfg: dict, grid: Grid, name: str) -> dict:
    """The flags of a dataset's `isae lr-sweep` (besides --activations and --out)."""
    tr = cfg["datasets"][name]["train"]
    return {
        "arch": ",".join(grid.sweep_archs(name)),
        "factors": ",".join(f"{f:g}" for f in cfg["lr_sweep"]["factors"]),
        "k": tr["k"],
        "width": tr["width"],
        "seed": cfg["lr_sweep"]["seed"],
        "pair_seed": cfg["lr_sweep"].get("pair_seed"),
        "data_seed": cfg["data_seed"],
        "tokens": tr["rows"],
        "batch_size": tr["batch_size"],
        "lr": tr["lr"],
        "device": cfg["device"],
        **train_extra(cfg, name, tr["width"]),
    }


def width_lr_sweep_options(cfg: dict, grid: Grid, name: str, width: int) -> dict:
    """The flags of a dataset's second `isae lr-sweep`, at ``width`` of its width axis: the
    archs whose rate comes from it, that width's rows and options, and the base rate the
    factors multiply carried there (base_lr), so that a choice of 1x confirms the √ rule."""
    main = {k: v for k, v in lr_sweep_options(cfg, grid, name).items()
            if k not in train_extra(cfg, name, cfg["datasets"][name]["train"]["width"])}
    return {
        **main,
        "arch": ",".join(width_sweep_archs(cfg, grid, name, width)),
        "width": width,
        "tokens": width_rows(cfg, name, width),
        "lr": base_lr(cfg, name, width),
        **train_extra(cfg, name, width),
    }


def train_options(cfg: dict, grid: Grid, group: Group) -> dict:
    """The flags of a group's `isae train` (besides --activations, --lr-from, --reuse and
    --out): every arch with every seed, in one pass over the data."""
    tr = cfg["datasets"][group.dataset]["train"]
    options = {
        "arch": ",".join(group.archs),
        "seeds": ",".join(map(str, group.seeds)),
        "data_seed": cfg["data_seed"],
        "k": group.k,
        "width": group.width,
        "tokens": group.rows,
        "batch_size": tr["batch_size"],
        "device": cfg["device"],
    }
    if not has_lr_sweep(cfg, grid, group.dataset):
        options["lr"] = base_lr(cfg, group.dataset, group.width)
    return {**options, **train_extra(cfg, group.dataset, group.width)}


def measure_options(cfg: dict, grid: Grid, group: Group) -> dict:
    """The flags of a group's `isae measure` (besides the checkpoints, --activations and
    --out)."""
    return {
        "max_rows": cfg["match"]["max_rows"],
        "ric_pairs": cfg["ric"]["pairs"] if measures_isometry(grid, group) else 0,
        "cross_archs": ",".join(a for a in main_archs(cfg, group.dataset) if a in group.archs),
        "converged_below": cfg["convergence"]["threshold"],
        "device": cfg["device"],
    }


def fidelity_options(cfg: dict) -> dict:
    """The flags of `isae fidelity` (besides the checkpoint, --activations and --out)."""
    return {
        "max_tokens": cfg["fidelity"]["max_tokens"],
        "batch_size": cfg["fidelity"]["batch_size"],
        "device": cfg["device"],
    }


def derived_set_job(dataset: str, data: str) -> tuple[str, dict]:
    """The rule and wildcards of the job that makes a derived activation set (Run.data):
    null_activations for the trained null's Gaussian set, split_activations for a half."""
    if data == "null":
        return "null_activations", {"dataset": dataset}
    return "split_activations", {"dataset": dataset, "half": data.removeprefix("half")}


def null_set_options(cfg: dict) -> dict:
    """The flags of `isae extract gaussian` (besides --like and --out)."""
    return {"seed": cfg["references"]["seed"]}


def split_set_options(cfg: dict) -> dict:
    """The flags of `isae split` (besides the set, --half and --out)."""
    return {"seed": cfg["references"]["seed"]}


def split_pairs_options(cfg: dict) -> dict:
    """The parameters of a split-data comparison (scripts/split_pairs.py)."""
    return {"max_rows": cfg["match"]["max_rows"], "device": cfg["device"]}


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Trained:
    """SAEs of one arch that one job trains."""

    arch: str
    saes: int
    """How many (seeds, or the lr sweep's factors times its seeds)."""
    width: int
    rows: int
    """Training rows (tokens) of each."""


@dataclass(frozen=True)
class Job:
    """One job of the workflow's DAG."""

    rule: str
    wildcards: dict = field(default_factory=dict)
    """Wildcard -> value, as strings (as Snakemake shows them)."""
    gpus: int = 0
    """GPUs it requests (the `gpu` resource)."""
    trained: tuple[Trained, ...] = ()
    """What it trains (train and lr_sweep jobs)."""


def sweep_runs(cfg: dict) -> int:
    """SAEs an lr sweep trains per arch: one per factor, two with a pair seed."""
    return len(cfg["lr_sweep"]["factors"]) * (1 if cfg["lr_sweep"].get("pair_seed") is None else 2)


def width_lr_sweep_jobs(cfg: dict, grid: Grid, names: Sequence[str], gpus: int) -> list[Job]:
    """The second lr sweep of each dataset with a width axis (rule lr_sweep_width)."""
    out = []
    for n in names:
        factors = sweep_runs(cfg)
        for w in lr_sweep_widths(cfg, grid, n)[1:]:
            rows = width_rows(cfg, n, w)
            out.append(Job("lr_sweep_width", {"dataset": n, "width": str(w)}, gpus, tuple(
                Trained(a, factors, w, rows) for a in width_sweep_archs(cfg, grid, n, w))))  # fmt: skip
    return out


def _str(d: Mapping) -> dict:
    return {k: str(v) for k, v in d.items()}


def jobs(cfg: dict, grid: Grid | None = None) -> list[Job]:
    """Every job the workflow plans for a config (validated, with the schema's defaults),
    rule by rule."""
    grid = grid or Grid.of(cfg)
    gpus = gpu_count(cfg)
    names = list(cfg["datasets"])
    swept = [n for n in names if has_lr_sweep(cfg, grid, n)]
    out = [
        Job("activations", {"dataset": n},
            0 if cfg["datasets"][n]["source"] == "synthetic" else gpus)
        for n in names
    ]  # fmt: skip
    out += [Job(*derived_set_job(d, data)) for d, data in derived_sets(grid)]
    for n in swept:
        tr = cfg["datasets"][n]["train"]
        factors = sweep_runs(cfg)
        out.append(Job("lr_sweep", {"dataset": n}, gpus, tuple(
            Trained(a, factors, tr["width"], tr["rows"]) for a in grid.sweep_archs(n))))  # fmt: skip
    out += width_lr_sweep_jobs(cfg, grid, swept, gpus)
    for g in grid.groups.values():
        out.append(Job("train", _str(g.wildcards()), gpus, tuple(
            Trained(a, len(g.seeds), g.width, g.rows) for a in g.archs)))  # fmt: skip
    out += [Job("measure", _str(g.wildcards()), gpus) for g in grid.groups.values()]
    out += [Job("split_pairs", p.wildcards(), gpus) for p in split_pairs(grid)]
    out += [Job("chance", {"dataset": n}) for n in names]
    out += [
        Job("fidelity", _str(dict(dataset=r.dataset, group=r.group, arch=r.arch, seed=r.seed)),
            gpus)
        for r in fidelity_runs(cfg, grid)
    ]  # fmt: skip
    out += [Job("browser", _str(w), gpus) for w in browser_pairs(cfg, grid)]
    out += [Job(rule) for rule in (*REPORT_RULES, *FIGURE_RULES.values(), "all")]
    return out


# ----------------------------------------------------------------------------- config


def _retype(value):
    """A --config string such as "5", "0.1", "true" or "null" -> its YAML value."""
    import yaml

    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip() else value
        return parsed if isinstance(parsed, (bool, int, float, type(None))) else value
    if isinstance(value, list):
        return [_retype(v) for v in value]
    if isinstance(value, dict):
        return {k: _retype(v) for k, v in value.items()}
    return value


def typed_overrides(cfg: dict, overrides: Mapping) -> None:
    """Snakemake parses the values of --config (e.g. seeds=[0,1] or datasets={...}) with
    YAML's BaseLoader, which makes every nested scalar a string; re-read those, and only
    those (in ``cfg``, in place), so that command-line overrides mean what they say."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            typed_overrides(cfg[key], value)
        elif key in cfg and cfg[key] == value:
            cfg[key] = _retype(value)



def merge(base: dict, update: Mapping) -> dict:
    """``update`` merged into ``base`` key by key, as Snakemake merges config files."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(paths: Sequence[str | Path], schema: str | Path) -> dict:
    """The config of the files (merged in order, as `snakemake --configfile A B`),
    validated against the schema with its defaults filled in, as the workflow sees it.
    Raises jsonschema.ValidationError on an invalid config."""
    import jsonschema
    import yaml
    from jsonschema import validators

    cfg: dict = {}
    for path in paths:
        cfg = merge(cfg, yaml.safe_load(Path(path).read_text()) or {})
    spec = yaml.safe_load(Path(schema).read_text())
    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        for name, sub in properties.items():
            if "default" in sub and isinstance(instance, dict):
                instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from check_properties(validator, properties, instance, schema)

    validators.extend(base, {"properties": set_defaults})(spec).validate(cfg)
    return cfg
