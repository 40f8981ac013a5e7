"""Grouped training (isae.models.stacked, isae.training.group): a group of SAEs stacked as
one model computes what the same SAEs compute one by one.

* the stacked reference maths against each model alone, in float64 (forward, AuxK with a
  dead mask per model, gradients): equal to float rounding;
* the stacked fast op set (gpu/stacked_ops.py, its kernels on stock ops here) against
  the single-model fast op set, model by model;
* Adam with a learning rate per model against torch.optim.Adam;
* train_many with and without grouping on the CPU (the stacked reference maths): the same
  log and checkpoint formats, and the same training within a float tolerance (tie flips
  in the top-k move a few atoms; see TOLERANCE);
* resume states written by a group resume grouped, and one by one.

The Triton kernels of the stacked path are checked in tests/test_kernels.py (interpreter)
and the whole path on CUDA in tests/test_fast_gpu.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from isae.gpu.ops import FastOps
from isae.gpu.stacked_ops import StackedFastOps
from isae.models import compute
from isae.models.config import SAEConfig, TrainConfig
from isae.models.reference import REFERENCE, adam_rows_, adam_scalars
from isae.models.sparse_coder import SparseCoder
from isae.models.stacked import STACKED_REFERENCE, StackedCoder, local
from isae.training import trainer
from isae.training.group import RunGroup, group_runs
from isae.training.steppers import Run
from isae.training.trainer import train_many

#: Every switch combination of the TopK family, by name.
ARCHS = ["topk", "topk+signed", "topk+tied", "topk+nobias", "topk+iter", "isae", "isae-signed",
         "isae-tied", "isae-nobias", "isae-iter", "topk+iter+sg", "isae-iter+sg"]


def _loss(out) -> torch.Tensor:
    """The losses the tests differentiate: FVU + AuxK / 32 (+ the amortised codes' FVU of
    +sg, a loss term of its own), summed over a stack's models."""
    loss = out.fvu + out.auxk / 32
    if out.fvu_amortised is not None:
        loss = loss + out.fvu_amortised
    return loss.sum()

#: Grouped vs one-by-one training on the CPU (float32 reference maths, tens of steps): the
#: FVU of each log row within FVU_REL (relative), and the decoder rows of each run at cosine
#: COS_MEAN on average, COS_MIN at worst, with the one-by-one run's. Stacked products round
#: like single ones but not always identically (batched matmuls, summation order), so a
#: near-tie in a top-k can go the other way and nudge the atoms (measured: isae-iter once
#: to mean 0.9997, min 0.991 after 45 steps; the other runs agree to 1 - 3e-7).
TOLERANCE = {"fvu_rel": 5e-3, "cos_mean": 0.999, "cos_min": 0.98}


def _coders(arch: str, d: int, n: int, k: int, seeds, dtype=torch.float32, ops=REFERENCE):
    cs = []
    for s in seeds:
        c = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=s), ops=ops)
        if c.cfg.bias == "learned":  # not zero, so that their gradients are checked too
            with torch.no_grad():
                c.b_dec.normal_(0, 0.1)
                c.b_enc.normal_(0, 0.1)
        cs.append(c.to(dtype))
    return cs


def _dead_masks(n: int) -> torch.Tensor:
    """Three models: no dead latent, fewer than AuxK's k (d / 2), many."""
    g = torch.Generator().manual_seed(7)
    dead = torch.zeros(3, n, dtype=torch.bool)
    dead[1, torch.randperm(n, generator=g)[:3]] = True
    dead[2] = torch.rand(n, generator=g) < 0.4
    return dead


