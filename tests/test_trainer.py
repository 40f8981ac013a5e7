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
from isae.models.config import SAEConfig, TrainConfig
from isae.models.sparse_coder import SparseCoder
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
    cfg3 = SAEConfig.from_dict({**m0.cfg.to_dict(), "encoder_steps": 3})
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
            "--tokens", "600000", "--checkpoint-every", "20", "--log-every", "5"]
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
             "--checkpoint-every", "2", "--out", str(out))
    state = tmp_path / "o.resume" / "state.safetensors"
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    other = tmp_path / "d16"
    signed_sparse_set(other, d=16, atoms=64, rows=3000)
    _bad(capsys, ["train", "--activations", str(other), "--arch", "topk", "--k", "3", "--width", "128",
                  "--batch-size", "512", "--lr", "1e-2", "--tokens", "100000000", "--checkpoint-every", "2",
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
