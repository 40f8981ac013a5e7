"""The study's grid: which SAEs a config trains, and in which training groups.

A *run* is one trained checkpoint: (dataset, arch, k, width, rows, seed), plus the training
group it is trained in (``role``) and the activation set it reads (``data``). Each *grid*
is a function ``(config, dataset name, runs planned so far) -> runs`` registered in
``GRIDS``; a run may belong to several grids, and the grids are applied in the table's
order, so that a later grid can reuse what an earlier one trains:

* main      every dataset x ``archs`` x ``seeds`` at the dataset's main k, width and rows
            (T1, T2, F1);
* sweep     every dataset x ``sweep.archs`` x ``train.ks`` x ``train.widths`` x
            ``sweep.seeds`` at the main rows (F2, F3, F5, F6);
* budget    every dataset x ``budgets.archs`` x ``budgets.seeds`` at the main k and width and
            at every rows of ``train.budgets`` and the main rows, and at each width of the
            width axis with ``budgets`` of its own, at those and that width's rows (F7);
* ablation  ``ablation.datasets`` x (topk, isae, ``ablation.variants``) x ``ablation.seeds``
            at the main k, width and rows (F4);
* iter      ``iter.datasets`` x (each base, base+iterN for N in ``iter.steps``) x
            ``iter.seeds`` at the main k, width and rows (F8);
* width_axis ``width_study.datasets`` x ``width_study.archs`` x ``width_study.seeds`` at the
             main k, at the main width and every width of the dataset's
             ``width_axis.widths``, each at its own rows (``width_axis.per_width``; F9, T3).
             (Not ``width``: a grid's name is a flag column beside the width column.)
* null      ``references.datasets`` x ``references.archs`` x ``references.seeds`` at the
            main k, width and rows, on a Gaussian set with the data's mean and covariance
            (``data="null"``): the trained null of T1 and F1;
* split     the same on each of two halves of the data by document (``data="half0"``,
            ``"half1"``): split-data reproducibility (``split_pairs``).

Runs are trained and measured in *groups*: the runs of one dataset at one (k, width, rows)
share one training job (one pass over the data) and one measuring job. A run whose
``role`` is not ``main`` (the ablation's and the iteration study's variants) is trained in
a group of its own, so that the main grid's jobs do not wait for it; a run whose ``data``
names another activation set than the dataset's own is too, since a group reads one set.
Every run of a dataset sees the same order of training rows (``data_seed``), so its
checkpoint does not depend on its group.

Everything here is a pure function of the config dict (after the schema has filled in its
defaults); the workflow (``workflow/rules/common.smk``) and the compute plan
(``isae.study.plan``) read the same grid.

Adding a grid: write a function ``(cfg, name, planned) -> list[Run]`` and register it in
``GRIDS`` after the grids whose runs it reuses. Its name becomes a flag column of the
collected tables (so it may not be a run's column: ``width`` is refused), and its runs are
trained and measured by the existing rules, in the groups their shapes give. The width
axis (``width_grid``) returns main-shape runs at other widths (its run at the main width is
the main grid's, reused). A reference trained on a derived activation
set (a Gaussian set with the data's covariance, one half of a split by document) returns
runs with ``role`` and ``data`` set, e.g. ``Run(..., role="null", data="null")``: they
train in a group of their own (``k16-w768-r120000-null``), and the workflow maps
``Group.data`` to that set's folder (a rule that makes the set, an input function that
picks it).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from isae.errors import UserError
from isae.models.config import PRESETS, TrainConfig, parse_arch, thresholding_steps

#: topk and isae are the two ends every ablation variant is compared with.
ABLATION_BASES = ("topk", "isae")


class Run(NamedTuple):
    """One trained checkpoint of the study."""

    dataset: str
    """The dataset's name (a key of the config's ``datasets``)."""
    arch: str
    """Architecture name: a preset with optional switches."""
    k: int
    """Active latents per row."""
    width: int
    """Latents (dictionary size)."""
    rows: int
    """Training rows (tokens, for a language model)."""
    seed: int
    """The SAE's initialisation seed."""
    role: str = "main"
    """The training group the run belongs to: ``main`` (shared by every grid that trains
    this shape on the dataset's own set), or a grid's own group (``ablation``, ``iter``)."""
    data: str = ""
    """The activation set it is trained on: "" is the dataset's own; any other name is a
    set derived from it (a variant), which puts the run in a group of its own."""

    @property
    def group(self) -> str:
        """The training group's name (a path component): k<k>-w<width>-r<rows>, then the
        role unless it is main, then the data variant unless it is the role's name."""
        parts = [p for p in (self.role, self.data) if p and p != "main"]
        return f"k{self.k}-w{self.width}-r{self.rows}" + "".join(
            f"-{p}" for p in dict.fromkeys(parts)
        )

    def key(self) -> dict:
        """The run's identity in the collected tables."""
        return {
            "dataset": self.dataset,
            "arch": self.arch,
            "k": self.k,
            "width": self.width,
            "rows": self.rows,
            "seed": self.seed,
        }


