"""The study's grid (isae.study.grid) and the jobs it plans (isae.study.plan), as pure
functions of a config dict: runs, groups and flags against hand-enumerated answers, the
reuse between grids, the flags each job is given and their quoting for the shell."""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path

import pytest

from isae.errors import UserError
from isae.models.config import PRESETS, parse_arch
from isae.study import grid as G
from isae.study import plan

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "config" / "schema.yaml"


def tiny(**over) -> dict:
    """A config with the schema's defaults, one synthetic dataset, every grid small."""
    cfg = {
        "device": "cpu", "seeds": [0, 1], "data_seed": 0, "archs": ["topk", "isae"],
        "lr_sweep": {"factors": [1, 4], "seed": 0}, "convergence": {"threshold": 0.03},
        "sweep": {"archs": ["topk"], "seeds": [0]},
        "budgets": {"archs": ["topk"], "seeds": [0]},
        "ablation": {"datasets": [], "variants": ["topk+signed"], "seeds": [0, 1]},
        "iter": {"datasets": [], "bases": ["isae"], "steps": [1, 3], "seeds": [0]},
        "width_study": {"datasets": [], "archs": ["topk", "isae"], "seeds": [0, 1]},
        "references": {"datasets": [], "archs": None, "seeds": [0, 1], "trained_null": True,
                       "split_data": True, "seed": 0},
        "match": {"max_rows": 100}, "ric": {"pairs": 10}, "chance": {"draws": 1},
        "fidelity": {"max_tokens": 64, "batch_size": 4},
        "datasets": {"syn": {
            "source": "synthetic", "archs": None, "fidelity": False,
            "extract": {"d": 8, "atoms": 16, "k": 2, "rows": 100},
            "train": {"k": 2, "width": 16, "rows": 1000, "budgets": [500], "ks": [2, 4],
                      "widths": [], "batch_size": 64, "lr": None, "options": {}},
            "width_axis": {"widths": [], "lr_sweep_width": "largest", "per_width": []}}},
    }  # fmt: skip
    for key, value in over.items():
        cfg[key] = value
    return cfg


def keyset(runs) -> set:
    return {(r.arch, r.k, r.width, r.rows, r.seed, r.role) for r in runs}


# ----------------------------------------------------------------------------- runs


def test_runs_and_grids_by_hand():
    g = G.Grid.of(tiny())
    got = {(r.arch, r.k, r.rows, r.seed, r.role): set(gr) for r, gr in g.runs.items()}
    want = {
        # main: archs x seeds at k 2, rows 1000; the sweep's topk at k 2, seed 0 is one of them
        ("topk", 2, 1000, 0, "main"): {"main", "sweep", "budget"},
        ("topk", 2, 1000, 1, "main"): {"main"},
        ("isae", 2, 1000, 0, "main"): {"main"},
        ("isae", 2, 1000, 1, "main"): {"main"},
        # sweep: topk at k 4
        ("topk", 4, 1000, 0, "main"): {"sweep"},
        # budget: topk at rows 500 (and the main rows, above)
        ("topk", 2, 500, 0, "main"): {"budget"},
    }
    assert got == want
    assert all(r.width == 16 and r.dataset == "syn" and r.data == "" for r in g.runs)
    assert list(g.runs) == sorted(g.runs)


def test_groups_train_archs_times_seeds_and_flag_the_extras():
    g = G.Grid.of(tiny())
    assert [(d, n) for d, n in g.groups] == [
        ("syn", "k2-w16-r1000"), ("syn", "k2-w16-r500"), ("syn", "k4-w16-r1000")]
    main = g.groups[("syn", "k2-w16-r1000")]
    assert main.archs == ("topk", "isae") and main.seeds == (0, 1)
    assert main.wildcards() == {"dataset": "syn", "group": "k2-w16-r1000"}
    flags = g.flags()
    assert len(flags) == 6  # every run asked for; each group trains exactly those
    assert set(flags[0]) == {"dataset", "arch", "k", "width", "rows", "seed", "group",
                             *G.GRIDS}
    # A group with topk at seed 0 and isae at seed 1 trains both archs with both seeds: the
    # two runs no grid asked for are flagged in no grid.
    runs = [G.Run("syn", "topk", 2, 16, 1000, 0), G.Run("syn", "isae", 2, 16, 1000, 1)]
    grid = G.Grid({r: frozenset({"main"}) for r in runs}, G.build_groups(runs), tuple(G.GRIDS))
    extra = [f for f in grid.flags() if not any(f[x] for x in G.GRIDS)]
    assert {(f["arch"], f["seed"]) for f in extra} == {("topk", 1), ("isae", 0)}


