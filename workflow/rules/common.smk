"""Validation of the config, the grid of runs, input functions and path helpers.

A *run* is one trained checkpoint: (dataset, arch, k, width, rows, seed). Five grids make
the set of runs, and a run may belong to several:

* main      every dataset x ``archs`` x ``seeds`` at the dataset's main k, width and rows
            (T1, T2, F1);
* sweep     every dataset x ``sweep.archs`` x ``train.ks`` x ``train.widths`` x
            ``sweep.seeds`` at the main rows (F2, F3, F5, F6);
* budget    every dataset x ``budgets.archs`` x ``budgets.seeds`` at the main k and width and
            at every rows of ``train.budgets`` and the main rows (F7);
* ablation  ``ablation.datasets`` x (topk, isae, ``ablation.variants``) x ``ablation.seeds``
            at the main k, width and rows (F4);
* iter      ``iter.datasets`` x (each base, base+iterN for N in ``iter.steps``) x
            ``iter.seeds`` at the main k, width and rows (F8).

Runs are trained and measured in *groups*: the runs of one dataset at one (k, width, rows)
share one training job (one pass over the data) and one measuring job. The ablation's and
the iteration study's variants form groups of their own (role ``ablation`` / ``iter``), so
that the main grid's jobs do not wait for them. Every run of a dataset sees the same order
of training rows (``data_seed``), so its checkpoint does not depend on its group.
"""

import itertools
import os

import yaml
from collections import defaultdict
from typing import NamedTuple

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from isae.models.config import parse_arch, thresholding_steps
from isae.errors import UserError


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


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    group=r"k\d+-w\d+-r\d+(-[a-z]+)?",
    arch=r"[a-z][a-z0-9+\-]*",
    seed=r"\d+",
    seed_a=r"\d+",
    seed_b=r"\d+",


#: The software of all jobs (the `conda` directive): the project's one environment, the
#: same that the README's setup installs. Relative to the .smk files.
ENV = "../../environment.yml"

DATASETS = config["datasets"]
GRIDS = ("main", "sweep", "budget", "ablation", "iter")
# topk and isae are the two ends every ablation variant is compared with.
ABLATION_BASES = ("topk", "isae")


class Run(NamedTuple):
    dataset: str
    arch: str
    k: int
    width: int
    rows: int
    seed: int
    role: str
    """main | ablation | iter: which training group the run belongs to."""

    @property
    def group(self) -> str:
        """The training group's name (a path component)."""
        suffix = "" if self.role == "main" else f"-{self.role}"
        return f"k{self.k}-w{self.width}-r{self.rows}{suffix}"

    def key(self) -> dict:
        return {
            "dataset": self.dataset,
            "arch": self.arch,
            "k": self.k,
            "width": self.width,
            "rows": self.rows,
            "seed": self.seed,
        }


def iter_arch(base: str, steps: int) -> str:
    """The name of ``base`` with ``steps`` thresholding steps: isae + 3 is the preset
    isae-iter, topk + 3 is topk+iter, otherwise base+iterN."""
    if steps == 3:
        return "isae-iter" if base == "isae" else f"{base}+iter"
    return f"{base}+iter{steps}"