class Group(NamedTuple):
    """One training job (and one measuring job): every arch with every seed."""

    dataset: str
    name: str
    """Run.group of its runs."""
    k: int
    width: int
    rows: int
    archs: tuple
    """In the study's arch order (arch_order)."""
    seeds: tuple
    """Ascending."""
    data: str = ""
    """The activation set (Run.data) of its runs."""

    def wildcards(self) -> dict:
        return {"dataset": self.dataset, "group": self.name}


def arch_order(arch: str) -> tuple:
    """Sort key of archs within a group: the presets in their table's order, then every
    other name alphabetically."""
    presets = list(PRESETS)
    return (presets.index(arch) if arch in presets else len(presets), arch)


def iter_arch(base: str, steps: int) -> str:
    """The name of ``base`` with ``steps`` thresholding steps, a variant of the base that
    inherits its rate: base+iter for 3 (isae+iter, not the isae-iter preset, which its own
    lr sweep tunes), base+iterN otherwise."""
    return f"{base}+iter" if steps == 3 else f"{base}+iter{steps}"


def main_archs(cfg: dict, name: str) -> list[str]:
    """The main grid's archs of a dataset: its own list, else the config's."""
    return cfg["datasets"][name]["archs"] or cfg["archs"]


def _main_shape(cfg: dict, name: str) -> dict:
    tr = cfg["datasets"][name]["train"]
    return dict(dataset=name, k=tr["k"], width=tr["width"], rows=tr["rows"])


# ----------------------------------------------------------------------------- the grids

#: A grid: (config, dataset name, runs planned so far by earlier grids) -> its runs, in the
#: order they are first planned.
GridFn = Callable[[dict, str, Mapping[Run, frozenset]], list[Run]]


def main_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """archs x seeds at the main k, width and rows (T1, T2, F1)."""
    main = _main_shape(cfg, name)
    return [
        Run(arch=arch, seed=seed, **main)
        for arch, seed in itertools.product(main_archs(cfg, name), cfg["seeds"])
    ]


def sweep_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """sweep.archs x train.ks x train.widths x sweep.seeds at the main rows (F2, F3, F5,
    F6)."""
    tr = cfg["datasets"][name]["train"]
    sweep = cfg["sweep"]
    return [
        Run(name, arch, k, width, tr["rows"], seed)
        for arch, k, width, seed in itertools.product(
            sweep["archs"], tr["ks"], tr["widths"] or [tr["width"]], sweep["seeds"]
        )
    ]


def budget_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """budgets.archs x budgets.seeds at every training budget and the main rows (F7), and at
    every width of the width axis with ``budgets`` of its own (``width_axis.per_width``), at
    those and that width's rows."""
    tr = cfg["datasets"][name]["train"]
    bud = cfg["budgets"]
    axes = {tr["width"]: {tr["rows"], *tr["budgets"]}}
    for width in axis_widths(cfg, name):
        if extra := _per_width(cfg, name, width).get("budgets"):
            axes.setdefault(width, {width_rows(cfg, name, width)}).update(extra)
    return [
        Run(name, arch, tr["k"], width, rows, seed)
        for width, rows_set in sorted(axes.items())
        for arch, rows, seed in itertools.product(bud["archs"], sorted(rows_set), bud["seeds"])
    ]


