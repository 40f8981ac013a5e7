"""Validation of the config, the grid of runs, input functions and path helpers.

A *run* is one trained checkpoint: (dataset, arch, k, width, seed). Three grids make the
set of runs, and a run may belong to several:

* main     every dataset x ``archs`` x ``seeds`` at the dataset's main k and width
           (T1, T2, F1);
* sweep    every dataset x ``sweep.archs`` x ``ks`` x ``widths`` x ``sweep.seeds``
           (F2, F3, F5, F6);
* ablation ``ablation.datasets`` x (topk, isae, ``ablation.variants``) x ``ablation.seeds``
           at the main k and width (F4).

Seed pairs (for ``isae match``) are the unordered pairs of seeds trained for one
(dataset, arch, k, width); a pair belongs to a grid when both of its runs do.
"""

import itertools

import yaml
from collections import defaultdict
from typing import NamedTuple

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from isae.models.config import parse_arch
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
    arch=r"[a-z][a-z0-9+\-]*",
    k=r"\d+",
    width=r"\d+",
    seed=r"\d+",
    seed_a=r"\d+",
    seed_b=r"\d+",


#: The software of all jobs (the `conda` directive): the project's one environment, the
#: same that the README's setup installs. Relative to the .smk files.
ENV = "../../environment.yml"

DATASETS = config["datasets"]
GRIDS = ("main", "sweep", "ablation")
# topk and isae are the two ends every ablation variant is compared with.
ABLATION_BASES = ("topk", "isae")


class Run(NamedTuple):
    dataset: str
    arch: str
    k: int
    width: int
    seed: int

    @property
    def group(self) -> tuple:
        """Runs that differ only in the seed."""
        return (self.dataset, self.arch, self.k, self.width)

    def wildcards(self) -> dict:
        return dict(self._asdict())