@pytest.mark.parametrize("aux_detach", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_reference_equals_each_model_alone_in_float64(arch, aux_detach):
    torch.manual_seed(0)
    d, n, k, B = 16, 80, 4, 96
    singles = _coders(arch, d, n, k, (0, 1, 2), torch.float64)
    stacked = StackedCoder(singles, STACKED_REFERENCE)
    x = torch.randn(B, d, dtype=torch.float64)
    dead = _dead_masks(n)
    out = stacked(x, dead, aux_detach=aux_detach)
    _loss(out).backward()
    assert out.auxk[0] == 0 and out.auxk[1] > 0 and out.auxk[2] > 0
    for m, c in enumerate(singles):
        o = c(x, dead[m] if dead[m].any() else None, aux_detach=aux_detach)
        _loss(o).backward()
        torch.testing.assert_close(out.fvu[m], o.fvu, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.auxk[m], o.auxk, rtol=1e-12, atol=1e-15)
        assert (out.fvu_amortised is None) == (o.fvu_amortised is None)
        if o.fvu_amortised is not None:
            torch.testing.assert_close(out.fvu_amortised[m], o.fvu_amortised, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.x_hat[m], o.x_hat, rtol=1e-12, atol=1e-12)
        assert torch.equal(local(out.codes.idx, n)[m].sort(-1).values, o.codes.idx.sort(-1).values)
        for name, (P, cut) in stacked.member_params().items():
            torch.testing.assert_close(cut(P.grad, m), getattr(c, name).grad, rtol=1e-10, atol=1e-12,
                                       msg=f"{arch} model {m} {name}")


@pytest.mark.parametrize("aux_detach", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_fast_ops_equal_the_single_fast_path_model_by_model(arch, aux_detach):
    """The stacked fast op set flattens the models onto the single-model kernels; on the
    CPU (stock-op kernels, bfloat16 products as on the GPU) each model's loss and gradients
    are the single fast path's, and a fixed AuxK width larger than any model's dead count
    (what a CUDA graph uses) changes nothing."""
    _stacked_equals_single_fast(arch, aux_detach, 16, 80, 4)


@pytest.mark.parametrize("arch", ["topk+iter", "isae-iter"])
def test_stacked_fast_ops_on_rows_too_wide_for_the_fused_step(arch):
    """The same on rows whose [K, D] table tile the IHT row kernels do not hold (d 600,
    k 32): there both op sets take the unfused differentiated step."""
    from isae.gpu import kernels
    assert not kernels.iht_row_fits(600, 32)
    _stacked_equals_single_fast(arch, False, 600, 200, 32)


def _stacked_equals_single_fast(arch: str, aux_detach: bool, d: int, n: int, k: int) -> None:
    torch.manual_seed(1)
    B = 96
    x = torch.randn(B, d)
    dead = _dead_masks(n)
    grads = {}
    for width in (None, int(dead.sum(1).max()) + 9):
        torch.manual_seed(2)  # the same biases both times
        singles = _coders(arch, d, n, k, (0, 1, 2), ops=FastOps(cuda_graphs=False))
        stacked = StackedCoder(singles, StackedFastOps(cuda_graphs=False))
        out = stacked(x, dead, aux_width=width, aux_detach=aux_detach)
        _loss(out).backward()
        grads[width] = {name: P.grad.clone() for name, (P, _) in stacked.member_params().items()}
        for m, c in enumerate(singles):
            o = c(x, dead[m] if dead[m].any() else None, aux_detach=aux_detach)
            _loss(o).backward()
            torch.testing.assert_close(out.fvu[m], o.fvu, rtol=1e-5, atol=0)
            torch.testing.assert_close(out.auxk[m], o.auxk, rtol=1e-2, atol=1e-7)
            if o.fvu_amortised is not None:
                torch.testing.assert_close(out.fvu_amortised[m], o.fvu_amortised, rtol=1e-5,
                                           atol=0)
            for name, (P, cut) in stacked.member_params().items():
                # bfloat16 products in another order: a near-tie in AuxK's selection may go
                # the other way (a few rows of the decoder gradient)
                g1, g2 = cut(P.grad, m), getattr(c, name).grad
                assert float((g1 - g2).norm() / g2.norm()) < 1e-2, (arch, m, name)
    a, b = grads.values()  # the same but for bfloat16 near-ties (products of other shapes)
    for name in a:
        assert float((a[name] - b[name]).norm() / a[name].norm()) < 1e-2, name


def test_stacked_fast_ops_keep_a_nan_model_to_itself():
    """A diverging model's NaN scores must not reach the others' latents (the top-k's
    indices are clamped into the model's own range)."""
    torch.manual_seed(2)
    singles = _coders("topk", 16, 80, 4, (0, 1, 2), ops=FastOps(cuda_graphs=False))
    stacked = StackedCoder(singles, StackedFastOps(cuda_graphs=False))
    with torch.no_grad():
        stacked.W_enc[80:160] = float("nan")  # model 1
    x = torch.randn(64, 16)
    out = stacked(x)
    out.fvu.nansum().backward()
    lidx = local(out.codes.idx, 80)
    assert ((lidx >= 0) & (lidx < 80)).all()
    for m in (0, 2):
        assert torch.isfinite(out.fvu[m]) and torch.isfinite(stacked.W_dec.grad[m * 80:(m + 1) * 80]).all()


def test_adam_with_a_rate_per_model_equals_torch_adam():
    torch.manual_seed(3)
    M, rows, cols = 3, 5, 7
    lrs = torch.tensor([1e-2, 3e-3, 0.0])
    P = torch.randn(M * rows, cols)
    singles = [torch.nn.Parameter(P[m * rows:(m + 1) * rows].clone()) for m in range(M)]
    opts = [torch.optim.Adam([p], lr=float(lr)) for p, lr in zip(singles, lrs)]
    exp_avg, exp_avg_sq, step = torch.zeros_like(P), torch.zeros_like(P), torch.zeros(M)
    for _ in range(6):
        G = torch.randn(M * rows, cols)
        step += 1
        adam_rows_(P, G, exp_avg, exp_avg_sq, *adam_scalars(step, lrs))
        for m, (p, opt) in enumerate(zip(singles, opts)):
            p.grad = G[m * rows:(m + 1) * rows].clone()
            opt.step()
    for m, p in enumerate(singles):
        torch.testing.assert_close(P[m * rows:(m + 1) * rows], p.detach(), rtol=1e-6, atol=1e-7)


def test_grouping_is_chosen_once_from_the_device_and_the_environment(monkeypatch):
    monkeypatch.delenv("ISAE_GROUPED", raising=False)
    monkeypatch.delenv("ISAE_REFERENCE_OPS", raising=False)
    assert not compute.grouped_training("cpu")
    assert compute.grouped_training("cuda")  # the fast path: grouped
    monkeypatch.setenv("ISAE_REFERENCE_OPS", "1")
    assert not compute.grouped_training("cuda")
    monkeypatch.setenv("ISAE_GROUPED", "1")
    assert compute.grouped_training("cpu")
    monkeypatch.setenv("ISAE_GROUPED", "0")
    assert not compute.grouped_training("cuda")


class _FakeRun:
    def __init__(self, arch, width=64, k=4):
        self.cfg = SAEConfig.from_arch(arch, d_in=8, d_sae=width, k=k)


def test_detached_auxk_codes_change_only_what_they_should():
    """With AuxK's codes detached, the stacked model's encoder gradient is its FVU's alone
    (model 0, with no dead latent, is unchanged; the others' encoders lose AuxK's share),
    while the decoder still gets AuxK's gradient: the float64 reference against itself."""
    torch.manual_seed(0)
    d, n, k, B = 16, 80, 4, 96
    x = torch.randn(B, d, dtype=torch.float64)
    dead = _dead_masks(n)
    grads = {}
    for case in (False, True, "fvu"):
        torch.manual_seed(1)  # the same weights and biases each time
        stacked = StackedCoder(_coders("topk", d, n, k, (0, 1, 2), torch.float64),
                               STACKED_REFERENCE)
        out = stacked(x, dead, aux_detach=case is True)
        (out.fvu.sum() + (0 if case == "fvu" else out.auxk.sum())).backward()
        grads[case] = {name: [cut(P.grad, m).clone() for m in range(3)]
                       for name, (P, cut) in stacked.member_params().items()}
    torch.testing.assert_close(grads[True]["W_enc"][0], grads[False]["W_enc"][0])
    for m in (1, 2):
        assert not torch.allclose(grads[True]["W_enc"][m], grads[False]["W_enc"][m])
        torch.testing.assert_close(grads[True]["W_enc"][m], grads["fvu"]["W_enc"][m])
        assert not torch.allclose(grads[True]["W_dec"][m], grads["fvu"]["W_dec"][m])


def test_group_takes_the_topk_family_runs_of_one_shape(monkeypatch):
    tcfg = TrainConfig()
    runs = [_FakeRun("topk"), _FakeRun("relu"), _FakeRun("dl")]
    assert group_runs(runs, tcfg, torch.device("cpu"), grouped=True) is None  # one to group
    assert group_runs([_FakeRun("topk"), _FakeRun("isae")], tcfg, torch.device("cpu"),
                      grouped=False) is None
    # detached AuxK codes (the stack passes them on) group; sparsify's AuxK does not
    from isae.training import group as grouping

    monkeypatch.setattr(grouping, "RunGroup", lambda members, tcfg, device: members)
    # +sg's undifferentiated steps stack too (each switch set its own part of the group)
    assert len(group_runs([_FakeRun("isae-iter"), _FakeRun("isae-iter+sg")], tcfg,
                          torch.device("cpu"), grouped=True)) == 2
    pair = [_FakeRun("isae"), _FakeRun("isae")]
    assert len(group_runs(pair, TrainConfig(auxk_detach="tied"), torch.device("cpu"),
                          grouped=True)) == 2
    assert group_runs(pair, TrainConfig(auxk_norm="input"), torch.device("cpu"),
                      grouped=True) is None


def _train(acts, archs, seeds, out, grouped, lrs=None, **kw):
    cfgs = [SAEConfig.from_arch(a, d_in=32, d_sae=96, k=3, seed=s) for a in archs for s in seeds]
    tcfg = TrainConfig(**{"tokens": 45 * 128, "batch_size": 128, "dead_tokens": 1000,
                          "log_every": 5, **kw})
    outs = [out / f"{c.arch}-{c.seed}" for c in cfgs]
    return cfgs, outs, train_many(acts, cfgs, tcfg, outs, resume=False, grouped=grouped,
                                  lrs=lrs, drop_diverged=True)


@pytest.mark.slow
def test_grouped_training_follows_one_by_one_training(synthetic_set, tmp_path, monkeypatch):
    """The grouped path (here the stacked reference maths on the CPU) against the same runs
    trained one by one on the same batches: every file in the same format, every run's
    training within TOLERANCE; and a diverging run is dropped without touching the others."""
    archs, seeds = ["topk", "isae", "isae-iter", "isae-tied", "isae-iter+sg"], (0, 1)
    lrs = [1e-2 if a == "isae-tied" else None for a in archs for _ in seeds]
    cfgs, solo_outs, solo = _train(synthetic_set, archs, seeds, tmp_path / "solo", False, lrs)
    _, group_outs, grouped = _train(synthetic_set, archs, seeds, tmp_path / "group", True, lrs)
    for c, a, b, sa, sb in zip(cfgs, solo_outs, group_outs, solo, grouped):
        assert set(sa) == set(sb) and (sa["arch"], sa["seed"]) == (sb["arch"], sb["seed"])
        la, lb = pd.read_parquet(a / "train_log.parquet"), pd.read_parquet(b / "train_log.parquet")
        assert list(la.columns) == list(lb.columns) and (la.dtypes == lb.dtypes).all()
        assert la["step"].tolist() == lb["step"].tolist() and la["lr"].equals(lb["lr"])
        np.testing.assert_allclose(lb["fvu"], la["fvu"], rtol=TOLERANCE["fvu_rel"])
        ca, cb = (json.loads((p / "cfg.json").read_text()) for p in (a, b))
        assert ca.keys() == cb.keys()
        assert {k: v for k, v in ca.items() if k not in ("converged", "fvu_trend", "init_abs_cos")} \
            == {k: v for k, v in cb.items() if k not in ("converged", "fvu_trend", "init_abs_cos")}
        ta, tb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
        assert ta.keys() == tb.keys()
        cos = (ta["W_dec"] * tb["W_dec"]).sum(1)  # unit rows
        assert cos.mean() >= TOLERANCE["cos_mean"] and cos.min() >= TOLERANCE["cos_min"], (
            c.arch, c.seed, float(cos.mean()), float(cos.min()))
        assert (load_file(str(a / "init.safetensors"))["W_dec"]
                == load_file(str(b / "init.safetensors"))["W_dec"]).all()
    # a run whose weights turn NaN is dropped; the others train on as before
    from isae.training import group as grouping

    real, calls = grouping._Part.train_step, {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += self.coder.cfg.arch == "topk"
        if calls["n"] == 3 and self.coder.cfg.arch == "topk":  # topk seed 1 at step 2
            assert [r.cfg.seed for r in self.runs] == [0, 1]
            with torch.no_grad():
                self.coder.W_enc[96:192] = float("nan")
        return real(self, *a, **k)

    monkeypatch.setattr(grouping._Part, "train_step", poisoned)
    _, outs, blown = _train(synthetic_set, archs, seeds, tmp_path / "blown", True, lrs)
    assert [s.get("diverged", False) for s in blown] == [False, True] + [False] * (len(blown) - 2)
    assert not outs[1].exists()
    for s, ref in zip(blown, grouped):
        if not s.get("diverged"):
            assert s["fvu"] == pytest.approx(ref["fvu"], rel=1e-5)


@pytest.mark.slow
def test_grouped_training_with_detached_auxk_codes_follows_one_by_one(synthetic_set, tmp_path):
    """auxk_detach=tied (gpu.yaml's setting from 16 x d): tied coders group with their AuxK
    codes detached and train as they do one by one, within TOLERANCE."""
    archs, seeds = ["topk", "isae"], (0, 1)
    kw = {"auxk_detach": "tied", "dead_tokens": 256}  # latents die within the run
    cfgs, solo_outs, solo = _train(synthetic_set, archs, seeds, tmp_path / "solo", False, **kw)
    _, group_outs, grouped = _train(synthetic_set, archs, seeds, tmp_path / "group", True, **kw)
    for c, a, b in zip(cfgs, solo_outs, group_outs):
        la, lb = pd.read_parquet(a / "train_log.parquet"), pd.read_parquet(b / "train_log.parquet")
        np.testing.assert_allclose(lb["fvu"], la["fvu"], rtol=TOLERANCE["fvu_rel"])
        assert (la["auxk"] > 0).any(), (c.arch, "AuxK never ran: the test checks nothing")
        ta, tb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
        cos = (ta["W_dec"] * tb["W_dec"]).sum(1)
        assert cos.mean() >= TOLERANCE["cos_mean"] and cos.min() >= TOLERANCE["cos_min"], (
            c.arch, c.seed, float(cos.mean()), float(cos.min()))


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_grouped_state_resumes_grouped_and_one_by_one(synthetic_set, tmp_path, monkeypatch):
    """A resume state written by a group has the one-by-one layout (torch's Adam state per
    run): resumed grouped it ends bit for bit as the uninterrupted group (CPU), resumed one by
    one it ends within TOLERANCE of it."""
    archs, seeds = ["topk", "isae-iter"], (0, 1)
    kw = dict(checkpoint_every=20, checkpoint_seconds=0)
    _, ref_outs, ref = _train(synthetic_set, archs, seeds, tmp_path / "ref", True, **kw)
    real = trainer.training_batches

    def interrupted(*a, **k):
        it, src = real(*a, **k)

        def gen():
            for i, b in enumerate(it):
                if i == 30:  # after the save at step 20
                    raise _Stop
                yield b
        return gen(), src

    for grouped_after in (True, False):
        out = tmp_path / f"resumed-{grouped_after}"
        monkeypatch.setattr(trainer, "training_batches", interrupted)
        with pytest.raises(_Stop):
            _train(synthetic_set, archs, seeds, out, True, **kw)
        monkeypatch.setattr(trainer, "training_batches", real)
        assert (out / "topk-0.resume").is_dir()
        cfgs = [SAEConfig.from_arch(a, d_in=32, d_sae=96, k=3, seed=s) for a in archs for s in seeds]
        tcfg = TrainConfig(**{"tokens": 45 * 128, "batch_size": 128, "dead_tokens": 1000,
                          "log_every": 5, **kw})
        outs = [out / f"{c.arch}-{c.seed}" for c in cfgs]
        done = train_many(synthetic_set, cfgs, tcfg, outs, grouped=grouped_after)
        for a, b, sa, sb in zip(ref_outs, outs, ref, done):
            ta, tb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
            la = pd.read_parquet(a / "train_log.parquet").drop(columns="wall_s")
            lb = pd.read_parquet(b / "train_log.parquet").drop(columns="wall_s")
            if grouped_after:
                assert all(torch.equal(ta[k], tb[k]) for k in ta)
                pd.testing.assert_frame_equal(la, lb, check_exact=True)
            else:
                assert sb["fvu"] == pytest.approx(sa["fvu"], rel=TOLERANCE["fvu_rel"])
                pd.testing.assert_frame_equal(la.iloc[:5], lb.iloc[:5], check_exact=True)


def test_a_group_steps_its_runs_and_only_them(tmp_path):
    """RunGroup makes each run's coder and dead counters views of its part's (what the
    trainer logs, checkpoints and resumes from), steps them all, returns each run's metrics
    as its own stepper would, and refuses a member's own step."""
    tcfg = TrainConfig(batch_size=64, dead_tokens=64)
    archs = ["topk", "isae", "topk"]
    runs = [Run(SAEConfig.from_arch(a, d_in=8, d_sae=40, k=3, seed=i), tcfg, tmp_path / str(i),
                torch.device("cpu"), REFERENCE) for i, a in enumerate(archs)]
    before = [r.model.W_dec.detach().clone() for r in runs]
    group = RunGroup(runs, tcfg, torch.device("cpu"))
    assert len(group.parts) == 2 and [r.cfg.arch for r in group.runs] == ["topk", "topk", "isae"]
    for r, w in zip(runs, before):
        assert torch.equal(r.model.W_dec, w)  # the initialisation, as built alone
    x = torch.randn(64, 8)
    group.step(x, 1.0)
    metrics = group.step(x, 1.0)
    assert sorted(metrics) == [0, 1, 2]
    for j, r in enumerate(group.runs):
        part = next(p for p in group.parts if any(r is q for q in p.runs))
        lo = part.coder.W_dec.data_ptr()
        assert lo <= r.model.W_dec.data_ptr() < lo + part.coder.W_dec.nbytes
        assert r.since_fired._base is part.since
        m = metrics[j]
        assert m["loss"].shape == () and m["codes"].val.shape == (64, 3)
        assert ((m["codes"].idx >= 0) & (m["codes"].idx < 40)).all()  # its own latents
        assert r.state()["stepper"]["opt"]["state"][0]["step"] == 2
        with pytest.raises(RuntimeError, match="stepped by its group"):
            r.stepper.step(x, 1.0, None)
    for r, w in zip(runs, before):
        assert not torch.equal(r.model.W_dec, w)  # trained, through the view
    runs[0].diverged = True  # as the trainer marks a run whose loss turned non-finite
    assert sorted(group.step(x, 1.0)) == [1, 2]
    assert group.parts[0].lr_base[0] == 0  # frozen




def test_runs_outside_the_group_train_beside_it_as_before(synthetic_set, tmp_path):
    """Dictionary learning and a ReLU SAE do not stack: they step one by one beside the
    group, on the same batches, bit for bit as without grouping."""
    cfgs = [SAEConfig.from_arch(a, d_in=32, d_sae=64, k=3, seed=0) for a in ("topk", "dl", "isae", "relu")]
    tcfg = TrainConfig(tokens=12 * 128, batch_size=128, log_every=4)
    done = {}
    for grouped in (False, True):
        outs = [tmp_path / str(grouped) / c.arch for c in cfgs]
        done[grouped] = train_many(synthetic_set, cfgs, tcfg, outs, resume=False, grouped=grouped)
        for o in outs:
            assert (o / "sae.safetensors").is_file() and (o / "train_log.parquet").is_file()
    for arch in ("dl", "relu"):
        a = load_file(str(tmp_path / "False" / arch / "sae.safetensors"))
        b = load_file(str(tmp_path / "True" / arch / "sae.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), arch


@pytest.mark.slow
def _trains_per_coder_as(synthetic_set, tmp_path, archs, option: dict, like_a: dict,
                         like_b: dict, takes_a) -> None:
    """A per-coder option (``option``), one by one and grouped, trains each coder bit for
    bit (CPU) as the settings ``like_a`` where ``takes_a(cfg)``, else as ``like_b``, and
    each differs from the other settings (the option changes something here), and the
    checkpoint records it. AuxK acts within these runs: latents die within 256 rows."""
    kw = {"dead_tokens": 256}
    for grouped in (False, True):
        out = tmp_path / f"grouped-{grouped}"
        cfgs, got, _ = _train(synthetic_set, archs, (0,), out / "option", grouped, **option, **kw)
        _, a, _ = _train(synthetic_set, archs, (0,), out / "a", grouped, **like_a, **kw)
        _, b, _ = _train(synthetic_set, archs, (0,), out / "b", grouped, **like_b, **kw)
        for c, g, x, y in zip(cfgs, got, a, b):
            want, other = (x, y) if takes_a(c) else (y, x)
            tg, tw, to = (load_file(str(p / "sae.safetensors")) for p in (g, want, other))
            assert all(torch.equal(tg[n], tw[n]) for n in tg), (grouped, c.arch)
            assert not all(torch.equal(tg[n], to[n]) for n in tg), (grouped, c.arch, "no effect")
            train = json.loads((g / "cfg.json").read_text())["train"]
            assert all(train[k] == v for k, v in option.items())


def test_auxk_skip_turns_auxk_off_for_iterative_coders_alone(synthetic_set, tmp_path):
    """auxk_skip=iter: the iterative coder trains exactly as with AuxK's weight 0, the
    others exactly as with AuxK on."""
    _trains_per_coder_as(synthetic_set, tmp_path, ["topk", "isae-iter"], {"auxk_skip": "iter"},
                         {"auxk_alpha": 0.0}, {}, lambda c: c.encoder_steps > 0)


def test_auxk_fit_signed_fits_signed_coders_alone(synthetic_set, tmp_path):
    """auxk_fit=signed: the signed untied coder (isae-tied) trains exactly as with every
    coder's AuxK decode fitted, the unsigned one (topk) exactly as with none."""
    _trains_per_coder_as(synthetic_set, tmp_path, ["topk", "isae-tied"],
                         {"auxk_fit": "signed"}, {"auxk_fit": "all"}, {},
                         lambda c: c.signed)


def test_auxk_detach_signed_detaches_signed_coders_alone(synthetic_set, tmp_path):
    """auxk_detach=signed: the signed untied coder (isae-tied) trains exactly as with every
    coder's AuxK codes detached, the unsigned one (topk) exactly as with none detached."""
    _trains_per_coder_as(synthetic_set, tmp_path, ["topk", "isae-tied"],
                         {"auxk_detach": "signed"}, {"auxk_detach": "all"}, {},
                         lambda c: c.signed)