def ablation_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """topk, isae and each switch variant x ablation.seeds at the main shape (F4)."""
    abl = cfg["ablation"]
    if name not in abl["datasets"]:
        return []
    main = _main_shape(cfg, name)
    out = [
        Run(arch=arch, seed=seed, **main)
        for arch, seed in itertools.product(ABLATION_BASES, abl["seeds"])
    ]
    # isae-iter against topk is the other whole combination F4 shows, where the main grid
    # trains it.
    out += [
        run
        for run in (Run(arch="isae-iter", seed=s, **main) for s in abl["seeds"])
        if run in planned
    ]
    out += [
        Run(arch=arch, seed=seed, role="ablation", **main)
        for arch, seed in itertools.product(abl["variants"], abl["seeds"])
        if arch not in ABLATION_BASES
    ]
    return out


def iter_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """Each base with N thresholding steps x iter.seeds at the main shape (F8)."""
    it = cfg["iter"]
    if name not in it["datasets"]:
        return []
    main = _main_shape(cfg, name)
    out: list[Run] = []
    for base, seed in itertools.product(it["bases"], it["seeds"]):
        out.append(Run(arch=base, seed=seed, **main))
        for n in it["steps"]:
            key = dict(main, arch=iter_arch(base, n), seed=seed)
            # A run the main grid or the ablation already trains is reused.
            known = [r for r in itertools.chain(planned, out) if r.key() == key]
            out.append(known[0] if known else Run(role="iter", **key))
    # Other bases with steps that other grids train anyway (the ablation's topk and
    # topk+iter) join F8 at no cost.
    shape = (name, main["k"], main["width"], main["rows"])
    out += [
        run
        for run in planned
        if (run.dataset, run.k, run.width, run.rows) == shape
        and run.seed in it["seeds"]
        and thresholding_steps(run.arch)
    ]
    return out


# ----------------------------------------------------------------------------- the width axis


def axis_widths(cfg: dict, name: str) -> list[int]:
    """The widths of a dataset's width axis, ascending: its main width and every width of
    ``width_axis.widths``; empty when ``width_study.datasets`` does not name the dataset."""
    if name not in cfg["width_study"]["datasets"]:
        return []
    ds = cfg["datasets"][name]
    return sorted({ds["train"]["width"], *ds["width_axis"]["widths"]})


def _per_width(cfg: dict, name: str, width: int) -> dict:
    """The dataset's ``width_axis.per_width`` entry of ``width`` ({} when it has none)."""
    entries = cfg["datasets"][name]["width_axis"]["per_width"]
    return next((e for e in entries if e["width"] == width), {})


def width_rows(cfg: dict, name: str, width: int) -> int:
    """Training rows of the width axis's runs at ``width``: the width's own ``rows``, else
    the main rows."""
    return _per_width(cfg, name, width).get("rows") or cfg["datasets"][name]["train"]["rows"]


def train_extra(cfg: dict, name: str, width: int) -> dict:
    """The ``isae train`` options (TrainConfig fields, passed as flags) of every SAE of a
    dataset at ``width``, its lr sweep's included: the train block's ``options``, updated by
    the width's own ``width_axis.per_width`` options."""
    return {**cfg["datasets"][name]["train"]["options"],
            **(_per_width(cfg, name, width).get("options") or {})}  # fmt: skip


def width_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """width_study.archs x width_study.seeds at the main k, at every width of the axis and
    that width's rows (F9, T3). A run another grid trains with the same settings on the
    dataset's own set (the main grid's at the main width, the ablation's isae-tied) is
    reused, not trained again."""
    ws = cfg["width_study"]
    k = cfg["datasets"][name]["train"]["k"]
    out = []
    for arch, width, seed in itertools.product(ws["archs"], axis_widths(cfg, name), ws["seeds"]):
        key = dict(dataset=name, arch=arch, k=k, width=width,
                   rows=width_rows(cfg, name, width), seed=seed)  # fmt: skip
        known = [r for r in planned if r.key() == key and not r.data]
        out.append(min(known, key=lambda r: r.role != "main") if known else Run(**key))
    return out


# ----------------------------------------------------------------------------- the references


#: The activation sets (Run.data) of the split grid's two halves.
SPLIT_HALVES = ("half0", "half1")
#: Reference grid -> the key of the config's ``references`` block that turns it on.
REFERENCE_SWITCHES = {"null": "trained_null", "split": "split_data"}


def reference_archs(cfg: dict, name: str) -> list[str]:
    """The archs a dataset's trained references are trained for: ``references.archs``
    (null = all) among the dataset's main archs, in the main grid's order (a reference is
    read beside its arch's row of T1)."""
    want = cfg["references"]["archs"]
    return [a for a in main_archs(cfg, name) if want is None or a in want]