def _check_config() -> None:
    """Checks that the schema cannot express; each names the offending key."""
    archs = set(config["archs"]) | set(config["sweep"]["archs"])
    archs |= set(config["budgets"]["archs"])
    archs |= {a for ds in DATASETS.values() for a in ds["archs"] or []}
    archs |= set(config["ablation"]["variants"]) | set(config["iter"]["bases"])
    for arch in sorted(archs):
        try:
            parse_arch(arch)
        except UserError as e:
            raise WorkflowError(f"config: {e}")
    for block in ("ablation", "iter"):
        for name in config[block]["datasets"]:
            if name not in DATASETS:
                raise WorkflowError(
                    f"config: {block}.datasets names {name!r}, which is not in datasets "
                    f"({', '.join(DATASETS)})"
                )
    for base in config["iter"]["bases"]:
        if parse_arch(base).fields["encoder_steps"]:
            raise WorkflowError(
                f"config: iter.bases: {base!r} already has thresholding steps"
            )
    for name, ds in DATASETS.items():
        tr = ds["train"]
        for w in [tr["width"], *tr["widths"]]:
            for k in {tr["k"], *tr["ks"]}:
                if k >= w:
                    raise WorkflowError(
                        f"config: datasets.{name}.train: k={k} must be smaller than width={w}"
                    )
        if ds["source"] == "synthetic":
            ex = ds["extract"]
            if ex["k"] >= ex["atoms"]:
                raise WorkflowError(
                    f"config: datasets.{name}.extract: k={ex['k']} must be smaller than "
                    f"atoms={ex['atoms']} (each row draws k distinct atoms)"
                )
        if ds["fidelity"] and ds["source"] != "lm":
            raise WorkflowError(
                f"config: datasets.{name}.fidelity is for language models (source lm) only"
            )


_check_config()


def _build_runs() -> dict:
    runs = defaultdict(set)
    for name, ds in DATASETS.items():
        tr = ds["train"]
        main = dict(dataset=name, k=tr["k"], width=tr["width"], rows=tr["rows"])
        for arch, seed in itertools.product(
            ds["archs"] or config["archs"], config["seeds"]
        ):
            runs[Run(arch=arch, seed=seed, role="main", **main)].add("main")
        sweep = config["sweep"]
        for arch, k, width, seed in itertools.product(
            sweep["archs"], tr["ks"], tr["widths"] or [tr["width"]], sweep["seeds"]
        ):
            run = Run(name, arch, k, width, tr["rows"], seed, "main")
            runs[run].add("sweep")
        bud = config["budgets"]
        for arch, rows, seed in itertools.product(
            bud["archs"], sorted({tr["rows"], *tr["budgets"]}), bud["seeds"]
        ):
            runs[Run(name, arch, tr["k"], tr["width"], rows, seed, "main")].add(
                "budget"
            )
        if name in config["ablation"]["datasets"]:
            abl = config["ablation"]
            for arch, seed in itertools.product(ABLATION_BASES, abl["seeds"]):
                runs[Run(arch=arch, seed=seed, role="main", **main)].add("ablation")
            # isae-iter against topk is the other whole combination F4 shows, where the
            # main grid trains it.
            for seed in abl["seeds"]:
                run = Run(arch="isae-iter", seed=seed, role="main", **main)
                if run in runs:
                    runs[run].add("ablation")
            for arch, seed in itertools.product(abl["variants"], abl["seeds"]):
                if arch not in ABLATION_BASES:
                    runs[Run(arch=arch, seed=seed, role="ablation", **main)].add(
                        "ablation"
                    )
        if name in config["iter"]["datasets"]:
            it = config["iter"]
            for base, seed in itertools.product(it["bases"], it["seeds"]):
                runs[Run(arch=base, seed=seed, role="main", **main)].add("iter")
                for n in it["steps"]:
                    arch = iter_arch(base, n)
                    # A run the main grid or the ablation already trains is reused.
                    known = [
                        r for r in runs if r.key() == dict(main, arch=arch, seed=seed)
                    ]
                    run = (
                        known[0]
                        if known
                        else Run(arch=arch, seed=seed, role="iter", **main)
                    )
                    runs[run].add("iter")
            # Other bases with steps that other grids train anyway (the ablation's topk and
            # topk+iter) join F8 at no cost.
            for run in list(runs):
                same = (run.dataset, run.k, run.width, run.rows) == (
                    name,
                    tr["k"],
                    tr["width"],
                    tr["rows"],
                )
                if same and run.seed in it["seeds"] and thresholding_steps(run.arch):
                    runs[run].add("iter")
    return dict(sorted(runs.items()))


#: Run -> set of grid names.
RUNS = _build_runs()