def test_arch_order_is_the_preset_table_then_alphabetical():
    names = ["topk+signed", "isae-tied", "dl", "isae-iter", "isae", "relu", "topk"]
    assert sorted(names, key=G.arch_order) == [*PRESETS, "isae-tied", "topk+signed"]


def test_ablation_and_iter_reuse_what_other_grids_train():
    cfg = tiny(archs=["topk", "isae", "isae-iter"])
    cfg["ablation"]["datasets"] = ["syn"]
    cfg["iter"]["datasets"] = ["syn"]
    g = G.Grid.of(cfg)
    at = {(r.arch, r.seed, r.role): set(gr) for r, gr in g.runs.items()
          if (r.k, r.rows) == (2, 1000)}
    # The ablation trains its bases in the main group and its variants in a group of its
    # own; it counts the main grid's isae-iter as the other whole combination.
    assert at[("topk", 1, "main")] == {"main", "ablation"}
    assert at[("isae-iter", 0, "main")] >= {"main", "ablation", "iter"}
    assert at[("topk+signed", 0, "ablation")] == {"ablation"}
    # iter: isae+iter1 and isae+iter (3 steps at isae's rate) are new (their own group);
    # the main grid's isae-iter (3 steps at its own rate) is reused beside them, not trained
    # again; topk (a base with 0 steps, trained anyway) joins F8.
    assert at[("isae+iter1", 0, "iter")] == at[("isae+iter", 0, "iter")] == {"iter"}
    assert ("isae-iter", 0, "iter") not in at
    assert "iter" in at[("topk", 0, "main")] and "iter" not in at[("topk", 1, "main")]
    assert "iter" not in at[("topk+signed", 0, "ablation")]  # a switch, not steps
    names = [n for d, n in g.groups]
    assert {"k2-w16-r1000-ablation", "k2-w16-r1000-iter"} <= set(names)
    # Without isae-iter in the main grid the ablation does not train it either.
    cfg["archs"] = ["topk", "isae"]
    cfg["iter"]["datasets"] = []
    assert not any(r.arch == "isae-iter" for r in G.Grid.of(cfg).runs)


def test_iter_arch_names_are_variants_at_their_base_rate():
    # 3 steps on isae is isae+iter (isae's rate), not the isae-iter preset (its own sweep).
    assert G.iter_arch("isae", 3) == "isae+iter"
    assert G.iter_arch("topk", 3) == "topk+iter"
    assert G.iter_arch("isae", 10) == "isae+iter10"
    for base in ("isae", "topk"):
        for n in (1, 3, 10):
            parsed = parse_arch(G.iter_arch(base, n))
            assert parsed.preset == base and parsed.fields["encoder_steps"] == n


# ----------------------------------------------------------------------------- extending


def test_a_run_on_a_data_variant_trains_in_a_group_of_its_own():
    base = G.Run("syn", "topk", 2, 16, 1000, 0)
    null = base._replace(role="null", data="null")
    half = base._replace(role="split", data="half0")
    assert base.group == "k2-w16-r1000"
    assert null.group == "k2-w16-r1000-null"
    assert half.group == "k2-w16-r1000-split-half0"
    groups = G.build_groups([base, null, half, half._replace(data="half1")])
    assert {n: g.data for (_, n), g in groups.items()} == {
        "k2-w16-r1000": "", "k2-w16-r1000-null": "null", "k2-w16-r1000-split-half0": "half0",
        "k2-w16-r1000-split-half1": "half1"}
    assert base.key() == null.key()  # the same SAE settings; the group tells them apart