def _reference_runs(cfg: dict, name: str, kind: str, data: tuple[str, ...]) -> list[Run]:
    ref = cfg["references"]
    if name not in ref["datasets"] or not ref[REFERENCE_SWITCHES[kind]]:
        return []
    main = _main_shape(cfg, name)
    return [
        Run(arch=arch, seed=seed, role=kind, data=d, **main)
        for d, arch, seed in itertools.product(data, reference_archs(cfg, name), ref["seeds"])
    ]


def null_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """The trained null: the main shape's recipe on a Gaussian set with the data's mean and
    covariance (``isae extract gaussian --like``), references.archs x references.seeds."""
    return _reference_runs(cfg, name, "null", ("null",))


def split_grid(cfg: dict, name: str, planned: Mapping[Run, frozenset]) -> list[Run]:
    """Split-data reproducibility: the main shape's recipe on each half of the data by
    document (``isae split --half 0|1``), references.archs x references.seeds per half."""
    return _reference_runs(cfg, name, "split", SPLIT_HALVES)


#: Every grid, in the order they are planned (a grid may reuse the runs of those above it).
#: The names are the grid flags of the collected tables (isae.study.tables).
GRIDS: dict[str, GridFn] = {
    "main": main_grid,
    "sweep": sweep_grid,
    "budget": budget_grid,
    "ablation": ablation_grid,
    "iter": iter_grid,
    "width_axis": width_grid,
    "null": null_grid,
    "split": split_grid,
}


def build_runs(cfg: dict, grids: Mapping[str, GridFn] = GRIDS) -> dict[Run, frozenset]:
    """Run -> the names of the grids it belongs to, sorted by run."""
    runs: dict[Run, set] = {}
    for name in cfg["datasets"]:
        for grid, fn in grids.items():
            planned = {r: frozenset(g) for r, g in runs.items()}
            for run in fn(cfg, name, planned):
                runs.setdefault(run, set()).add(grid)
    return {r: frozenset(g) for r, g in sorted(runs.items())}


def build_groups(runs: Iterable[Run]) -> dict[tuple[str, str], Group]:
    """(dataset, group name) -> Group: archs x seeds of the runs in it (every arch is
    trained with every seed of its group), sorted by (dataset, group name)."""
    members: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        members.setdefault((run.dataset, run.group), []).append(run)
    out = {}
    for (dataset, name), rs in sorted(members.items()):
        r = rs[0]
        archs = tuple(dict.fromkeys(sorted((x.arch for x in rs), key=arch_order)))
        seeds = tuple(sorted({x.seed for x in rs}))
        out[(dataset, name)] = Group(
            dataset, name, r.k, r.width, r.rows, archs, seeds, r.data
        )
    return out


@dataclass(frozen=True)
class Grid:
    """The runs of a config and the groups that train them."""

    runs: dict[Run, frozenset]
    """Run -> its grids (GRIDS names), sorted by run."""
    groups: dict[tuple[str, str], Group]
    """(dataset, group name) -> Group, sorted."""
    names: tuple[str, ...]
    """The grid names, in GRIDS order (the flag columns)."""

    @classmethod
    def of(cls, cfg: dict, grids: Mapping[str, GridFn] = GRIDS) -> Grid:
        # A grid's name is a flag column beside the runs' identity columns.
        clash = set(grids) & {*Run._fields, "group"}
        if clash:
            raise ValueError(f"grid name(s) {', '.join(sorted(clash))} clash with a run's columns")
        runs = build_runs(cfg, grids)
        return cls(runs, build_groups(runs), tuple(grids))

    def runs_of(self, group: Group) -> list[Run]:
        """The runs any grid asked for in a group (a group may train more: archs x seeds)."""
        return [
            r for r in self.runs if r.dataset == group.dataset and r.group == group.name
        ]

    def flags(self) -> list[dict]:
        """One row per trained run: its identity, its group and a boolean per grid (the
        collect rules' ``flags``)."""
        rows = [
            dict(run.key(), group=run.group, **{g: g in grids for g in self.names})
            for run, grids in self.runs.items()
        ]
        # Every run of a group is trained (archs x seeds), also those no grid asked for.
        asked = {(r.group, *r.key().values()) for r in self.runs}
        for g in self.groups.values():
            for arch, seed in itertools.product(g.archs, g.seeds):
                key = dict(
                    dataset=g.dataset,
                    arch=arch,
                    k=g.k,
                    width=g.width,
                    rows=g.rows,
                    seed=seed,
                )
                if (g.name, *key.values()) not in asked:
                    rows.append(dict(key, group=g.name, **{x: False for x in self.names}))
        return rows

    def sweep_archs(self, name: str) -> list[str]:
        """Every arch of a dataset with a learning rate of its own, in arch order (dl has
        none; variants take their preset's)."""
        archs = {parse_arch(r.arch).preset for r in self.runs if r.dataset == name}
        return [
            a
            for a in sorted(archs, key=arch_order)
            if parse_arch(a).fields["kind"] != "dl"
        ]

    def main_seeds(self) -> dict[tuple[str, str], set]:
        """(dataset, arch) -> the seeds of the main grid."""
        seeds: dict[tuple[str, str], set] = {}
        for run, grids in self.runs.items():
            if "main" in grids:
                seeds.setdefault((run.dataset, run.arch), set()).add(run.seed)
        return seeds