class Group(NamedTuple):
    dataset: str
    name: str
    k: int
    width: int
    rows: int
    archs: tuple
    seeds: tuple

    def wildcards(self) -> dict:
        return {"dataset": self.dataset, "group": self.name}


def _build_groups() -> dict:
    """(dataset, group name) -> Group: archs x seeds of the runs in it (every arch is
    trained with every seed of its group)."""
    members = defaultdict(list)
    for run in RUNS:
        members[(run.dataset, run.group)].append(run)
    out = {}
    for (dataset, name), runs in sorted(members.items()):
        r = runs[0]
        archs = tuple(dict.fromkeys(sorted((x.arch for x in runs), key=_arch_order)))
        seeds = tuple(sorted({x.seed for x in runs}))
        out[(dataset, name)] = Group(dataset, name, r.k, r.width, r.rows, archs, seeds)
    return out


def _arch_order(arch: str) -> tuple:
    presets = ["topk", "relu", "isae", "isae-iter", "dl"]
    return (presets.index(arch) if arch in presets else len(presets), arch)


GROUPS = _build_groups()


def group_of(wildcards) -> Group:
    return GROUPS[(wildcards.dataset, wildcards.group)]


def grid_flags() -> list:
    """One row per run: its identity and the grids it belongs to (for the collect rules)."""
    rows = []
    for run, grids in RUNS.items():
        rows.append(dict(run.key(), group=run.group, **{g: g in grids for g in GRIDS}))
    # Every run of a group is trained (archs x seeds), also those no grid asked for.
    for g in GROUPS.values():
        for arch, seed in itertools.product(g.archs, g.seeds):
            key = dict(
                dataset=g.dataset,
                arch=arch,
                k=g.k,
                width=g.width,
                rows=g.rows,
                seed=seed,
            )
            if not any(r.key() == key and r.group == g.name for r in RUNS):
                rows.append(dict(key, group=g.name, **{x: False for x in GRIDS}))
    return rows


# ----------------------------------------------------------------------------- helpers


def dataset_cfg(wildcards) -> dict:
    return DATASETS[wildcards.dataset]


def res(stage: str, key: str):
    """A resource of a class of jobs (config `resources`), e.g. res("train", "mem_mb")."""
    return config["resources"][stage][key]


def gpu_count() -> int:
    """GPUs per device job: the `gpu` resource of the SLURM executor plugin (--gpus), and
    the slots of the local profile's `gpu` resource."""
    return 1 if config["device"] == "cuda" else 0


def cli_flags(options: dict) -> str:
    """{"max_tokens": 5, "noise": 0.1, "coherence": None} -> "--max-tokens 5 --noise 0.1"."""
    parts = []
    for key, value in options.items():
        if value is None or value is False or value == "":
            continue
        flag = f"--{key.replace('_', '-')}"
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def extract_flags(wildcards) -> str:
    ds = dataset_cfg(wildcards)
    flags = cli_flags(ds["extract"])
    if ds["source"] in ("lm", "vision"):
        flags += f" --device {config['device']}"
    return flags


def sweep_archs(name: str) -> list:
    """Every arch of a dataset with a learning rate of its own (dl has none; variants take
    their preset's)."""
    archs = {parse_arch(r.arch).preset for r in RUNS if r.dataset == name}
    return [
        a
        for a in sorted(archs, key=_arch_order)
        if parse_arch(a).fields["kind"] != "dl"
    ]


def has_lr_sweep(name: str) -> bool:
    return bool(config["lr_sweep"]["factors"]) and bool(sweep_archs(name))


def lr_sweep_flags(wildcards) -> str:
    tr = dataset_cfg(wildcards)["train"]
    return cli_flags(
        {
            "arch": ",".join(sweep_archs(wildcards.dataset)),
            "factors": ",".join(f"{f:g}" for f in config["lr_sweep"]["factors"]),
            "k": tr["k"],
            "width": tr["width"],
            "seed": config["lr_sweep"]["seed"],
            "data_seed": config["data_seed"],
            "tokens": tr["rows"],
            "batch_size": tr["batch_size"],
            "lr": tr["lr"],
            "device": config["device"],
        }
    )


