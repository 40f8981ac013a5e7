"""Several architectures and seeds on one training pass: per-arch learning rates, the data
seed, the initial decoder kept beside the checkpoint, dropped divergent runs, and the
learning-rate sweep that chooses the rates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from libdata import signed_sparse_set
from safetensors.torch import load_file

from isae.cli.main import main
from isae.data.activations import ActivationSet
from isae.data.checkpoints import INIT_FILE, load_decoder
from isae.models.config import SAEConfig, TrainConfig
from isae.models.sparse_coder import SparseCoder
from isae.study import lr_sweep as sweep
from isae.training.trainer import train_many

SHAPE = ["--k", "3", "--width", "48", "--batch-size", "256", "--tokens", "6000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "syn"
    signed_sparse_set(path, d=16, atoms=48, rows=4000)
    return path


def _tensors(path) -> dict:
    return load_file(str(path / "sae.safetensors"))


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_one_pass_with_two_rates_equals_two_single_runs(data, tmp_path, capsys):
    """Models on a shared pass are independent: each ends as it would alone, bit for bit,
    when the data order is the same (--data-seed)."""
    rates = tmp_path / "lr.json"
    rates.write_text(json.dumps({"lr": {"topk": 3e-3, "isae": 1e-2}}))
    out = tmp_path / "many" / "{arch}" / "seed{seed}"
    assert main(["-q", "train", "--activations", str(data), "--arch", "topk,isae,topk+signed",
                 "--seeds", "0,1", "--data-seed", "5", "--lr-from", str(rates), *SHAPE,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    for arch, lr in (("isae", "1e-2"), ("topk+signed", "3e-3")):  # a variant takes its preset's
        single = tmp_path / "single" / arch
        assert main(["-q", "train", "--activations", str(data), "--arch", arch, "--seed", "1",
                     "--data-seed", "5", "--lr", lr, *SHAPE, "--out", str(single)]) == 0
        assert _same(tmp_path / "many" / arch / "seed1", single)
        cfg = json.loads((single / "cfg.json").read_text())
        assert cfg["lr"] == pytest.approx(float(lr))
    # Without --data-seed the order comes from the run's own seed: another result.
    other = tmp_path / "other"
    assert main(["-q", "train", "--activations", str(data), "--arch", "isae", "--seed", "1",
                 "--lr", "1e-2", *SHAPE, "--out", str(other)]) == 0
    assert not _same(tmp_path / "many" / "isae" / "seed1", other)


def test_initial_decoder_is_kept(data, tmp_path, capsys):
    out = tmp_path / "{arch}" / "seed{seed}"
    assert main(["-q", "train", "--activations", str(data), "--arch", "topk,dl", "--seeds", "2",
                 *SHAPE, "--out", str(out)]) == 0
    capsys.readouterr()
    # An SAE starts from its seed's random decoder ...
    W0 = load_file(str(tmp_path / "topk" / "seed2" / INIT_FILE))["W_dec"]
    ref = SparseCoder(SAEConfig.from_arch("topk", d_in=16, d_sae=48, k=3, seed=2)).W_dec
    assert torch.equal(W0, ref.detach())
    assert not torch.equal(W0, load_decoder(tmp_path / "topk" / "seed2"))  # and moved
    # ... dictionary learning from training rows (normalised, unit norm).
    W0 = load_file(str(tmp_path / "dl" / "seed2" / INIT_FILE))["W_dec"].double()
    acts = ActivationSet(data)
    norm = acts.normalizer()
    x = torch.as_tensor((acts.load("train")["x"] - norm.mean) / norm.scale, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    best = (W0 @ x.T).max(dim=1).values  # each initial atom is one of the rows
    np.testing.assert_allclose(best.numpy(), 1.0, atol=1e-5)


def test_several_archs_need_arch_in_out_and_rates_for_each(data, tmp_path, capsys):
    base = ["-q", "train", "--activations", str(data), *SHAPE]
    assert main([*base, "--arch", "topk,isae", "--out", str(tmp_path / "x")]) == 2
    assert "{arch}" in capsys.readouterr().err
    rates = tmp_path / "lr.json"
    rates.write_text(json.dumps({"lr": {"topk": 1e-3}}))
    assert main([*base, "--arch", "isae", "--lr-from", str(rates), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "no learning rate for 'isae'" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--arch", "topk", "--lr", "1e-3", "--lr-from", str(rates),
                 "--out", str(tmp_path / "z")]) == 2
    assert "not both" in capsys.readouterr().err
    rates.write_text("{not json")
    assert main([*base, "--arch", "topk", "--lr-from", str(rates), "--out", str(tmp_path / "w")]) == 2
    assert "--lr-from" in capsys.readouterr().err


def test_a_diverging_model_is_dropped_and_the_others_go_on(data, tmp_path, monkeypatch):
    from isae.training import trainer

    real = trainer.SAEStepper.step

    def step(self, x, lr_scale, dead):
        out = real(self, x, lr_scale, dead)
        if self.model.cfg.seed == 1:
            out["loss"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(trainer.SAEStepper, "step", step)
    cfgs = [SAEConfig.from_arch("topk", d_in=16, d_sae=48, k=3, seed=s) for s in (0, 1)]
    outs = [tmp_path / "s0", tmp_path / "s1"]
    tcfg = TrainConfig(tokens=2048, batch_size=256, log_every=1)
    with pytest.raises(Exception, match="diverged"):
        train_many(data, cfgs, tcfg, outs)
    done = train_many(data, cfgs, tcfg, outs, drop_diverged=True, resume=False)
    assert done[1]["diverged"] and done[1]["out"] is None and not outs[1].exists()
    assert not done[0].get("diverged") and (outs[0] / "sae.safetensors").is_file()


@pytest.mark.slow
def test_a_pass_takes_whatever_stepper_steps_its_runs(data, tmp_path, monkeypatch):
    """The loop steps its runs through one pass stepper (trainer.pass_stepper), which a
    stepper for a whole group of runs may replace. Here one that steps the runs in reverse
    order and resumes from a saved state: every checkpoint is bitwise the one of the usual
    stepper, since the runs of a pass are independent."""
    from isae.training import trainer
    from isae.training.steppers import EachRun

    class Reversed:
        def __init__(self, runs, device):
            self.each = EachRun(runs[::-1], device)
            self.calls = 0

        def step(self, x, lr_scale, deads):
            self.calls += 1
            return self.each.step(x, lr_scale, deads[::-1])[::-1]

    made = []

    def reversed_stepper(runs, device, grouped=None):
        made.append(Reversed(runs, device))
        return made[-1]

    cfgs = [SAEConfig.from_arch(a, d_in=16, d_sae=48, k=3, seed=s)
            for a, s in (("topk", 0), ("relu", 1), ("dl", 2))]
    tcfg = TrainConfig(tokens=3000, batch_size=256, checkpoint_every=5, checkpoint_seconds=0, log_every=2)
    usual = train_many(data, cfgs, tcfg, [tmp_path / f"u{i}" for i in range(3)], resume=False)
    monkeypatch.setattr(trainer, "pass_stepper", reversed_stepper)
    real_save, saves = trainer._save_state, []

    def crash_after_first_save(rdir, state):
        real_save(rdir, state)
        saves.append(state["step"])
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_state", crash_after_first_save)
    outs = [tmp_path / f"r{i}" for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        train_many(data, cfgs, tcfg, outs)
    other = train_many(data, cfgs, tcfg, outs)  # resumed at step 5
    assert saves[0] == 5 and [m.calls for m in made] == [5, 7]
    for a, b in zip(usual, other):
        assert _same(Path(a["out"]), Path(b["out"])), a["arch"]
        la, lb = (pd.read_parquet(f"{r['out']}/train_log.parquet").drop(columns="wall_s") for r in (a, b))
        pd.testing.assert_frame_equal(la, lb)


# ----------------------------------------------------------------------------- lr sweep


def test_best_rates_by_heldout_fvu_with_a_tie_rule():
    f = [0.25, 1.0, 4.0, 16.0]
    table = pd.DataFrame({
        "arch": ["topk"] * 4 + ["isae"] * 4 + ["iter"] * 4 + ["relu"] * 4,
        "factor": f * 4,
        "lr": [x * 1e-3 for x in f] * 4,
        "heldout_fvu": [0.30, 0.20, 0.19, math.inf,   # 4x is 5 % better: not a tie
                        0.1450, 0.1461, 0.158, 0.49,  # 1x within 0.8 % of 0.25x: tied
                        0.300, 0.200, 0.1992, 0.1991,  # 1x within 0.5 %: 1x
                        0.5, 0.4, 0.5, 0.4],          # 1x and 16x equal: 1x (closer to 1)
    })
    # The lowest FVU outside the tolerance; inside it, the factor closest to 1x.
    assert sweep.best_rates(table) == {"topk": 4e-3, "isae": 1e-3, "iter": 1e-3, "relu": 1e-3}
    # Tolerance 0: the lowest FVU alone (ties of equal FVU still to the factor nearest 1x).
    assert sweep.best_rates(table, tolerance=0.0) == {"topk": 4e-3, "isae": 0.25e-3,
                                                     "iter": 16e-3, "relu": 1e-3}
    # Equally close to 1x in log scale (0.25x and 4x): the smaller.
    even = pd.DataFrame({"arch": "a", "factor": [0.25, 4.0], "lr": [1.0, 16.0],
                         "heldout_fvu": [0.2, 0.2]})
    assert sweep.best_rates(even) == {"a": 1.0}
    with pytest.raises(Exception, match="every learning rate of topk diverged"):
        sweep.best_rates(table.assign(heldout_fvu=math.inf))


def test_lr_sweep_evaluates_its_candidates_on_the_training_device(data, tmp_path, monkeypatch):
    """Each candidate is loaded for its held-out FVU on the device it trained on, named
    explicitly (loading's default is the CPU: on a GPU machine that evaluation took longer
    than the training)."""
    seen = []
    real = sweep.load
    monkeypatch.setattr(sweep, "load", lambda path, **kw: seen.append(kw.get("device")) or real(path, **kw))
    tcfg = TrainConfig(tokens=1024, batch_size=256, device="cpu")
    sweep.lr_sweep(data, ["topk", "isae"], [1.0, 4.0], 3, 48, tcfg, tmp_path / "lr")
    assert seen == ["cpu"] * 4


@pytest.mark.slow
def test_lr_sweep_writes_the_choice_train_reads(data, tmp_path, capsys):
    out = tmp_path / "lr"
    assert main(["-q", "lr-sweep", "--activations", str(data), "--arch", "topk,isae,dl",
                 "--factors", "0.5,4", "--k", "3", "--width", "48", "--tokens", "6000",
                 "--batch-size", "256", "--tie-tolerance", "0", "--pair-seed", "1",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(set(table["arch"])) == ["isae", "topk"]  # dl has no learning rate
    choice = json.loads((out / "lr.json").read_text())
    default = TrainConfig().learning_rate(48)
    from isae.analysis.matching import match_dictionaries
    for arch, g in table.groupby("arch"):
        assert g["factor"].tolist() == [0.5, 4.0]
        np.testing.assert_allclose(g["lr"], [0.5 * default, 4 * default])
        best = g.sort_values("heldout_fvu")["lr"].iloc[0]
        assert choice["lr"][arch] == pytest.approx(best) == summary["lr"][arch]
        assert g["chosen"].sum() == 1
        # Both factors are the grid's edges: the choice is marked, in the table and lr.json.
        assert g["at_edge"].tolist() == g["chosen"].tolist()
        assert choice["at_edge"][arch] is True
        sens = next(r for r in choice["sensitivity"] if r["arch"] == arch)
        other = g[~g["chosen"]].iloc[0]
        side = "above" if other["factor"] > sens["factor"] else "below"
        assert sens[f"heldout_fvu_{side}"] == pytest.approx(other["heldout_fvu"])
        # The stability at each factor: seed 0 against the pair seed, matched there.
        for _, row in g.iterrows():
            name = sweep.factor_name(row["factor"])
            ref = match_dictionaries(load_decoder(out / "ckpt" / arch / name),
                                     load_decoder(out / "ckpt" / arch / f"{name}-seed1"))
            assert row["seed_abs_cos"] == pytest.approx(ref.summary()["mean_abs_cos"])
        assert sens[f"seed_abs_cos_{side}"] == pytest.approx(other["seed_abs_cos"])
        # The recorded FVU is the candidate checkpoint's held-out FVU.
        from isae.analysis.reconstruction import reconstruction_metrics
        from isae.data.checkpoints import load
        f = g["factor"].iloc[0]
        ck = load(out / "ckpt" / arch / sweep.factor_name(f))
        assert reconstruction_metrics(ck, ActivationSet(data))["fvu"] == pytest.approx(
            g["heldout_fvu"].iloc[0])
    assert main(["-q", "train", "--activations", str(data), "--arch", "isae", *SHAPE,
                 "--lr-from", str(out / "lr.json"), "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "cfg.json").read_text())["lr"] == pytest.approx(
        choice["lr"]["isae"])
    assert main(["-q", "lr-sweep", "--activations", str(data), "--arch", "topk", "--factors",
                 "1,x", "--k", "3", "--width", "48", "--tokens", "100", "--out", str(out)]) == 2


def test_reuse_copies_exactly_what_training_would_give(data, tmp_path, capsys):
    """The lr sweep's run at the chosen rate is bit for bit the group's run of that seed:
    --reuse copies it (and only it), and training it again gives the same tensors."""
    lr = tmp_path / "lr"
    common = ["--k", "3", "--width", "48", "--tokens", "6000", "--batch-size", "256",
              "--data-seed", "0"]
    assert main(["-q", "lr-sweep", "--activations", str(data), "--arch", "topk", "--factors",
                 "1,4", "--seed", "0", *common, "--out", str(lr)]) == 0
    chosen = json.loads((lr / "lr.json").read_text())["lr"]["topk"]
    capsys.readouterr()
    group = tmp_path / "g" / "{arch}" / "seed{seed}"
    base = ["-q", "train", "--activations", str(data), "--arch", "topk", "--seeds", "0,1",
            *common, "--lr-from", str(lr / "lr.json")]
    assert main([*base, "--reuse", str(lr / "ckpt"), "--out", str(group)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r.get("reused") is not None for r in runs] == [True, False]
    factor = "x4" if chosen > TrainConfig().learning_rate(48) * 2 else "x1"
    assert runs[0]["reused"].endswith(f"ckpt/topk/{factor}")
    assert _same(tmp_path / "g" / "topk" / "seed0", lr / "ckpt" / "topk" / factor)
    assert (tmp_path / "g" / "topk" / "seed0" / INIT_FILE).is_file()
    again = tmp_path / "again" / "{arch}" / "seed{seed}"
    assert main([*base, "--out", str(again)]) == 0
    assert _same(tmp_path / "again" / "topk" / "seed0", tmp_path / "g" / "topk" / "seed0")
    assert _same(tmp_path / "again" / "topk" / "seed1", tmp_path / "g" / "topk" / "seed1")
    # The reused run carries the convergence control that training it writes.
    conv = ("fvu_trend", "fvu_trend_steps", "converged", "converged_below")
    reused_cfg = json.loads((tmp_path / "g" / "topk" / "seed0" / "cfg.json").read_text())
    trained_cfg = json.loads((tmp_path / "again" / "topk" / "seed0" / "cfg.json").read_text())
    assert all(k in trained_cfg for k in conv)
    assert {k: reused_cfg.get(k) for k in conv} == {k: trained_cfg[k] for k in conv}
    # Another setting (here the batch size) finds nothing to reuse.
    other = tmp_path / "other" / "{arch}" / "seed{seed}"
    capsys.readouterr()
    assert main([*base[:-2], "--batch-size", "128", "--lr-from", str(lr / "lr.json"),
                 "--reuse", str(lr / "ckpt"), "--out", str(other)]) == 0
    assert all(r.get("reused") is None for r in json.loads(capsys.readouterr().out)["runs"])