# ----------------------------------------------------------------------------- derived


def has_lr_sweep(cfg: dict, grid: Grid, name: str) -> bool:
    """Whether a dataset's learning rates come from a sweep (lr_sweep.factors not empty
    and some arch with a rate of its own)."""
    return bool(cfg["lr_sweep"]["factors"]) and bool(grid.sweep_archs(name))


def lr_sweep_widths(cfg: dict, grid: Grid, name: str) -> list[int]:
    """The widths at which a dataset's learning rates are swept: the main width, then the
    width axis's ``lr_sweep_width`` (``largest``: the axis's largest width; null: none)
    where it differs. Empty without a sweep (has_lr_sweep)."""
    if not has_lr_sweep(cfg, grid, name):
        return []
    main = cfg["datasets"][name]["train"]["width"]
    at = cfg["datasets"][name]["width_axis"]["lr_sweep_width"]
    widths = axis_widths(cfg, name)
    if at == "largest":
        at = max(widths) if widths else None
    return [main] + ([at] if at is not None and at != main and widths else [])


def lr_width_of(cfg: dict, grid: Grid, name: str, width: int) -> int | None:
    """The swept width whose choice an SAE of ``width`` trains at: the nearest in
    log(width), the smaller of two as near; None without a sweep. ``isae train --lr-from``
    carries that choice to ``width`` as the default rate scales, × √(swept / width): the
    factor over the default chosen at the swept width holds at every width."""
    swept = lr_sweep_widths(cfg, grid, name)
    if not swept:
        return None
    return min(swept, key=lambda w: (round(abs(math.log(width / w)), 9), w))


def lr_source(cfg: dict, grid: Grid, group: Group) -> tuple[int | None, bool]:
    """Where a group's learning rates come from: the swept width whose choice it trains at
    (lr_width_of; None without a sweep, ``isae train --lr-from`` that width's choice), and
    whether it reuses that sweep's run at the chosen rate as its own (``--reuse``). Only a
    group at the swept width on the dataset's own set reuses: at another width no sweep run
    has its shape, and a reference group (Group.data: the trained null's Gaussian set, a
    split half) trains on another set than the sweep's, so it takes the rate alone."""
    w = lr_width_of(cfg, grid, group.dataset, group.width)
    return w, w is not None and w == group.width and not group.data


def width_lr_sweeps(cfg: dict, grid: Grid) -> list[dict]:
    """Wildcards (dataset, width) of the width axis's second lr sweeps (lr_sweep_width)."""
    return [
        {"dataset": n, "width": w} for n in cfg["datasets"] for w in lr_sweep_widths(cfg, grid, n)[1:]
    ]


def width_sweep_archs(cfg: dict, grid: Grid, name: str, width: int) -> list[str]:
    """The archs of a dataset's lr sweep at ``width``: the presets of every run whose rate
    comes from that sweep (lr_width_of), in arch order; dl has no rate."""
    archs = {parse_arch(r.arch).preset for r in grid.runs
             if r.dataset == name and lr_width_of(cfg, grid, name, r.width) == width}
    return [a for a in sorted(archs, key=arch_order) if parse_arch(a).fields["kind"] != "dl"]