def train_flags(wildcards) -> str:
    g = group_of(wildcards)
    tr = dataset_cfg(wildcards)["train"]
    flags = {
        "arch": ",".join(g.archs),
        "seeds": ",".join(map(str, g.seeds)),
        "data_seed": config["data_seed"],
        "k": g.k,
        "width": g.width,
        "tokens": g.rows,
        "batch_size": tr["batch_size"],
        "device": config["device"],
    }
    if not has_lr_sweep(wildcards.dataset):
        flags["lr"] = tr["lr"]
    return cli_flags(flags)


def lr_runs(wildcards) -> list:
    """The lr sweep's checkpoints of the group's dataset, which the main group reuses."""
    if not has_lr_sweep(wildcards.dataset):
        return []
    return [rules.lr_sweep.output.ckpts.format(dataset=wildcards.dataset)]


def lr_choice(wildcards) -> list:
    """The lr sweep's choice file of the group's dataset (none without a sweep)."""
    if not has_lr_sweep(wildcards.dataset):
        return []
    return [rules.lr_sweep.output.choice.format(dataset=wildcards.dataset)]


def main_archs(name: str) -> list:
    return DATASETS[name]["archs"] or config["archs"]


def measure_flags(wildcards) -> str:
    g = group_of(wildcards)
    runs = [r for r in RUNS if r.dataset == g.dataset and r.group == g.name]
    ric = any(RUNS[r] & {"main", "sweep"} for r in runs)
    return cli_flags(
        {
            "max_rows": config["match"]["max_rows"],
            "ric_pairs": config["ric"]["pairs"] if ric else 0,
            "cross_archs": ",".join(a for a in main_archs(g.dataset) if a in g.archs),
            "converged_below": config["convergence"]["threshold"],
            "device": config["device"],
        }
    )


def fidelity_flags(wildcards) -> str:
    return cli_flags(
        {
            "max_tokens": config["fidelity"]["max_tokens"],
            "batch_size": config["fidelity"]["batch_size"],
            "device": config["device"],
        }
    )


def browser_pairs() -> list:
    """Wildcards of the feature-browser pages: per language-model dataset and architecture of
    the main grid, its two lowest seeds."""
    out = []
    for (dataset, arch), seeds in sorted(_main_seeds().items()):
        if DATASETS[dataset]["source"] == "lm" and len(seeds) >= 2:
            run = next(r for r in RUNS if "main" in RUNS[r] and r.dataset == dataset)
            a, b = sorted(seeds)[:2]
            out.append(
                dict(dataset=dataset, group=run.group, arch=arch, seed_a=a, seed_b=b)
            )
    return out


def _main_seeds() -> dict:
    seeds = defaultdict(set)
    for run, grids in RUNS.items():
        if "main" in grids:
            seeds[(run.dataset, run.arch)].add(run.seed)
    return seeds


def has_truth(dataset: str) -> bool:
    return DATASETS[dataset]["source"] == "synthetic"


#: Downstream fidelity (F6) reads the k sweep's runs of the datasets that ask for it: one
#: seed at every k, the same in every point of the figure.
FIDELITY_RUNS = [
    r
    for r, grids in RUNS.items()
    if "sweep" in grids and DATASETS[r.dataset]["fidelity"]
]


# ----------------------------------------------------------------------------- inputs


def group_ckpts(wildcards):
    return rules.train.output.ckpts.format(**wildcards)


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


def true_k() -> dict:
    """Synthetic dataset -> the k its codes were generated with (F2 marks it)."""
    return {
        n: ds["extract"]["k"]
        for n, ds in DATASETS.items()
        if ds["source"] == "synthetic"
    }


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
    out += [rules.train.output.ckpts.format(**g.wildcards()) for g in GROUPS.values()]
    out += measure_tables("runs")(wildcards) + fidelity_tables(wildcards)
    out += chance_tables(wildcards)
    return out
