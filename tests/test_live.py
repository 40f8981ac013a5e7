"""Live-latent stability (isae.analysis.live): planted dictionaries with known answers, and
the live columns of ``isae measure`` and ``isae match`` on a trained pair with planted dead
latents."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from isae.analysis.live import fired_latents, live_chance, live_matching, live_summary
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import reconstruction_and_fired, reconstruction_metrics
from isae.cli.main import main
from isae.data.activations import ActivationSet
from isae.data.checkpoints import load, load_decoder


def _unit(W: np.ndarray) -> np.ndarray:
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def test_fired_latents_known_answer():
    val = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    idx = torch.tensor([[0, 3], [3, 2]])
    assert fired_latents(val, idx, 5).tolist() == [True, False, True, False, False]


def test_dead_random_rows_lower_the_all_latent_number_but_not_the_live_one():
    """B is a signed permutation of A on A's live atoms; each side's dead atoms are fresh
    random rows. All-latent stability drops toward chance with the dead share; the live
    number stays exactly 1, over exactly the live count."""
    rng = np.random.default_rng(0)
    d, n_live, n_dead = 16, 48, 16
    live_atoms = _unit(rng.standard_normal((n_live, d)))
    perm = rng.permutation(n_live + n_dead)
    A = np.concatenate([live_atoms, _unit(rng.standard_normal((n_dead, d)))])
    signs = rng.choice([-1.0, 1.0], n_live)[:, None]
    B_rows = np.concatenate([live_atoms * signs, _unit(rng.standard_normal((n_dead, d)))])
    B = np.empty_like(B_rows)
    B[perm] = B_rows  # B's atom perm[i] is row i
    live_a = np.arange(n_live + n_dead) < n_live
    live_b = np.zeros(n_live + n_dead, bool)
    live_b[perm[:n_live]] = True

    all_ = match_dictionaries(A, B).summary()
    live = live_summary(A, B, live_a, live_b)
    assert all_["mean_abs_cos"] < 0.95  # 16 of 64 atoms match at random
    assert live["live_mean_abs_cos"] == pytest.approx(1.0, abs=1e-12)
    assert live["live_frac_gt_0.9"] == 1.0
    assert (live["live_n_a"], live["live_n_b"], live["live_n_matched"]) == (48, 48, 48)
    # The restricted matching pairs each live atom of A with its own copy in B.
    m, ia, ib = live_matching(A, B, live_a, live_b)
    assert np.array_equal(ib[m.b], perm[ia[m.a]])


def test_a_dead_atom_cannot_take_a_live_atoms_partner():
    """A dead atom of B lying exactly on A's live atom wins the all-latent matching; keeping
    only the pairs whose two members are live would then lose that atom. Matching the live
    atoms alone pairs it with its live partner (|cos| 0.95, the float64 answer)."""
    e = np.eye(3)
    a0 = e[0]
    b0 = 0.95 * e[0] + math.sqrt(1 - 0.95**2) * e[1]
    A = np.stack([a0, e[2]])
    B = np.stack([a0, b0, e[2]])  # B's atom 0 is dead
    live_a = np.array([True, True])
    live_b = np.array([False, True, True])
    m = match_dictionaries(A, B)
    assert m.b[m.a == 0][0] == 0  # the dead atom takes a0 in the all-latent matching
    s = live_summary(A, B, live_a, live_b)
    assert s["live_n_matched"] == 2
    assert s["live_mean_abs_cos"] == pytest.approx((0.95 + 1.0) / 2, abs=1e-12)


def test_no_live_atom_and_all_live():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    s = live_summary(A, B, np.zeros(6, bool), np.ones(6, bool))
    assert s["live_n_matched"] == 0 and math.isnan(s["live_mean_abs_cos"])
    m = match_dictionaries(A, B)
    s = live_summary(A, B, np.ones(6, bool), np.ones(6, bool), matching=m)
    assert s["live_mean_abs_cos"] == m.summary()["mean_abs_cos"]
    assert s["live_frac_gt_0.7"] == m.summary()["frac_gt_0.7"]


def test_live_chance_known_answers():
    gen = torch.Generator().manual_seed(0)
    # A pool of exactly n rows: both draws are the same rows in another order.
    rows = torch.randn(10, 5, dtype=torch.float64)
    assert live_chance(10, 10, 5, gen, rows) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(live_chance(0, 10, 5, gen, rows))
    # Without rows: isotropic Gaussian atoms, far from 1 in dimension 64.
    assert live_chance(32, 40, 64, gen) < 0.6


@pytest.fixture(scope="module")
def planted(synthetic_set, tmp_path_factory):
    """A trained topk (seed 0) and a copy of it (seed 7) with 24 of its latents killed:
    an encoder bias that keeps them off every row and a random decoder row each."""
    root = tmp_path_factory.mktemp("planted")
    assert main(["-q", "train", "--activations", str(synthetic_set), "--arch", "topk",
                 "--seed", "0", "--k", "3", "--width", "128", "--tokens", "20000",
                 "--batch-size", "512", "--out", str(root / "topk" / "seed0")]) == 0
    dst = root / "topk" / "seed7"
    shutil.copytree(root / "topk" / "seed0", dst)
    t = load_file(str(dst / "sae.safetensors"))
    killed = torch.arange(0, 128, 128 // 24)[:24]
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, t["W_dec"].shape[1], generator=g)
    t["W_dec"][killed] = W / W.norm(dim=1, keepdim=True)
    t["b_enc"][killed] = -1e6
    save_file(t, str(dst / "sae.safetensors"))
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg["seed"] = 7
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return root, killed


@pytest.mark.slow
def test_measure_live_columns_on_planted_dead_latents(planted, synthetic_set, tmp_path):
    root, killed = planted
    out = tmp_path / "m"
    assert main(["-q", "measure", str(root), "--activations", str(synthetic_set),
                 "--out", str(out), "--max-rows", "500"]) == 0
    runs = pd.read_parquet(out / "runs.parquet").set_index("seed")
    pair = pd.read_parquet(out / "pairs.parquet").iloc[0]
    acts = ActivationSet(synthetic_set)
    fired = {s: reconstruction_and_fired(load(root / "topk" / f"seed{s}"), acts)[1].numpy()
             for s in (0, 7)}
    assert not fired[7][killed].any()
    assert runs.loc[7, "dead_frac"] == 1 - fired[7].mean()
    assert reconstruction_metrics(load(root / "topk" / "seed7"), acts)["dead_frac"] == \
        runs.loc[7, "dead_frac"]
    # All latents: the killed atoms are random rows now. Live latents: every live atom of
    # seed 7 is seed 0's own atom.
    assert pair["mean_abs_cos"] < 0.9
    assert pair["live_mean_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert pair["live_n_b"] == fired[7].sum() and pair["live_n_a"] == fired[0].sum()
    assert pair["live_n_matched"] == min(fired[0].sum(), fired[7].sum())
    A, B = (load_decoder(root / "topk" / f"seed{s}") for s in (0, 7))
    assert pair["live_frac_gt_0.9"] == live_summary(A, B, fired[0], fired[7])["live_frac_gt_0.9"]
    assert 0 < pair["live_chance_data_rows"] < pair["live_mean_abs_cos"]
    lat = pd.read_parquet(out / "latents.parquet")
    m = match_dictionaries(A, B)
    assert lat["live_a"].tolist() == fired[0][m.a].tolist()
    assert lat["live_b"].tolist() == fired[7][m.b].tolist()
    # The live chance level is optional.
    assert main(["-q", "measure", str(root), "--activations", str(synthetic_set),
                 "--out", str(tmp_path / "n"), "--max-rows", "500",
                 "--live-chance-rows", "0"]) == 0
    assert pd.read_parquet(tmp_path / "n" / "pairs.parquet")["live_chance_data_rows"].isna().all()
    assert main(["-q", "measure", str(root), "--activations", str(synthetic_set),
                 "--out", str(tmp_path / "n"), "--live-chance-rows", "-1"]) == 2


def test_match_live_columns(planted, synthetic_set, tmp_path, capsys):
    root, killed = planted
    assert main(["-q", "match", str(root / "topk" / "seed0"), str(root / "topk" / "seed7"),
                 "--activations", str(synthetic_set), "--out", str(tmp_path / "t.parquet")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["live_mean_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert s["mean_abs_cos"] < 0.9
    assert s["live_n_b"] <= 128 - len(killed)
    assert 0 < s["live_chance_mean_abs_cos"] < 0.9
    t = pd.read_parquet(tmp_path / "t.parquet")
    assert not t.set_index("b").loc[killed.tolist(), "live_b"].any()