def base_lr(cfg: dict, name: str, width: int) -> float | None:
    """The rate an lr sweep's factors multiply at ``width``, and the rate of every run of a
    dataset without a sweep: None = isae train's default, 8e-4 / √(width / 16384), which
    scales with the width by itself; a set ``train.lr`` is the rate at the main width,
    scaled by √(main width / width) at the others, as the default is."""
    tr = cfg["datasets"][name]["train"]
    if tr["lr"] is None or width == tr["width"]:
        return tr["lr"]
    return tr["lr"] * math.sqrt(tr["width"] / width)


def dataset_widths(cfg: dict, grid: Grid, name: str) -> list[int]:
    """Every width a dataset's SAEs are trained at (the main width, the k sweep's, the
    width axis's), ascending: its chance levels are drawn at each."""
    return sorted({cfg["datasets"][name]["train"]["width"],
                   *(r.width for r in grid.runs if r.dataset == name)})  # fmt: skip


def measures_isometry(grid: Grid, group: Group) -> bool:
    """Restricted isometry is measured in groups with a run of the main grid, the sweep or
    the width axis (T2, F3, F9, T3); elsewhere it is skipped."""
    return any(grid.runs[r] & {"main", "sweep", "width_axis"} for r in grid.runs_of(group))


def browser_pairs(cfg: dict, grid: Grid) -> list[dict]:
    """Wildcards of the feature-browser pages: per language-model dataset and architecture of
    the main grid, its two lowest seeds."""
    out = []
    for (dataset, arch), seeds in sorted(grid.main_seeds().items()):
        if cfg["datasets"][dataset]["source"] == "lm" and len(seeds) >= 2:
            run = next(r for r in grid.runs if "main" in grid.runs[r] and r.dataset == dataset)
            a, b = sorted(seeds)[:2]
            out.append(dict(dataset=dataset, group=run.group, arch=arch, seed_a=a, seed_b=b))
    return out


def fidelity_runs(cfg: dict, grid: Grid) -> list[Run]:
    """Downstream fidelity (F6) reads the k sweep's and the main grid's runs of the datasets
    that ask for it: the sweep's seed at every k, and every seed of the main grid at the
    main k (its spread)."""
    return [
        r
        for r, grids in grid.runs.items()
        if grids & {"sweep", "main"} and cfg["datasets"][r.dataset]["fidelity"]
    ]


def derived_sets(grid: Grid) -> list[tuple[str, str]]:
    """(dataset, Run.data) of every derived activation set a group trains on (the trained
    null's Gaussian set, the split's halves), sorted."""
    return sorted({(g.dataset, g.data) for g in grid.groups.values() if g.data})


class SplitPair(NamedTuple):
    """One split-data comparison: the two halves' groups of one dataset at one shape."""

    dataset: str
    shape: str
    """k<k>-w<width>-r<rows>."""
    halves: tuple[Group, Group]
    """The groups trained on half0 and half1."""

    def wildcards(self) -> dict:
        return {"dataset": self.dataset, "shape": self.shape}

    def key(self) -> dict:
        """Its identity in the collected tables."""
        g = self.halves[0]
        return {"dataset": self.dataset, "k": g.k, "width": g.width, "rows": g.rows}

    def runs(self) -> list[tuple[str, int]]:
        """(arch, seed) trained on both halves, in the first half's order: each is matched
        with itself on the other half."""
        a, b = self.halves
        return [(x, s) for x in a.archs for s in a.seeds if x in b.archs and s in b.seeds]


def split_pairs(grid: Grid) -> list[SplitPair]:
    """Every (dataset, shape) with a group on each half of the split grid."""
    by_shape: dict[tuple, dict] = {}
    for g in grid.groups.values():
        if g.data in SPLIT_HALVES:
            by_shape.setdefault((g.dataset, g.k, g.width, g.rows), {})[g.data] = g
    return [
        SplitPair(d, f"k{k}-w{w}-r{r}", tuple(h[x] for x in SPLIT_HALVES))
        for (d, k, w, r), h in sorted(by_shape.items())
        if len(h) == len(SPLIT_HALVES)
    ]


def true_k(cfg: dict) -> dict[str, int]:
    """Synthetic dataset -> the k its codes were generated with (F2 marks it)."""
    return {
        n: ds["extract"]["k"]
        for n, ds in cfg["datasets"].items()
        if ds["source"] == "synthetic"
    }


# ----------------------------------------------------------------------------- checks

#: TrainConfig fields that no ``options`` block may set: the workflow sets them from keys of
#: its own (rows, batch_size, the lr sweep, device, data_seed), or they are no flag.
RESERVED_OPTIONS = ("tokens", "batch_size", "lr", "device", "seed", "extra")