def test_a_registered_grid_joins_the_runs_flags_and_jobs():
    """How a new grid is added: a function in the table. An axis at 2 and 4 x the main
    width: its run at the main width is the main grid's, reused."""

    def wide_grid(cfg, name, planned):
        tr = cfg["datasets"][name]["train"]
        return [G.Run(name, a, tr["k"], w, tr["rows"], s)
                for a in ("topk",) for w in (16, 32, 64) for s in cfg["seeds"]]

    grids = dict(G.GRIDS, wide=wide_grid)
    cfg = tiny()
    g = G.Grid.of(cfg, grids)
    assert g.names[-1] == "wide"
    at = {(r.width, r.seed): set(gr) for r, gr in g.runs.items() if r.arch == "topk"
          and (r.k, r.rows) == (2, 1000)}
    assert at[(16, 1)] == {"main", "wide"} and at[(64, 0)] == {"wide"}
    assert all("wide" in f and isinstance(f["width"], int) for f in g.flags())
    # A grid named after a run's column would overwrite it in the flags: refused.
    with pytest.raises(ValueError, match="width clash"):
        G.Grid.of(cfg, dict(G.GRIDS, width=wide_grid))
    trained = {j.wildcards["group"] for j in plan.jobs(cfg, g) if j.rule == "train"}
    assert {"k2-w32-r1000", "k2-w64-r1000"} <= trained


def test_references_train_in_groups_of_their_own_on_derived_sets():
    cfg = tiny(archs=["topk", "isae", "dl"])
    cfg["references"].update(datasets=["syn"], archs=["topk", "dl", "relu"], seeds=[0, 1])
    g = G.Grid.of(cfg)
    refs = {(r.arch, r.seed, r.role, r.data): set(gr) for r, gr in g.runs.items()
            if r.role != "main"}
    # references.archs among the main archs (relu is not one), in the main grid's order,
    # x seeds, once on the Gaussian set and once on each half, at the main shape.
    want = {(a, s, role, data): {role} for a in ("topk", "dl") for s in (0, 1)
            for role, data in (("null", "null"), ("split", "half0"), ("split", "half1"))}
    assert refs == want
    assert all((r.k, r.width, r.rows) == (2, 16, 1000) for r in g.runs if r.role != "main")
    groups = {n: (grp.data, grp.archs, grp.seeds) for (_, n), grp in g.groups.items()}
    assert groups["k2-w16-r1000-null"] == ("null", ("topk", "dl"), (0, 1))
    assert groups["k2-w16-r1000-split-half0"] == ("half0", ("topk", "dl"), (0, 1))
    assert groups["k2-w16-r1000-split-half1"] == ("half1", ("topk", "dl"), (0, 1))
    assert G.derived_sets(g) == [("syn", "half0"), ("syn", "half1"), ("syn", "null")]
    (pair,) = G.split_pairs(g)
    assert pair.wildcards() == {"dataset": "syn", "shape": "k2-w16-r1000"}
    assert pair.key() == {"dataset": "syn", "k": 2, "width": 16, "rows": 1000}
    assert [h.name for h in pair.halves] == ["k2-w16-r1000-split-half0", "k2-w16-r1000-split-half1"]
    assert pair.runs() == [("topk", 0), ("topk", 1), ("dl", 0), ("dl", 1)]
    # The main grid's runs are untouched; a reference is read beside its main row.
    main = {(r.arch, r.seed) for r, gr in g.runs.items() if "main" in gr}
    assert main == {(a, s) for a in ("topk", "isae", "dl") for s in (0, 1)}
    # Each switch alone; null archs = every main arch.
    cfg["references"].update(archs=None, split_data=False)
    g = G.Grid.of(cfg)
    assert {r.arch for r in g.runs if r.role == "null"} == {"topk", "isae", "dl"}
    assert not G.split_pairs(g) and G.derived_sets(g) == [("syn", "null")]
    cfg["references"].update(trained_null=False, split_data=True)
    assert G.derived_sets(G.Grid.of(cfg)) == [("syn", "half0"), ("syn", "half1")]
    cfg["references"]["datasets"] = []
    assert all(r.role == "main" for r in G.Grid.of(cfg).runs)


