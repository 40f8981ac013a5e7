"""Training end to end on small signed sparse data: recovery, the switches, determinism,
resume after SIGKILL, and bad input."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from libdata import matched_abs_cos, signed_sparse_set
from safetensors.torch import load_file

from isae.analysis.convergence import fvu_trend, run_convergence
from isae.cli.main import main
from isae.cli.train import convergence_report
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.errors import UserError
from isae.gpu.ops import FastOps
from isae.models.config import SAEConfig, TrainConfig, parse_arch
from isae.models.reference import REFERENCE, ReferenceOps
from isae.models.sparse_coder import SparseCoder
from isae.training import trainer
from isae.training.trainer import SAEStepper, lr_multiplier

FAST = ["--k", "3", "--width", "128", "--batch-size", "512", "--lr", "1e-2"]
CONVERGED_TOKENS = "1000000"  # FAST on this set: recovers the truth (>= 0.95) and has converged


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "syn"
    D = signed_sparse_set(path)
    return path, D


def _train(data, tmp, arch, tokens="1000000", extra=()):
    path, _ = data
    out = tmp / arch
    rc = main(["-q", "train", "--activations", str(path), "--arch", arch, *FAST, "--tokens", tokens,
               "--out", str(out), *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def isae_run(data, tmp_path_factory):
    """The 1 M-token isae run, through the console script: (checkpoint, summary, stderr)."""
    out = tmp_path_factory.mktemp("ck") / "isae"
    summary, err = _train_cli(data, out, CONVERGED_TOKENS)
    return out, summary, err


@pytest.fixture(scope="module")
def isae_ckpt(isae_run):
    return isae_run[0]


def test_isae_recovers_true_dictionary(data, isae_ckpt):
    _, D = data
    W = checkpoint.load_decoder(isae_ckpt).numpy()
    assert matched_abs_cos(W, D) >= 0.95


def test_checkpoint_contents(isae_ckpt, data):
    t = load_file(str(isae_ckpt / "sae.safetensors"))
    assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert t["W_enc"].shape == (32, 128) and t["W_dec"].shape == (128, 32)
    np.testing.assert_allclose(t["W_dec"].norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert torch.equal(t["W_enc"], t["W_dec"].T)  # tied
    assert float(t["b_enc"].abs().sum()) == 0 and float(t["b_dec"].abs().sum()) == 0  # bias none
    cfg = json.loads((isae_ckpt / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "k", "arch", "signed", "tied", "bias", "encoder_steps", "seed",
                "tokens_seen", "normalization", "version"):
        assert key in cfg
    log = pd.read_parquet(isae_ckpt / "train_log.parquet")
    assert {"tokens", "loss", "fvu", "l0", "dead_frac", "lr", "wall_s"} <= set(log.columns)
    assert log["fvu"].iloc[-1] < log["fvu"].iloc[0]
    assert not (isae_ckpt.parent / "isae.resume").exists()


def test_signed_codes_are_negative_somewhere(isae_ckpt, data):
    ck = checkpoint.load(isae_ckpt)
    x = ActivationSet(data[0]).load("heldout")["x"]
    codes = ck.encode_raw(x)
    assert (codes.val < 0).float().mean() > 0.2
    assert (codes.val > 0).float().mean() > 0.2


def test_checkpoint_maps_raw_to_raw(isae_ckpt, data):
    ck = checkpoint.load(isae_ckpt)
    x = ActivationSet(data[0]).load("heldout")["x"]
    x_hat = ck.reconstruct_raw(x).numpy()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.4


def test_encoder_steps_never_worse_for_same_dictionary(isae_ckpt, data):
    ck = checkpoint.load(isae_ckpt)
    x = torch.from_numpy(ActivationSet(data[0]).load("heldout")["x"])
    xn = ck.normalize(x)
    m0 = ck.model
    cfg3 = SAEConfig.from_dict({**m0.cfg.to_dict(), "arch": "isae+iter3", "encoder_steps": 3})
    m3 = SparseCoder(cfg3)
    m3.load_state_dict(m0.state_dict())
    with torch.no_grad():
        e0 = (xn - m0.decode(m0.encode(xn))).pow(2).sum(-1)
        e3 = (xn - m3.decode(m3.encode(xn))).pow(2).sum(-1)
    assert (e3 <= e0 + 1e-4).all()
    assert e3.mean() < e0.mean()


@pytest.mark.parametrize("arch", ["topk", "isae", "relu"])
def test_decoder_rows_unit_norm_after_every_step(data, arch):
    acts = ActivationSet(data[0])
    x = torch.from_numpy(acts.load("train", max_rows=2048)["x"])
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=32, d_sae=64, k=3))
    st = SAEStepper(m, TrainConfig(lr=1e-2))
    for i in range(5):
        st.step(x[i * 256 : (i + 1) * 256], 1.0, torch.zeros(64, dtype=torch.bool))
        if arch != "relu":
            np.testing.assert_allclose(m.W_dec.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    if arch == "relu":  # relu keeps free norms in training; the checkpoint has unit rows
        np.testing.assert_allclose(m.export_tensors()["W_dec"].norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_auxk_revives_dead_latents(data, tmp_path):
    # every step logged: latents die and revive briefly, between the default log points
    out = _train(data, tmp_path, "topk", tokens="300000", extra=["--dead-tokens", "2048", "--log-every", "1"])
    log = pd.read_parquet(out / "train_log.parquet")
    assert log["auxk"].max() > 0  # the AuxK term was active at some point


def test_same_seed_same_checkpoint_other_seed_differs(data, tmp_path):
    a = _train(data, tmp_path / "a", "topk", tokens="40000")
    b = _train(data, tmp_path / "b", "topk", tokens="40000")
    c = _train(data, tmp_path / "c", "topk", tokens="40000", extra=["--seed", "1"])
    def read(p):
        return (p / "sae.safetensors").read_bytes()

    assert read(a) == read(b)
    assert read(a) != read(c)


def test_dl_reference_trains(data, tmp_path):
    out = _train(data, tmp_path, "dl", tokens="200000")
    W = checkpoint.load_decoder(out).numpy()
    assert matched_abs_cos(W, data[1]) > 0.9


def _train_cli(data, out, tokens, *extra):
    p = _cli("train", "--activations", str(data[0]), "--arch", "isae", *FAST, "--decay", "linear",
             "--tokens", tokens, "--out", str(out), *extra)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr.decode()
    return json.loads(stdout), stderr.decode()


def test_too_short_a_run_warns_on_stderr(data, tmp_path):
    # 196 steps: the FVU is still falling fast at the start of the lr decay (step 156).
    summary, err = _train_cli(data, tmp_path / "short", "100000")
    cfg = json.loads((tmp_path / "short" / "cfg.json").read_text())
    assert summary["converged"] is False and cfg["converged"] is False
    assert summary["fvu_trend"] == pytest.approx(cfg["fvu_trend"])
    assert summary["fvu_trend"] > 3 * TrainConfig.converged_below
    assert summary["fvu_trend_steps"] == [117, 156]  # the 20 % of steps before the decay
    warning = [ln for ln in err.splitlines() if "has not converged" in ln]
    assert len(warning) == 1, err
    assert f"{100 * summary['fvu_trend']:.1f} %" in warning[0] and "--tokens" in warning[0]


def test_converged_run_does_not_warn(isae_run):
    out, summary, err = isae_run
    cfg = json.loads((out / "cfg.json").read_text())
    assert summary["converged"] is True and cfg["converged"] is True
    assert summary["fvu_trend"] < TrainConfig.converged_below
    assert "has not converged" not in err


def _log(fvu_of_step, steps):
    return pd.DataFrame({"step": np.arange(steps), "fvu": [fvu_of_step(s) for s in range(steps)]})


def test_convergence_window_leaves_out_the_final_decay():
    # Flat at 0.3 until the decay starts at step 800, then 20 % lower by the end: the decay
    # alone, on a run that has stopped moving. Over the last 20 % it would read 0.25.
    tcfg = TrainConfig(tokens=1000 * 64, batch_size=64, decay="linear")
    log = _log(lambda s: 0.3 if s < 800 else 0.3 * (1 - 0.2 * (s - 800) / 199), 1000)
    c = run_convergence(log, tcfg, 1000)
    assert c["fvu_trend_steps"] == [600, 800]
    assert c["fvu_trend"] == pytest.approx(0.0, abs=1e-12) and c["converged"] is True
    assert fvu_trend(log) > 0.2
    # With a constant rate the window is the last 20 %.
    const = run_convergence(log, TrainConfig(tokens=64000, batch_size=64, decay="constant"), 1000)
    assert const["fvu_trend_steps"] == [800, 1000] and const["converged"] is False


def test_a_rising_fvu_has_not_converged(caplog):
    # Rises linearly by 10 % over steps 600-800: the trend is negative, its size is not small.
    tcfg = TrainConfig(tokens=1000 * 64, batch_size=64)
    log = _log(lambda s: 0.3 * (1 + 0.1 * min(max(s - 600, 0), 200) / 200), 1000)
    with caplog.at_level(logging.WARNING):
        c = convergence_report(tcfg, log, 1000, Path("run"))
    assert c["fvu_trend"] < -0.05 and c["converged"] is False
    assert "rose by" in caplog.text and "--tokens" in caplog.text


def test_default_log_cadence_gives_enough_rows(data, tmp_path):
    # 586 steps: every 2nd step logged, plus the last; 40 steps: every step.
    long_log = pd.read_parquet(_train(data, tmp_path / "a", "isae", tokens="300000")
                               / "train_log.parquet")
    assert len(long_log) == 294 and long_log["step"].iloc[-1] == 585
    short_log = pd.read_parquet(_train(data, tmp_path / "b", "isae", tokens="20000")
                                / "train_log.parquet")
    assert list(short_log["step"]) == list(range(40))


def test_lr_schedule_shape():
    t = TrainConfig(warmup_frac=0.1, decay="linear")
    m = [lr_multiplier(s, 100, t) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert m[50] == 1.0 and m[99] == pytest.approx(0.05) and m[90] < m[85]


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "isae.cli.main", "-q", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_after_sigkill_equals_uninterrupted(data, tmp_path):
    args = ["train", "--activations", str(data[0]), "--arch", "isae-iter", *FAST,
            "--tokens", "600000", "--checkpoint-every", "20", "--checkpoint-seconds", "0", "--log-every", "5"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0
    out = tmp_path / "killed"
    state = tmp_path / "killed.resume" / "state.safetensors"
    p = _cli(*args, "--out", str(out))
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let it get past the save, mid-run
    assert p.poll() is None, "run finished before it could be killed; raise --tokens"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()  # nothing that looks like a finished checkpoint
    assert state.exists()
    p2 = _cli(*args, "--out", str(out))
    _, err = p2.communicate(timeout=300)
    assert p2.returncode == 0, err.decode()
    assert (out / "sae.safetensors").read_bytes() == (tmp_path / "ref" / "sae.safetensors").read_bytes()
    la = pd.read_parquet(out / "train_log.parquet")
    lb = pd.read_parquet(tmp_path / "ref" / "train_log.parquet")
    pd.testing.assert_frame_equal(la.drop(columns="wall_s"), lb.drop(columns="wall_s"))


@pytest.mark.parametrize("seconds", [0.0, 5.0, 1e9])
def test_resume_saves_wait_for_their_steps_and_their_seconds(data, tmp_path, monkeypatch, seconds):
    """A resume state is saved at a multiple of checkpoint_every steps, and only once
    checkpoint_seconds have passed since the start or the last save (a clock that ticks one
    second a reading here); 0 saves at every multiple, as before the time gate."""
    clock = iter(range(10**6))
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: float(next(clock)))
    saved = []
    monkeypatch.setattr(trainer, "_save_state", lambda rdir, st: saved.append((st["step"], st["wall"])))
    cfg = SAEConfig(d_in=data[1].shape[1], d_sae=64, k=3, arch="topk", seed=0)
    tcfg = TrainConfig(tokens=512 * 60, batch_size=512, lr=1e-2, checkpoint_every=4,
                       checkpoint_seconds=seconds, log_every=1000)
    trainer.train(data[0], cfg, tcfg, tmp_path / "out")
    steps = [s for s, _ in saved]
    assert all(s % 4 == 0 and s < 60 for s in steps)
    if seconds == 0:
        assert steps == list(range(4, 60, 4))
    elif seconds == 5:
        assert 2 <= len(steps) < len(range(4, 60, 4))
        walls = [0.0] + [w for _, w in saved]
        assert all(b - a >= 5 for a, b in zip(walls, walls[1:]))
    else:
        assert steps == []
    assert (tmp_path / "out" / "sae.safetensors").exists()  # the run itself finished


# ------------------------------------------------------------------ bad input


def _bad(capsys, args, pattern):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("isae") and pattern in lines[0], err


def test_missing_activation_dir(capsys, tmp_path):
    _bad(capsys, ["train", "--activations", str(tmp_path / "nope"), "--arch", "topk",
                  "--out", str(tmp_path / "o")], "does not exist")


def test_activation_dir_without_meta(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    _bad(capsys, ["train", "--activations", str(tmp_path / "a"), "--arch", "topk",
                  "--out", str(tmp_path / "o")], "no meta.json")


def test_nan_in_shard_names_file_and_row(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "s"
    signed_sparse_set(path, rows=2000, rows_per_shard=1000)
    shard = sorted(path.glob("part-*.parquet"))[1]
    t = pq.read_table(shard)
    x = t.column("x").combine_chunks().values.to_numpy().reshape(-1, 32).copy()
    x[17, 3] = np.nan
    t = t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 32))
    pq.write_table(t, shard)
    _bad(capsys, ["train", "--activations", str(path), "--arch", "topk", "--k", "3", "--width", "64",
                  "--tokens", "20000", "--batch-size", "256", "--out", str(tmp_path / "o")],
         f"{shard.name}: non-finite activation (NaN or Inf) in row 17")
    assert not (tmp_path / "o").exists()


def test_resume_with_other_dimension(capsys, tmp_path, data):
    out = tmp_path / "o"
    p = _cli("train", "--activations", str(data[0]), "--arch", "topk", *FAST, "--tokens", "100000000",
             "--checkpoint-every", "2", "--checkpoint-seconds", "0", "--out", str(out))
    state = tmp_path / "o.resume" / "state.safetensors"
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    other = tmp_path / "d16"
    signed_sparse_set(other, d=16, atoms=64, rows=3000)
    _bad(capsys, ["train", "--activations", str(other), "--arch", "topk", "--k", "3", "--width", "128",
                  "--batch-size", "512", "--lr", "1e-2", "--tokens", "100000000", "--checkpoint-every", "2", "--checkpoint-seconds", "0",
                  "--out", str(out)], "dimension 32")


def test_k_not_below_width(capsys, tmp_path, data):
    _bad(capsys, ["train", "--activations", str(data[0]), "--arch", "topk", "--k", "64", "--width", "64",
                  "--out", str(tmp_path / "o")], "k must satisfy")


@pytest.mark.parametrize("arch", ["topkk", "isae+wide"])
def test_unknown_arch_or_switch_cli(capsys, tmp_path, data, arch):
    _bad(capsys, ["train", "--activations", str(data[0]), "--arch", arch, "--out", str(tmp_path / "o")],
         "unknown")


def test_unwritable_out(capsys, tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _bad(capsys, ["train", "--activations", str(data[0]), "--arch", "topk", *FAST, "--tokens", "1000",
                  "--out", str(blocker / "ckpt")], "cannot create")


# ------------------------------------------------------------------ the name decides


def test_encoder_steps_that_contradict_the_arch_are_refused(capsys, tmp_path, data):
    out = tmp_path / "o"
    _bad(capsys, ["train", "--activations", str(data[0]), "--arch", "topk", "--encoder-steps", "3",
                  *FAST, "--tokens", "2048", "--out", str(out)],
         "--encoder-steps 3 contradicts --arch topk, which runs 0; ask for the steps by name: topk+iter3")
    _bad(capsys, ["train", "--activations", str(data[0]), "--arch", "isae,isae-iter", "--encoder-steps",
                  "0", *FAST, "--tokens", "2048", "--out", str(tmp_path / "{arch}")],
         "contradicts --arch isae-iter, which runs 3; ask for the steps by name: isae")
    _bad(capsys, ["train", "--activations", str(data[0]), "--arch", "relu", "--encoder-steps", "1",
                  *FAST, "--tokens", "2048", "--out", str(out)], "relu runs no thresholding steps")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_suffix_asks_for_steps_and_the_flag_may_repeat_them(data, tmp_path):
    a = _train(data, tmp_path / "a", "topk+iter2", tokens="4096")
    b = _train(data, tmp_path / "b", "topk+iter2", tokens="4096", extra=["--encoder-steps", "2"])
    cfg = json.loads((a / "cfg.json").read_text())
    assert (cfg["arch"], cfg["kind"], cfg["signed"], cfg["encoder_steps"]) == ("topk+iter2", "topk", False, 2)
    assert (a / "sae.safetensors").read_bytes() == (b / "sae.safetensors").read_bytes()
    assert checkpoint.load(a).model.cfg.encoder_steps == 2


@pytest.mark.parametrize("edit,says", [
    ({"encoder_steps": 3}, "arch 'topk' means encoder_steps=0, not encoder_steps=3"),
    ({"kind": "dl"}, "arch 'topk' means kind='topk', not kind='dl'"),
    ({"tied": True, "signed": True}, "means signed=False, tied=False, not signed=True, tied=True"),
    ({"arch": "isae"}, "arch 'isae' means signed=True, tied=True, bias='none'"),
])
def test_a_cfg_json_that_contradicts_its_arch_is_refused_when_loaded(capsys, tmp_path, data, edit, says):
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=32, d_sae=64, k=3, seed=1))
    ck = checkpoint.save(m, tmp_path / "ck", ActivationSet(data[0]).normalizer())
    assert checkpoint.load(ck).model.cfg == m.cfg
    cfg = json.loads((ck / "cfg.json").read_text())
    (ck / "cfg.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(UserError, match="cfg.json: arch") as e:
        checkpoint.load(ck)
    assert says in str(e.value) and "\n" not in str(e.value)
    _bad(capsys, ["eval", str(ck), "--activations", str(data[0])], says)


def test_switches_left_out_of_a_config_come_from_its_arch():
    for name in ("topk", "relu", "isae", "isae-iter", "dl", "isae-tied", "topk+signed+iter7"):
        cfg = SAEConfig(d_in=8, d_sae=16, k=2, arch=name)
        assert {f: getattr(cfg, f) for f in parse_arch(name).fields} == parse_arch(name).fields
    with pytest.raises(UserError, match="ask for the steps by name: isae-tied"):
        SAEConfig(d_in=8, d_sae=16, k=2, arch="isae-iter-tied", encoder_steps=0)


# ------------------------------------------------------------------ the op set the trainer is given


class _Spy(ReferenceOps):
    """The reference maths, recording what the trainer asks of its op set."""

    def __init__(self) -> None:
        self.asked: list = []

    def step_graphs(self, body, prepare, device):
        self.asked.append(torch.device(device))
        return None


@pytest.mark.slow
def test_the_trainer_runs_on_the_op_set_it_is_given(data, tmp_path, monkeypatch):
    """Each model asks its op set whether to replay its step (TopK family only, on the
    model's device); the trainer imports no op set of its own (tests/test_walls.py)."""
    spy = _Spy()
    monkeypatch.setattr(trainer, "select_ops", lambda device: spy)
    cfgs = [SAEConfig.from_arch(a, d_in=32, d_sae=64, k=3, seed=0) for a in ("topk", "relu", "isae", "dl")]
    outs = [tmp_path / c.arch for c in cfgs]
    trainer.train_many(data[0], cfgs, TrainConfig(tokens=2048, batch_size=256), outs, resume=False)
    assert spy.asked == [torch.device("cpu")] * 2  # topk and isae; relu and dl step eagerly
    monkeypatch.undo()
    again = trainer.train_many(data[0], cfgs, TrainConfig(tokens=2048, batch_size=256),
                               [tmp_path / f"ref-{c.arch}" for c in cfgs], resume=False)
    for c, r in zip(cfgs, again):
        assert (tmp_path / c.arch / "sae.safetensors").read_bytes() == (Path(r["out"]) / "sae.safetensors").read_bytes()


def test_op_sets_offer_step_replay_only_where_they_can(monkeypatch):
    def body(x, dead, width):
        return {}

    assert REFERENCE.step_graphs(body, lambda: None, torch.device("cuda")) is None
    assert FastOps(cuda_graphs=True).step_graphs(body, lambda: None, torch.device("cpu")) is None
    assert FastOps(cuda_graphs=False).step_graphs(body, lambda: None, torch.device("cuda")) is None
    replay = FastOps(cuda_graphs=True).step_graphs(body, lambda: None, torch.device("cuda"))
    widths = []
    monkeypatch.setattr(type(replay), "__call__", lambda self, x, dead, width: widths.append(width) or {})
    dead = torch.zeros(24576, dtype=torch.bool)
    replay.replay(torch.zeros(2, 3), dead, 1229)
    replay.replay(torch.zeros(2, 3), dead, 0)
    assert widths == [1536, 0]  # AuxK's widths on the grid of cuda_graphs.aux_bucket


def test_refresh_copies_makes_the_fast_paths_decoder_copy_current():
    from isae.gpu.ops import low

    W = torch.nn.Parameter(torch.randn(40, 8))
    first = low(W).clone()
    with torch.no_grad():
        W.mul_(2.0)  # a step's update: the copy is stale until refreshed
    buf = W._isae_low[1]
    assert torch.equal(buf, first)
    FastOps().refresh_copies(W)
    assert W._isae_low[1] is buf  # refreshed in place: a recorded step reads this buffer
    assert torch.equal(buf, W.detach().to(torch.bfloat16))
    REFERENCE.refresh_copies(W)  # the reference keeps no copies: nothing to do


# ------------------------------------------------------------------ one normalisation


def test_normalizer_maps_arrays_and_tensors_alike_and_back():
    from isae.data.activations import Normalizer

    rng = np.random.default_rng(0)
    mean = rng.standard_normal(16).astype(np.float32)
    norm = Normalizer(mean=mean, scale=0.37)
    x = (rng.standard_normal((50, 16)) * 3).astype(np.float32)
    ref = (x.astype(np.float64) - mean.astype(np.float64)) / 0.37
    a = norm.forward(x)
    t = norm.forward(torch.from_numpy(x))
    assert isinstance(a, np.ndarray) and isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(t.numpy(), a)  # one formula for both kinds
    np.testing.assert_allclose(norm.inverse(t).numpy(), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.inverse(a), x, rtol=1e-5, atol=1e-5)


def test_checkpoint_and_api_normalise_with_the_sets_normalizer(data, tmp_path):
    import isae

    acts = ActivationSet(data[0])
    x = torch.from_numpy(acts.load("heldout", max_rows=200)["x"])
    norm = acts.normalizer()
    path = checkpoint.save(SparseCoder(SAEConfig.from_arch("isae", d_in=32, d_sae=64, k=3)),
                           tmp_path / "ck", norm)
    ck = checkpoint.load(path)
    assert torch.equal(ck.normalize(x), norm.forward(x))
    x_hat = ck.model.decode(ck.model.encode(norm.forward(x)))
    assert torch.equal(ck.reconstruct_raw(x), norm.inverse(x_hat))
    sae = isae.load(path)
    z = sae.encode(x)
    assert torch.allclose(sae.decode(z), norm.inverse(x_hat), atol=1e-5)


# ------------------------------------------------------------------ data replaced while training


def _regenerate_at(monkeypatch, path: Path, step: int) -> None:
    """Regenerate the activation set (another seed, same shape) when training reaches ``step``."""
    real = trainer.lr_multiplier

    def lr(s, total, tcfg):
        if s == step:
            signed_sparse_set(path, rows=4000, rows_per_shard=1000, seed=9)
        return real(s, total, tcfg)

    monkeypatch.setattr(trainer, "lr_multiplier", lr)


@pytest.mark.parametrize("every", ["1000", "4"])
def test_a_set_regenerated_during_training_is_refused(capsys, tmp_path, monkeypatch, every):
    """Checked before the checkpoint is written, and (every 4 steps) at each resume save."""
    path = tmp_path / "set"
    signed_sparse_set(path, rows=4000, rows_per_shard=1000)
    out = tmp_path / "ck"
    args = ["train", "--activations", str(path), "--arch", "topk", "--k", "3", "--width", "64",
            "--batch-size", "256", "--tokens", "4096", "--checkpoint-every", every, "--checkpoint-seconds", "0", "--out", str(out)]
    _regenerate_at(monkeypatch, path, 6)
    _bad(capsys, args, "changed while training")
    assert not out.exists()
    monkeypatch.undo()
    if every == "4":  # the state saved at step 4, before the change, belongs to the old set
        assert (tmp_path / "ck.resume" / "state.safetensors").is_file()
        _bad(capsys, args, "was made on other data")
    assert main(["-q", "train", *args[1:], "--no-resume"]) == 0
    assert (out / "sae.safetensors").is_file() and not (tmp_path / "ck.resume").exists()