def option_fields() -> list[str]:
    """The TrainConfig fields a dataset's or a width's ``options`` may set (each an ``isae
    train`` and ``isae lr-sweep`` flag)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESERVED_OPTIONS]


def check_options(options: Mapping, key: str) -> None:
    """UserError naming ``key`` when an options block names a field that is no option, or
    a value TrainConfig refuses."""
    allowed = option_fields()
    for name in options:
        if name not in allowed:
            raise UserError(f"{key}: {name!r} is not an isae train option (one of "
                            f"{', '.join(allowed)})")
    try:
        TrainConfig(**options)
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{key}: {e}") from None


def check_width_axis(cfg: dict, name: str) -> None:
    """The width axis of one dataset: named widths above k, a per-width entry or an lr
    sweep only at a width of the axis, valid options."""
    ds = cfg["datasets"][name]
    ax = ds["width_axis"]
    key = f"datasets.{name}.width_axis"
    widths = {ds["train"]["width"], *ax["widths"]}
    if name in cfg["width_study"]["datasets"] and len(widths) < 2:
        raise UserError(f"{key}.widths: width_study.datasets names {name!r}, whose axis has "
                        f"no width besides the main one ({ds['train']['width']})")
    at = ax["lr_sweep_width"]
    if isinstance(at, int) and at not in widths:
        raise UserError(f"{key}.lr_sweep_width: {at} is not a width of the axis "
                        f"({', '.join(map(str, sorted(widths)))})")
    for w in sorted(widths):
        if ds["train"]["k"] >= w:
            raise UserError(f"{key}.widths: k={ds['train']['k']} must be smaller than "
                            f"width={w}")
    seen = set()
    for i, entry in enumerate(ax["per_width"]):
        w = entry["width"]
        if w not in widths or w in seen:
            why = "named twice" if w in seen else "not a width of the axis"
            raise UserError(f"{key}.per_width[{i}]: width {w} is {why}")
        seen.add(w)
        check_options(entry.get("options") or {}, f"{key}.per_width[{i}].options")


def check_config(cfg: dict) -> None:
    """The checks the schema cannot express; each raises UserError naming the key."""
    datasets = cfg["datasets"]
    archs = set(cfg["archs"]) | set(cfg["sweep"]["archs"]) | set(cfg["width_study"]["archs"])
    archs |= set(cfg["budgets"]["archs"])
    archs |= {a for ds in datasets.values() for a in ds["archs"] or []}
    archs |= set(cfg["ablation"]["variants"]) | set(cfg["iter"]["bases"])
    archs |= set(cfg["references"]["archs"] or [])
    for arch in sorted(archs):
        parse_arch(arch)
    for block in ("ablation", "iter", "width_study", "references"):
        for name in cfg[block]["datasets"]:
            if name not in datasets:
                raise UserError(
                    f"{block}.datasets names {name!r}, which is not in datasets "
                    f"({', '.join(datasets)})"
                )
    for base in cfg["iter"]["bases"]:
        if parse_arch(base).fields["encoder_steps"]:
            raise UserError(f"iter.bases: {base!r} already has thresholding steps")
    for name, ds in datasets.items():
        tr = ds["train"]
        for w in [tr["width"], *tr["widths"]]:
            for k in {tr["k"], *tr["ks"]}:
                if k >= w:
                    raise UserError(
                        f"datasets.{name}.train: k={k} must be smaller than width={w}"
                    )
        check_options(tr["options"], f"datasets.{name}.train.options")
        check_width_axis(cfg, name)
        if ds["source"] == "synthetic":
            ex = ds["extract"]
            if ex["k"] >= ex["atoms"]:
                raise UserError(
                    f"datasets.{name}.extract: k={ex['k']} must be smaller than "
                    f"atoms={ex['atoms']} (each row draws k distinct atoms)"
                )
        refs = cfg["references"]
        if refs["split_data"] and name in refs["datasets"] and ds["source"] == "vision":
            raise UserError(
                f"references.split_data on {name!r}: isae split keeps documents whole, not "
                "images, so the halves of a vision set would share images"
            )
        if ds["fidelity"] and ds["source"] != "lm":
            raise UserError(
                f"datasets.{name}.fidelity is for language models (source lm) only"
            )