def _check_config() -> None:
    """Checks that the schema cannot express; each names the offending key."""
    archs = set(config["archs"]) | set(config["sweep"]["archs"])
    archs |= {a for ds in DATASETS.values() for a in ds["archs"] or []}
    archs |= set(config["ablation"]["variants"])
    for arch in sorted(archs):
        try:
            parse_arch(arch)
        except UserError as e:
            raise WorkflowError(f"config: {e}")
    for name in config["ablation"]["datasets"]:
        if name not in DATASETS:
            raise WorkflowError(
                f"config: ablation.datasets names {name!r}, which is not in datasets "
                f"({', '.join(DATASETS)})"
            )
    for name, ds in DATASETS.items():
        for w in [ds["width"], *ds["widths"]]:
            for k in {ds["k"], *ds["ks"]}:
                if k >= w:
                    raise WorkflowError(
                        f"config: datasets.{name}: k={k} must be smaller than width={w}"
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
        for arch, seed in itertools.product(
            ds["archs"] or config["archs"], config["seeds"]
        ):
            runs[Run(name, arch, ds["k"], ds["width"], seed)].add("main")
        sweep = config["sweep"]
        for arch, k, width, seed in itertools.product(
            sweep["archs"], ds["ks"], ds["widths"] or [ds["width"]], sweep["seeds"]
        ):
            runs[Run(name, arch, k, width, seed)].add("sweep")
    abl = config["ablation"]
    for name in abl["datasets"]:
        ds = DATASETS[name]
        archs = list(ABLATION_BASES) + [
            v for v in abl["variants"] if v not in ABLATION_BASES
        ]
        for arch, seed in itertools.product(archs, abl["seeds"]):
            runs[Run(name, arch, ds["k"], ds["width"], seed)].add("ablation")
    return dict(sorted(runs.items()))


#: Run -> set of grid names.
RUNS = _build_runs()


def _build_pairs() -> dict:
    by_group = defaultdict(list)
    for run in RUNS:
        by_group[run.group].append(run)
    pairs = {}
    for group_runs in by_group.values():
        for a, b in itertools.combinations(sorted(group_runs, key=lambda r: r.seed), 2):
            pairs[(a, b)] = RUNS[a] & RUNS[b]
    return pairs


#: (Run a, Run b) with a.seed < b.seed -> set of grids both belong to.
PAIRS = _build_pairs()


# ----------------------------------------------------------------------------- helpers


def dataset_cfg(wildcards) -> dict:
    return DATASETS[wildcards.dataset]


def res(stage: str, key: str):
    """A resource of a class of jobs (config `resources`), e.g. res("train", "mem_mb")."""
    return config["resources"][stage][key]


def gpu_count() -> int:
    """GPUs per device job: the `gpu` resource of the SLURM executor plugin (--gpus)."""
    return 1 if config["device"] == "cuda" else 0


def cli_flags(options: dict) -> str:
    """{"max_tokens": 5, "noise": 0.1, "coherence": None} -> "--max-tokens 5 --noise 0.1"."""
    parts = []
    for key, value in options.items():
        if value is None or value is False:
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


def train_flags(wildcards) -> str:
    ds = dataset_cfg(wildcards)
    return cli_flags(
        {
            "tokens": ds["tokens"],
            "batch_size": ds["batch_size"],
            "lr": ds["lr"],
            "device": config["device"],
        }
    )


def match_flags(wildcards) -> str:
    return cli_flags(
        {"max_rows": config["match"]["max_rows"], "device": config["device"]}
    )


def ric_flags(wildcards) -> str:
    return cli_flags({"pairs": config["ric"]["pairs"], "device": config["device"]})


def fidelity_flags(wildcards) -> str:
    return cli_flags(
        {
            "max_tokens": config["fidelity"]["max_tokens"],
            "batch_size": config["fidelity"]["batch_size"],
            "device": config["device"],
        }
    )


def run_keys(runs) -> list:
    """Identity columns (and grid flags) of each run, in the order of its input files."""
    return [dict(r.wildcards(), **{g: g in RUNS[r] for g in GRIDS}) for r in runs]


def pair_keys(pairs) -> list:
    keys = []
    for a, b in pairs:
        row = dict(a.wildcards())
        del row["seed"]
        row.update(
            seed_a=a.seed, seed_b=b.seed, **{g: g in PAIRS[(a, b)] for g in GRIDS}
        )
        keys.append(row)
    return keys


def pair_wildcards(a, b) -> dict:
    w = a.wildcards()
    del w["seed"]
    return dict(w, seed_a=a.seed, seed_b=b.seed)


def has_truth(dataset: str) -> bool:
    return DATASETS[dataset]["source"] == "synthetic"


#: Seed pairs of the main grid: their per-latent matched |cos| make F1.
MAIN_PAIRS = [p for p, grids in PAIRS.items() if "main" in grids]
#: Every run is evaluated; on a synthetic set every run is also matched to the truth (F4
#: uses the ablation's). Restricted isometry (F3, T2) and fidelity (F6) read the main grid
#: and the sweep only, so ablation-only runs skip them.
TRUTH_RUNS = [r for r in RUNS if has_truth(r.dataset)]
RIC_RUNS = [r for r, grids in RUNS.items() if grids & {"main", "sweep"}]
FIDELITY_RUNS = [r for r in RIC_RUNS if DATASETS[r.dataset]["fidelity"]]


# ----------------------------------------------------------------------------- inputs


def ckpt_of(seed_key: str):
    """Input function: the checkpoint of seed wildcard `seed_key` of a pair."""

    def inner(wildcards):
        w = {key: wildcards[key] for key in ("dataset", "arch", "k", "width")}
        w["seed"] = wildcards[seed_key]
        return rules.train.output.ckpt.format(**w)

    return inner


def eval_tables(wildcards) -> list:
    return [rules.eval.output.table.format(**r.wildcards()) for r in RUNS]


def match_summaries(wildcards) -> list:
    return [
        rules.match_pair.output.summary.format(**pair_wildcards(a, b)) for a, b in PAIRS
    ]


def main_match_tables(wildcards) -> list:
    return [
        rules.match_pair.output.table.format(**pair_wildcards(a, b))
        for a, b in MAIN_PAIRS
    ]


def truth_summaries(wildcards) -> list:
    return [
        rules.match_truth.output.summary.format(**r.wildcards()) for r in TRUTH_RUNS
    ]


def ric_summaries(wildcards) -> list:
    return [rules.ric.output.summary.format(**r.wildcards()) for r in RIC_RUNS]


def fidelity_tables(wildcards) -> list:
    return [rules.fidelity.output.table.format(**r.wildcards()) for r in FIDELITY_RUNS]


def true_k() -> dict:
    """Synthetic dataset -> the k its codes were generated with (F2 marks it)."""
    return {
        n: ds["extract"]["k"]
        for n, ds in DATASETS.items()
        if ds["source"] == "synthetic"
    }


def run_artifacts(wildcards) -> list:
    """Every per-run artifact (activation sets, checkpoints, per-run and per-pair tables).

    They are targets of `rule all` next to the tables and figures, so that deleting one, a
    checkpoint say, makes the next plain `snakemake` rebuild it and then everything that
    depends on it (and nothing else); without this, Snakemake treats a missing intermediate
    file under up-to-date results as nothing to do."""
    out = [rules.activations.output.acts.format(dataset=name) for name in DATASETS]
    out += [rules.train.output.ckpt.format(**r.wildcards()) for r in RUNS]
    out += (
        eval_tables(wildcards) + ric_summaries(wildcards) + fidelity_tables(wildcards)
    )
    out += match_summaries(wildcards) + truth_summaries(wildcards)
    return out
