"""``isae measure`` (isae.analysis.runs) and ``isae chance``: every number of the group tables
against the single-purpose function that defines it, on a small synthetic set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save_file

from isae.analysis.convergence import run_convergence
from isae.analysis.isometry import ric_report, row_supports
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import encode_flops, reconstruction_metrics
from isae.cli.main import main
from isae.data.activations import ActivationSet
from isae.data.checkpoints import INIT_FILE, TRAIN_LOG, load, load_decoder
from isae.models.config import TrainConfig


@pytest.fixture(scope="module")
def group(synthetic_set, tmp_path_factory):
    """topk and isae-iter, seeds 0 and 1, trained together (d 32, width 128, k 3)."""
    root = tmp_path_factory.mktemp("group")
    assert main(["-q", "train", "--activations", str(synthetic_set), "--arch", "topk,isae-iter",
                 "--seeds", "0,1", "--k", "3", "--width", "128", "--tokens", "20000",
                 "--batch-size", "512", "--log-every", "1",
                 "--out", str(root / "{arch}" / "seed{seed}")]) == 0
    return root


@pytest.fixture(scope="module")
def measured(group, synthetic_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("measured")
    assert main(["-q", "measure", str(group), "--activations", str(synthetic_set),
                 "--out", str(out), "--max-rows", "500", "--ric-pairs", "100",
                 "--cross-archs", "topk,isae-iter", "--converged-below", "0.05"]) == 0
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("runs", "pairs", "latents")}


def test_runs_table_equals_the_single_purpose_functions(group, measured, synthetic_set):
    runs = measured["runs"].set_index(["arch", "seed"])
    assert sorted(runs.index) == [("isae-iter", 0), ("isae-iter", 1), ("topk", 0), ("topk", 1)]
    acts = ActivationSet(synthetic_set)
    truth = load_decoder(synthetic_set / "truth")
    for (arch, seed), r in runs.iterrows():
        path = group / arch / f"seed{seed}"
        ck = load(path)
        rec = reconstruction_metrics(ck, acts)
        assert r["fvu"] == rec["fvu"] and r["dead_frac"] == rec["dead_frac"]
        log = pd.read_parquet(path / TRAIN_LOG)
        c = run_convergence(log, TrainConfig(tokens=20000, batch_size=512,
                                             converged_below=0.05), 40)
        assert r["fvu_trend"] == c["fvu_trend"] and r["log_rows"] == len(log)
        assert [r["trend_start"], r["trend_end"]] == c["fvu_trend_steps"] == [24, 32]
        assert r["converged"] == c["converged"]
        assert r["steps"] == 40  # 20000 rows at 512 a step, rounded up
        assert r["truth_abs_cos"] == match_dictionaries(ck.W_dec, truth).summary()["mean_abs_cos"]
        assert r["truth_n_atoms"] == truth.shape[0]
        c = ck.model.cfg
        assert r["encode_flops"] == encode_flops(c.kind, 32, 128, 3, c.encoder_steps)
        assert 0 < r["init_abs_cos"] < 1
        # The restricted isometry on the same 500 held-out rows, the same seed.
        data = acts.load("heldout", columns=["z_idx", "z_val"], max_rows=500)
        z = ck.encode_raw(data["x"])
        true_S = (truth, row_supports(data["z_val"], data["z_idx"], truth.shape[0]))
        _, ric = ric_report(ck.W_dec, row_supports(z.val, z.idx, 128), 100, 0, k=3, truth=true_S)
        assert r["ric_observed_q50"] == ric["observed_q50"]
        assert r["ric_observed_lower_q50"] == ric["observed_lower_q50"]
        assert r["ric_truth_q50"] == ric["truth_q50"]


def test_pairs_seed_and_same_seed_arch(group, measured):
    pairs = measured["pairs"]
    seed = pairs[pairs["kind"] == "seed"]
    assert sorted(zip(seed["arch_a"], seed["seed_a"], seed["seed_b"])) == [
        ("isae-iter", 0, 1), ("topk", 0, 1)]
    arch = pairs[pairs["kind"] == "arch"]
    assert sorted(zip(arch["arch_a"], arch["arch_b"], arch["seed_a"])) == [
        ("topk", "isae-iter", 0), ("topk", "isae-iter", 1)]
    for _, p in pairs.iterrows():
        A = load_decoder(group / p["arch_a"] / f"seed{p['seed_a']}")
        B = load_decoder(group / p["arch_b"] / f"seed{p['seed_b']}")
        assert p["mean_abs_cos"] == match_dictionaries(A, B).summary()["mean_abs_cos"]
    assert seed["code_jaccard"].between(0, 1).all() and arch["code_jaccard"].isna().all()
    # Same seed = same initial dictionary: far closer than two seeds of one arch.
    assert arch["mean_abs_cos"].min() > seed["mean_abs_cos"].max()
    lat = measured["latents"]
    assert len(lat) == 2 * 128 and set(lat["arch"]) == {"topk", "isae-iter"}


def test_init_abs_cos_is_one_for_a_dictionary_that_never_moved(group, synthetic_set, tmp_path):
    ck = tmp_path / "still"
    shutil.copytree(group / "topk" / "seed0", ck)
    save_file({"W_dec": -load_decoder(ck)}, str(ck / INIT_FILE))  # signs do not count
    assert main(["-q", "measure", str(ck), "--activations", str(synthetic_set),
                 "--out", str(tmp_path / "m")]) == 0
    r = pd.read_parquet(tmp_path / "m" / "runs.parquet").iloc[0]
    assert r["init_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(r.get("ric_observed_q50", np.nan))  # --ric-pairs 0: skipped


def test_measure_bad_input_is_one_line(group, synthetic_set, tmp_path, capsys):
    assert main(["-q", "measure", str(tmp_path / "nothing"), "--activations",
                 str(synthetic_set), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a checkpoint" in err[0]
    assert main(["-q", "measure", str(group), "--activations", str(synthetic_set),
                 "--out", str(tmp_path / "o"), "--converged-below", "0"]) == 2
    assert "--converged-below" in capsys.readouterr().err


def test_chance_cli(synthetic_set, tmp_path, capsys):
    out = tmp_path / "chance.parquet"
    assert main(["-q", "chance", "--activations", str(synthetic_set), "--width", "128",
                 "--width", "64", "--draws", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    t = pd.read_parquet(out)
    assert len(t) == 2 * 3 * 2 * 2  # widths x kinds x targets x draws
    seed = t[t["target"] == "seed"].groupby(["width", "kind"])["mean_abs_cos"].mean()
    assert summary["w128_gaussian"] == pytest.approx(seed[(128, "gaussian")], abs=1e-4)
    # Training rows are sparse combinations of true atoms: drawn as a dictionary, they
    # match the truth (and each other) far better than isotropic Gaussians do.
    truth = t[t["target"] == "truth"].groupby(["width", "kind"])["mean_abs_cos"].mean()
    assert truth[(128, "data_rows")] > truth[(128, "gaussian")] + 0.1
    assert main(["-q", "chance", "--activations", str(synthetic_set), "--width", "0",
                 "--out", str(out)]) == 2