def test_reference_jobs_and_flags():
    cfg = tiny()
    cfg["references"]["datasets"] = ["syn"]
    g = G.Grid.of(cfg)
    jobs = plan.jobs(cfg, g)
    rules = [j.rule for j in jobs]
    assert rules.count("null_activations") == 1 and rules.count("split_activations") == 2
    assert {tuple(sorted(j.wildcards.items())) for j in jobs if j.rule == "split_activations"} \
        == {(("dataset", "syn"), ("half", "0")), (("dataset", "syn"), ("half", "1"))}
    (sp,) = [j for j in jobs if j.rule == "split_pairs"]
    assert sp.wildcards == {"dataset": "syn", "shape": "k2-w16-r1000"}
    train = {j.wildcards["group"]: j.trained for j in jobs if j.rule == "train"}
    assert train["k2-w16-r1000-null"] == (plan.Trained("topk", 2, 16, 1000),
                                          plan.Trained("isae", 2, 16, 1000))
    assert {"k2-w16-r1000-split-half0", "k2-w16-r1000-split-half1"} <= set(train)
    measured = {j.wildcards["group"] for j in jobs if j.rule == "measure"}
    assert set(train) == measured
    # The same recipe as the main group: its flags (and the lr sweep's rate, --lr-from).
    null = g.groups[("syn", "k2-w16-r1000-null")]
    main = g.groups[("syn", "k2-w16-r1000")]
    assert plan.train_options(cfg, g, null) == plan.train_options(cfg, g, main)
    # No restricted isometry on a reference group.
    assert plan.measure_options(cfg, g, null)["ric_pairs"] == 0
    assert plan.cli_flags(plan.null_set_options(cfg)) == "--seed 0"
    assert plan.derived_set_job("syn", "half1") == ("split_activations", {"dataset": "syn", "half": "1"})
    flags = {(f["group"], f["arch"], f["seed"]): f for f in g.flags()}
    f = flags[("k2-w16-r1000-null", "topk", 1)]
    assert f["null"] and not f["main"] and not f["split"]
    assert flags[("k2-w16-r1000-split-half1", "isae", 0)]["split"]
    cfg["device"] = "cuda"
    gpus = {j.rule: j.gpus for j in plan.jobs(cfg)}
    assert gpus["split_pairs"] == 1 and gpus["null_activations"] == gpus["split_activations"] == 0


def test_fidelity_reads_the_sweep_and_every_main_seed():
    cfg = tiny(seeds=[0, 1, 2])
    cfg["datasets"]["syn"]["fidelity"] = True  # the grid function does not check the source
    g = G.Grid.of(cfg)
    runs = {(r.arch, r.k, r.rows, r.seed) for r in G.fidelity_runs(cfg, g)}
    assert runs == {("topk", 2, 1000, s) for s in (0, 1, 2)} | {("isae", 2, 1000, s) for s in (0, 1, 2)} \
        | {("topk", 4, 1000, 0)}
    cfg["datasets"]["syn"]["fidelity"] = False
    assert G.fidelity_runs(cfg, G.Grid.of(cfg)) == []


# ----------------------------------------------------------------------------- derived


def test_sweep_archs_skip_dl_and_take_presets_of_variants():
    cfg = tiny(archs=["dl", "topk+signed", "isae"])
    g = G.Grid.of(cfg)
    assert g.sweep_archs("syn") == ["topk", "isae"]
    assert G.has_lr_sweep(cfg, g, "syn")
    cfg["lr_sweep"]["factors"] = []
    assert not G.has_lr_sweep(cfg, G.Grid.of(cfg), "syn")


def test_check_config_names_the_key():
    for change, msg in [
        (lambda c: c["ablation"].update(datasets=["nosuch"]), "ablation.datasets names 'nosuch'"),
        (lambda c: c.update(archs=["topk+bogus"]), "unknown switch 'bogus'"),
        (lambda c: c["iter"].update(bases=["isae-iter"]), "iter.bases: 'isae-iter' already"),
        (lambda c: c["datasets"]["syn"]["train"].update(ks=[16]), "k=16 must be smaller than width=16"),
        (lambda c: c["datasets"]["syn"]["extract"].update(k=16), "k=16 must be smaller than atoms=16"),
        (lambda c: c["datasets"]["syn"].update(fidelity=True), "language models (source lm) only"),
        (lambda c: c["references"].update(datasets=["nosuch"]), "references.datasets names 'nosuch'"),
        (lambda c: c["references"].update(archs=["isae+bogus"]), "unknown switch 'bogus'"),
        (lambda c: (c["references"].update(datasets=["syn"]),
                    c["datasets"]["syn"].update(source="vision")), "would share images"),
    ]:  # fmt: skip
        cfg = tiny()
        change(cfg)
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            G.check_config(cfg)
    G.check_config(tiny())


# ----------------------------------------------------------------------------- plan


