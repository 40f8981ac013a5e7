"""One source for every default and name: the training flags come from the config fields,
the schema's defaults agree with them, and architecture names have one reader."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from isae.cli import train
from isae.cli.fields import default_of, field_docs
from isae.cli.main import Parser
from isae.models.config import PRESETS, SWITCHES, SAEConfig, TrainConfig, parse_arch

ROOT = Path(__file__).resolve().parents[1]

#: The defaults of `isae train`: they must not move by accident (every run that relies on
#: them changes). Batch 1024, lr None (now 4 x Gao et al.'s rate), log_every None (~200
#: rows) and converged_below 0.03 were chosen by benchmarks/defaults_sweep.py.
TRAIN_DEFAULTS = {"k": 32, "d_sae": None, "seed": 0, "l1_coeff": 1e-3, "encoder_steps": None,
                  "tokens": 2_000_000, "batch_size": 1024, "lr": None, "decay": "linear",
                  "warmup_frac": 0.02, "auxk_alpha": 1 / 32, "dead_tokens": 200_000,
                  "base_lr": 8e-4, "auxk_norm": "residual", "auxk_detach": "none", "auxk_fit": "none",
                  "auxk_skip": "none",
                  "shuffle_buffer": 65536, "checkpoint_every": 200, "checkpoint_seconds": 60.0,
                  "log_every": None,
                  "converged_below": 0.03, "device": "cpu", "data_on_device": "auto",
                  "data_memory_fraction": 0.5, "seeds": None, "no_resume": False, "force": False,
                  # the flags of several runs on one pass (no config field of their own)
                  "data_seed": None, "lr_from": None, "reuse": None}


def _train_parser() -> argparse.ArgumentParser:
    sub = Parser().add_subparsers()
    train.add_parser(sub)
    return sub.choices["train"]


def test_train_flags_keep_their_defaults_and_take_them_from_the_fields():
    args = _train_parser().parse_args(["--activations", "A", "--arch", "isae", "--out", "O"])
    got = {k: v for k, v in vars(args).items() if k not in ("func", "activations", "arch", "out")}
    assert got == TRAIN_DEFAULTS
    resolved_here = {"d_sae", "encoder_steps"}  # 8 x d, and the arch's steps
    for cls, names in ((SAEConfig, train.SAE_FLAGS), (TrainConfig, train.TRAIN_FLAGS)):
        for name in set(names) - resolved_here:
            assert getattr(args, name) == default_of(cls, name), name


def test_train_help_is_the_fields_docstrings():
    text = " ".join(_train_parser().format_help().split())
    for cls, names in ((SAEConfig, train.SAE_FLAGS), (TrainConfig, train.TRAIN_FLAGS)):
        for name in names:
            assert field_docs(cls)[name] in text, name
    assert "--width WIDTH" in text and "(default: 8 x d)" in text
    assert "(default: the arch's)" in text and "(default: 200000)" in text
    assert text.count("(default:") == len(train.SAE_FLAGS + train.TRAIN_FLAGS) - 1  # lr: None
    assert all(p in text for p in PRESETS) and all(s in text for s in SWITCHES)


def test_train_flags_check_the_fields_choices(capsys):
    with pytest.raises(SystemExit) as e:
        _train_parser().parse_args(["--activations", "A", "--arch", "topk", "--out", "O",
                                    "--decay", "cubic"])
    assert e.value.code == 2 and "invalid choice: 'cubic'" in capsys.readouterr().err


def test_every_config_field_has_a_docstring():
    for cls in (SAEConfig, TrainConfig):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


def test_schema_defaults_agree_with_the_fields():
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    train_block = schema["$defs"]["train"]["properties"]
    assert train_block["batch_size"]["default"] == default_of(TrainConfig, "batch_size")
    assert train_block["lr"]["default"] == default_of(TrainConfig, "lr")
    assert schema["properties"]["device"]["default"] == default_of(TrainConfig, "device")


def test_schema_arch_defaults_are_architectures():
    """The ablation's default variants are each switch added alone to topk and removed alone
    from isae, wherever that changes the preset."""
    props = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())["properties"]
    added = [f"topk+{s}" for s, (f, on, _) in SWITCHES.items() if PRESETS["topk"][f] != on]
    removed = [f"isae-{s}" for s, (f, on, _) in SWITCHES.items() if PRESETS["isae"][f] == on]
    assert props["ablation"]["properties"]["variants"]["default"] == added + removed
    for block in ("sweep", "budgets", "iter"):
        for arch in props[block]["properties"][block == "iter" and "bases" or "archs"]["default"]:
            parse_arch(arch)


def test_paper_yaml_trains_32_x_d_with_the_recipe_measured_on_minilm():
    """config/paper.yaml's SAEs at 32 x d (Pythia and DINOv2, d 768) and 16 x d get the
    dead-latent recipe config/gpu.yaml gives MiniLM (d 384) at those ratios; below 16 x d
    neither config sets one (the defaults: AuxK through the codes, no fit, no skip)."""
    from isae.study import plan
    from isae.study.grid import train_extra

    root = Path(__file__).resolve().parents[1]
    schema = root / "config" / "schema.yaml"
    gpu = plan.load_config([root / "config" / "gpu.yaml"], schema)
    paper = plan.load_config([root / "config" / "paper.yaml"], schema)
    defaults = {f: default_of(TrainConfig, f) for f in ("auxk_detach", "auxk_fit", "auxk_skip")}

    def recipe(opts: dict) -> dict:
        return {**defaults, **{f: v for f, v in opts.items() if f in defaults}}

    for ratio in (4, 8, 16, 32):
        want = recipe(train_extra(gpu, "minilm", 384 * ratio))
        assert recipe(train_extra(paper, "pythia", 768 * ratio)) == want, ratio
        if ratio == 32:
            assert recipe(train_extra(paper, "dinov2", 768 * ratio)) == want
            assert want == {"auxk_detach": "tied", "auxk_fit": "signed", "auxk_skip": "iter"}
        if ratio < 16:
            assert want == defaults