def test_jobs_by_hand():
    cfg = tiny()
    jobs = plan.jobs(cfg)
    count = {}
    for j in jobs:
        count[j.rule] = count.get(j.rule, 0) + 1
    assert count == {"activations": 1, "lr_sweep": 1, "train": 3, "measure": 3, "chance": 1,
                     **{r: 1 for r in plan.REPORT_RULES}, **{r: 1 for r in plan.FIGURE_RULES.values()},
                     "all": 1}  # fmt: skip
    train = {j.wildcards["group"]: j.trained for j in jobs if j.rule == "train"}
    assert train["k2-w16-r1000"] == (plan.Trained("topk", 2, 16, 1000), plan.Trained("isae", 2, 16, 1000))
    sweep = next(j for j in jobs if j.rule == "lr_sweep")
    assert sweep.trained == (plan.Trained("topk", 2, 16, 1000), plan.Trained("isae", 2, 16, 1000))
    assert all(j.gpus == 0 for j in jobs)
    cfg["device"] = "cuda"
    gpus = {j.rule: j.gpus for j in plan.jobs(cfg)}
    assert gpus["train"] == gpus["measure"] == gpus["lr_sweep"] == 1
    assert gpus["activations"] == gpus["chance"] == 0  # synthetic sets need no GPU


def test_job_flags():
    cfg = tiny()
    g = G.Grid.of(cfg)
    main = g.groups[("syn", "k2-w16-r1000")]
    assert plan.cli_flags(plan.train_options(cfg, g, main)) == (
        "--arch topk,isae --seeds 0,1 --data-seed 0 --k 2 --width 16 --tokens 1000"
        " --batch-size 64 --device cpu")
    # Restricted isometry only where the main grid or the sweep has a run.
    assert plan.measure_options(cfg, g, main)["ric_pairs"] == 10
    assert plan.measure_options(cfg, g, g.groups[("syn", "k2-w16-r500")])["ric_pairs"] == 0
    assert plan.cli_flags(plan.lr_sweep_options(cfg, g, "syn")) == (
        "--arch topk,isae --factors 1,4 --k 2 --width 16 --seed 0 --data-seed 0"
        " --tokens 1000 --batch-size 64 --device cpu")
    # A pair seed: the sweep trains every factor twice, for the stability beside each choice.
    cfg["lr_sweep"]["pair_seed"] = 1
    assert "--seed 0 --pair-seed 1 --data-seed 0" in plan.cli_flags(plan.lr_sweep_options(cfg, g, "syn"))
    sweep = next(j for j in plan.jobs(cfg) if j.rule == "lr_sweep")
    assert sweep.trained == (plan.Trained("topk", 4, 16, 1000), plan.Trained("isae", 4, 16, 1000))
    cfg["lr_sweep"]["factors"] = []
    cfg["datasets"]["syn"]["train"]["lr"] = 0.001
    g = G.Grid.of(cfg)
    assert plan.train_options(cfg, g, g.groups[("syn", "k2-w16-r1000")])["lr"] == 0.001


def test_cli_flags_quote_every_value(tmp_path):
    marker = tmp_path / "pwned"
    hostile = {
        "hook": f"$(touch {marker})blocks.3.hook_resid_post",
        "text": f"{tmp_path}/it's my corpus; touch {marker}",
        "model": "`touch x`", "batch_size": 32, "noise": 0.05, "flag": True, "off": False,
        "coherence": None,
    }
    line = plan.cli_flags(hostile)
    assert shlex.split(line) == [
        "--hook", hostile["hook"], "--text", hostile["text"], "--model", "`touch x`",
        "--batch-size", "32", "--noise", "0.05", "--flag"]
    # Through a real shell, as Snakemake runs it: the values arrive whole, nothing runs.
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == shlex.split(line)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_load_config_merges_files_and_fills_defaults(tmp_path):
    over = tmp_path / "over.yaml"
    over.write_text("seeds: [4]\ndatasets: {minilm: {train: {rows: 10}}}\n")
    base = plan.load_config([ROOT / "config" / "config.yaml"], SCHEMA)
    cfg = plan.load_config([ROOT / "config" / "config.yaml", over], SCHEMA)
    assert cfg["seeds"] == [4] and cfg["datasets"]["minilm"]["train"]["rows"] == 10
    assert cfg["datasets"]["minilm"]["train"]["k"] == base["datasets"]["minilm"]["train"]["k"]
    assert cfg["datasets"]["minilm"]["extract"]["heldout_fraction"] == 0.1  # a schema default
    unchanged = copy.deepcopy(base)
    unchanged["seeds"] = [4]
    unchanged["datasets"]["minilm"]["train"]["rows"] = 10
    assert cfg == unchanged


# ----------------------------------------------------------------------------- the width axis


def width_cfg(**axis) -> dict:
    """tiny() with a width axis on syn at 16 (main), 32 and 64; 64 trains on 2000 rows
    with an option of its own; the ablation trains isae-tied at the main shape."""
    cfg = tiny()
    cfg["width_study"] = {"datasets": ["syn"], "archs": ["topk", "isae-tied"], "seeds": [0, 1]}
    cfg["ablation"] = {"datasets": ["syn"], "variants": ["isae-tied"], "seeds": [0, 1]}
    cfg["datasets"]["syn"]["width_axis"] = {
        "widths": [32, 64], "lr_sweep_width": "largest",
        "per_width": [{"width": 64, "rows": 2000, "options": {"dead_tokens": 100}}], **axis}
    return cfg


def test_width_axis_runs_by_hand_and_reuse():
    g = G.Grid.of(width_cfg())
    axis = {(r.arch, r.width, r.rows, r.seed, r.role): set(gr) for r, gr in g.runs.items()
            if "width_axis" in gr}
    want = {(a, w, rows, s, role)
            for a in ("topk", "isae-tied") for w, rows in ((16, 1000), (32, 1000), (64, 2000))
            for s in (0, 1)
            # isae-tied at the main width is the ablation's run, topk the main grid's.
            for role in (("ablation" if a == "isae-tied" else "main") if w == 16 else "main",)}
    assert set(axis) == want
    assert axis[("topk", 16, 1000, 1, "main")] >= {"main", "width_axis"}
    assert axis[("isae-tied", 16, 1000, 0, "ablation")] == {"ablation", "width_axis"}
    assert axis[("isae-tied", 64, 2000, 1, "main")] == {"width_axis"}
    groups = {n: (gr.archs, gr.seeds) for (_, n), gr in g.groups.items()}
    assert groups["k2-w32-r1000"] == groups["k2-w64-r2000"] == (("topk", "isae-tied"), (0, 1))
    # The main group does not train isae-tied: the ablation's group does.
    assert groups["k2-w16-r1000"] == (("topk", "isae"), (0, 1))
    # Restricted isometry is measured at every width of the axis (F9's δ panels, T3).
    assert plan.measure_options(width_cfg(), g, g.groups[("syn", "k2-w64-r2000")])["ric_pairs"] == 10
    assert G.dataset_widths(width_cfg(), g, "syn") == [16, 32, 64]
    # Off: no run at another width, and the axis's keys change nothing.
    off = width_cfg()
    off["width_study"]["datasets"] = []
    assert {r.width for r in G.Grid.of(off).runs} == {16}


def test_a_width_of_the_axis_may_carry_a_budget_axis_of_its_own():
    cfg = width_cfg()
    cfg["datasets"]["syn"]["width_axis"]["per_width"][0]["budgets"] = [500, 4000]
    g = G.Grid.of(cfg)
    budget = {(r.arch, r.width, r.rows, r.seed) for r, gr in g.runs.items() if "budget" in gr}
    # The main width's axis (main rows and train.budgets), then 64's: its own 2000 rows
    # (the width axis's runs, reused) and its budgets, for budgets.archs x budgets.seeds.
    assert budget == {("topk", 16, 500, 0), ("topk", 16, 1000, 0),
                      ("topk", 64, 500, 0), ("topk", 64, 2000, 0), ("topk", 64, 4000, 0)}
    assert {"width_axis", "budget"} <= g.runs[G.Run("syn", "topk", 2, 64, 2000, 0)]
    # Each budget at 64 trains in its own group, with 64's options.
    at = plan.train_options(cfg, g, g.groups[("syn", "k2-w64-r4000")])
    assert at["tokens"] == 4000 and at["dead_tokens"] == 100 and at["arch"] == "topk"
    # Without the width study the width's budgets plan nothing.
    cfg["width_study"]["datasets"] = []
    assert {r.width for r in G.Grid.of(cfg).runs} == {16}


def test_rates_per_width_come_from_the_nearest_sweep():
    cfg = width_cfg()
    g = G.Grid.of(cfg)
    assert G.lr_sweep_widths(cfg, g, "syn") == [16, 64]
    # 32 is as near to 16 as to 64 in log scale: the smaller; 40 is nearer to 64.
    assert [G.lr_width_of(cfg, g, "syn", w) for w in (16, 32, 40, 64, 128)] == [16, 16, 64, 64, 64]
    # The second sweep trains the presets of the runs whose rate comes from it: isae-tied
    # takes isae's rate.
    assert G.width_sweep_archs(cfg, g, "syn", 64) == ["topk", "isae"]
    for at, want in ((None, [16]), (32, [16, 32]), (16, [16])):
        c = width_cfg(lr_sweep_width=at)
        assert G.lr_sweep_widths(c, G.Grid.of(c), "syn") == want
    c = width_cfg()
    c["lr_sweep"]["factors"] = []
    assert G.lr_sweep_widths(c, G.Grid.of(c), "syn") == [] and G.lr_width_of(c, g, "syn", 32) is None


def test_width_axis_jobs_and_flags():
    cfg = width_cfg()
    g = G.Grid.of(cfg)
    jobs = plan.jobs(cfg, g)
    second = [j for j in jobs if j.rule == "lr_sweep_width"]
    assert [(j.wildcards, j.trained) for j in second] == [
        ({"dataset": "syn", "width": "64"},
         (plan.Trained("topk", 2, 64, 2000), plan.Trained("isae", 2, 64, 2000)))]
    assert {"table_t3", "f9_width"} <= {j.rule for j in jobs}
    assert plan.cli_flags(plan.width_lr_sweep_options(cfg, g, "syn", 64)) == (
        "--arch topk,isae --factors 1,4 --k 2 --width 64 --seed 0 --data-seed 0"
        " --tokens 2000 --batch-size 64 --device cpu --dead-tokens 100")
    # The width's options reach every SAE at that width, not the others.
    at64 = plan.train_options(cfg, g, g.groups[("syn", "k2-w64-r2000")])
    assert at64["dead_tokens"] == 100 and at64["tokens"] == 2000 and "lr" not in at64
    assert "dead_tokens" not in plan.train_options(cfg, g, g.groups[("syn", "k2-w32-r1000")])
    # The train block's options reach every SAE and every sweep of the set.
    cfg["datasets"]["syn"]["train"]["options"] = {"auxk_alpha": 0.5, "dead_tokens": 7}
    assert plan.train_options(cfg, g, g.groups[("syn", "k2-w32-r1000")])["auxk_alpha"] == 0.5
    assert plan.lr_sweep_options(cfg, g, "syn")["dead_tokens"] == 7
    assert plan.width_lr_sweep_options(cfg, g, "syn", 64)["dead_tokens"] == 100
    # A set train.lr is the rate at the main width, carried to the others as the default
    # scales: the second sweep's factors multiply lr x sqrt(16 / 64), as do runs without a sweep.
    cfg["datasets"]["syn"]["train"]["lr"] = 0.01
    assert plan.lr_sweep_options(cfg, g, "syn")["lr"] == 0.01
    assert plan.width_lr_sweep_options(cfg, g, "syn", 64)["lr"] == pytest.approx(0.005)
    cfg["lr_sweep"]["factors"] = []
    g = G.Grid.of(cfg)
    assert plan.train_options(cfg, g, g.groups[("syn", "k2-w16-r1000")])["lr"] == 0.01
    assert plan.train_options(cfg, g, g.groups[("syn", "k2-w64-r2000")])["lr"] == pytest.approx(0.005)
    assert not [j for j in plan.jobs(cfg, g) if j.rule.startswith("lr_sweep")]


def test_width_axis_check_config_names_the_key():
    def axis(**kw):
        return lambda c: c["datasets"]["syn"]["width_axis"].update(kw)

    for change, msg in [
        (lambda c: c["width_study"].update(datasets=["nosuch"]), "width_study.datasets names 'nosuch'"),
        (lambda c: c["width_study"].update(archs=["isae-bogus"]), "unknown switch 'bogus'"),
        (axis(widths=[]), "width_axis.widths: width_study.datasets names 'syn', whose axis"),
        (axis(widths=[2]), "width_axis.widths: k=2 must be smaller than width=2"),
        (axis(lr_sweep_width=48), "lr_sweep_width: 48 is not a width of the axis (16, 32, 64)"),
        (axis(per_width=[{"width": 48}]), r"per_width\[0\]: width 48 is not a width of the axis"),
        (axis(per_width=[{"width": 32}, {"width": 32}]), r"per_width\[1\]: width 32 is named twice"),
        (axis(per_width=[{"width": 32, "options": {"tokens": 5}}]),
         r"per_width\[0\].options: 'tokens' is not an isae train option"),
        (axis(per_width=[{"width": 32, "options": {"dead_tokens": 0}}]),
         r"per_width\[0\].options: --dead-tokens"),
        (lambda c: c["datasets"]["syn"]["train"].update(options={"lr": 1.0}),
         "datasets.syn.train.options: 'lr' is not an isae train option"),
    ]:  # fmt: skip
        cfg = width_cfg()
        change(cfg)
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")
                           if "\\" not in msg else msg):
            G.check_config(cfg)
    G.check_config(width_cfg())


def test_options_are_flags_of_train_and_lr_sweep():
    """Every TrainConfig field a config's options may set reaches isae train and isae
    lr-sweep as a flag (a field added to TrainConfig and to train's flags comes along)."""
    from isae.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("train", "lr-sweep"):
        dests = {a.dest for a in subs.choices[command]._actions}
        assert set(G.option_fields()) <= dests, command
    assert not set(G.option_fields()) & set(G.RESERVED_OPTIONS)


# ----------------------------------------------------------------------------- both together


def test_lr_source_reuses_only_at_a_swept_width_on_the_own_set():
    """A group reads the choice of the nearest swept width; only a group at that width on
    the dataset's own set reuses the sweep's runs (--reuse). The references (on a Gaussian
    set, on a half) and the widths between the sweeps take the rate alone (--lr-from)."""
    cfg = width_cfg()
    cfg["references"]["datasets"] = ["syn"]
    g = G.Grid.of(cfg)
    assert list(G.GRIDS)[-3:] == ["width_axis", "null", "split"]
    got = {n: G.lr_source(cfg, g, grp) for (_, n), grp in g.groups.items()}
    assert got == {
        "k2-w16-r1000": (16, True),
        "k2-w16-r1000-ablation": (16, True),
        "k2-w16-r1000-null": (16, False),
        "k2-w16-r1000-split-half0": (16, False),
        "k2-w16-r1000-split-half1": (16, False),
        "k2-w32-r1000": (16, False),
        "k2-w64-r2000": (64, True),
        "k2-w16-r500": (16, True),  # the budget grid: isae train --reuse checks the rows
        "k4-w16-r1000": (16, True),  # the k sweep: the same
    }
    assert G.width_lr_sweeps(cfg, g) == [{"dataset": "syn", "width": 64}]
    # The width axis reuses no run on a derived set: its main-width runs are the main grid's.
    axis = [r for r, gr in g.runs.items() if "width_axis" in gr]
    assert axis and not any(r.data for r in axis)
    assert not any(gr & {"null", "split"} for r, gr in g.runs.items() if r.width != 16)
    cfg["lr_sweep"]["factors"] = []
    g = G.Grid.of(cfg)
    assert {G.lr_source(cfg, g, grp) for grp in g.groups.values()} == {(None, False)}
    assert G.width_lr_sweeps(cfg, g) == []


def test_typed_overrides_retype_only_the_overridden_strings():
    """Snakemake's --config hands nested values over as strings; those (and only those)
    become the YAML scalars they spell."""
    cfg = {"seeds": ["0", "1"], "lr_sweep": {"factors": ["0.25", "4"], "seed": "0"},
           "match": {"max_rows": "100"}, "datasets": {"syn": {"source": "synthetic"}},
           "references": {"archs": "null", "split_data": "false"}, "device": "cpu"}
    over = copy.deepcopy({k: cfg[k] for k in ("seeds", "lr_sweep", "references", "device")})
    cfg["match"]["max_rows"] = "100"  # not overridden: stays as it is
    plan.typed_overrides(cfg, over)
    assert cfg["seeds"] == [0, 1] and cfg["lr_sweep"] == {"factors": [0.25, 4], "seed": 0}
    assert cfg["references"] == {"archs": None, "split_data": False}
    assert cfg["device"] == "cpu" and cfg["match"]["max_rows"] == "100"
    assert cfg["datasets"] == {"syn": {"source": "synthetic"}}
