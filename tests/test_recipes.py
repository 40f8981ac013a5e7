"""Training recipes (isae.models.config.RECIPES) and sparsify's AuxK normalisation: the
weighted AuxK term against sparsify's formula in float64, the recipes' settings and the
training record of a run (unchanged for the defaults)."""

from __future__ import annotations

import pytest
import torch
from opsets import OP_SETS
from opsets import model as opset_model

from isae.errors import UserError
from isae.models.config import BASE_LR, RECIPES, SAEConfig, TrainConfig
from isae.models.reference import (
    REFERENCE,
    auxk_select,
    auxk_weight,
    fit_to,
    sparse_decode,
    topk_select,
)
from isae.models.sparse_coder import SparseCoder
from isae.training.group import group_runs
from isae.training.steppers import Run
from isae.training.trainer import SAEStepper, _train_fingerprint


def _sparsify_auxk(x, model, dead, alpha):
    """EleutherAI sparsify's AuxK term, written out in float64 from its definition: the top
    d/2 ReLU pre-activations among the dead latents decode the residual e = x - x_hat; the
    loss is alpha min(n_dead / (d/2), 1) ||e_hat - e||^2 / ||x - mean(x)||^2."""
    X = x.double()
    W_enc = model.encoder_weight.detach().double()
    W_dec = model.W_dec.detach().double()
    b_dec, b_enc = model.b_dec.detach().double(), model.b_enc.detach().double()
    pre = torch.relu((X - b_dec) @ W_enc + b_enc)
    val, idx = pre.topk(model.cfg.k, dim=-1)
    x_hat = torch.zeros_like(X).index_add_(0, torch.arange(len(X)).repeat_interleave(model.cfg.k),
                                           val.reshape(-1, 1) * W_dec[idx.reshape(-1)]) + b_dec
    e = X - x_hat
    k_aux_nominal = X.shape[1] // 2
    n_dead = int(dead.sum())
    k_aux = min(k_aux_nominal, n_dead)
    masked = torch.where(dead, pre, torch.full_like(pre, -1.0))
    aval, aidx = masked.topk(k_aux, dim=-1)
    e_hat = (aval.unsqueeze(-1) * W_dec[aidx]).sum(1)
    total = (X - X.mean(0)).pow(2).sum()
    return alpha * min(n_dead / k_aux_nominal, 1.0) * float((e_hat - e).pow(2).sum() / total)


@pytest.mark.parametrize("n_dead", [3, 40])  # fewer than d / 2 = 8 dead, and more
def test_input_normalised_auxk_is_sparsifys_loss(n_dead):
    torch.manual_seed(0)
    cfg = SAEConfig.from_arch("topk", d_in=16, d_sae=64, k=4, seed=1)
    model = SparseCoder(cfg)
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.b_enc.normal_(0, 0.1)
    x = torch.randn(256, 16) * torch.linspace(0.2, 2.0, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    out = model(x, dead=dead)
    alpha = 1 / 32
    w = auxk_weight(alpha, "input", x, out.x_hat, dead, 16 // 2)
    assert float(w * out.auxk.detach()) == pytest.approx(_sparsify_auxk(x, model, dead, alpha), rel=1e-4)
    # Residual normalisation (Gao et al.): the weight is alpha itself.
    assert auxk_weight(alpha, "residual", x, out.x_hat, dead, 8) == alpha
    assert auxk_weight(alpha, "input", x, out.x_hat, None, 8) == alpha


@pytest.mark.parametrize("recipe", ["isae", "sparsify"])
def test_the_step_weighs_auxk_by_the_recipe(recipe):
    torch.manual_seed(0)
    model = SparseCoder(SAEConfig.from_arch("topk", d_in=16, d_sae=64, k=4, seed=1))
    tcfg = TrainConfig.from_recipe(recipe)
    x = torch.randn(128, 16)
    dead = torch.arange(64) < 20
    with torch.no_grad():
        out = model(x, dead=dead)
        want = out.fvu + auxk_weight(tcfg.auxk_alpha, tcfg.auxk_norm, x, out.x_hat, dead, 8) * out.auxk
    got = SAEStepper(model, tcfg).step(x, 1.0, dead)["loss"]
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_recipes_are_field_values_and_unknown_ones_are_refused():
    assert TrainConfig.from_recipe("isae") == TrainConfig()
    live = TrainConfig.from_recipe("live", tokens=1000)
    assert live.dead_tokens == 20_000 and live.tokens == 1000 and live.auxk_norm == "residual"
    sp = TrainConfig.from_recipe("sparsify")
    assert sp.dead_tokens == 10_000_000 and sp.auxk_norm == "input"
    # sparsify's rate, 2e-4 / sqrt(width / 2^14); isae's default is 4 x it.
    assert sp.learning_rate(4096) == pytest.approx(2e-4 * 2)
    assert TrainConfig().learning_rate(4096) == pytest.approx(BASE_LR * 2)
    assert TrainConfig.from_recipe("sparsify", lr=1e-3).learning_rate(4096) == 1e-3
    with pytest.raises(UserError, match="unknown training recipe"):
        TrainConfig.from_recipe("nope")
    with pytest.raises(UserError, match="auxk_norm"):
        TrainConfig(auxk_norm="batch")
    with pytest.raises(UserError, match="--base-lr"):
        TrainConfig(base_lr=0.0)
    assert set(RECIPES) >= {"isae", "live", "sparsify", "detached", "noaux"}
    # the study's 32 x d recipe differs from today's by the detached codes alone; noaux by
    # AuxK's weight alone
    assert TrainConfig.from_recipe("detached") == TrainConfig(auxk_detach="tied")
    assert TrainConfig.from_recipe("noaux").auxk_alpha == 0.0
    assert TrainConfig.from_recipe("noaux") == TrainConfig(auxk_alpha=0.0)


def test_the_training_record_keeps_its_keys_at_the_defaults():
    """A run at the defaults records what it recorded before base_lr and auxk_norm existed
    (so earlier checkpoints still match it for --reuse and resume); a run that changes them
    records them."""
    keys = {"tokens", "batch_size", "lr", "warmup_frac", "decay", "auxk_alpha", "dead_tokens",
            "shuffle_buffer", "seed"}
    assert set(_train_fingerprint(TrainConfig())) == keys
    assert set(_train_fingerprint(TrainConfig(dead_tokens=20_000))) == keys
    assert _train_fingerprint(TrainConfig.from_recipe("live"))["auxk_detach"] == "tied"
    sp = _train_fingerprint(TrainConfig.from_recipe("sparsify"))
    assert sp["base_lr"] == 2e-4 and sp["auxk_norm"] == "input"


def _auxk_backward(ops: str, arch: str, seed: int, **aux):
    """A small coder on op set ``ops`` (d 24, 160 latents, k 4), 256 random rows, about 30 %
    of its latents dead, and AuxK's loss alone backpropagated with the forward options
    ``aux`` (aux_detach, aux_fit): (model, x, dead, output)."""
    torch.manual_seed(seed)
    d, n, k = 24, 160, 4
    m = opset_model(arch, d, n, k, OP_SETS[ops]())
    x = torch.randn(256, d)
    dead = torch.rand(n) < 0.3
    out = m(x, dead=dead, **aux)
    out.auxk.backward()
    return m, x, dead, out


def _float64_auxk(m, x, dead, grad: str):
    """m's AuxK inputs recomputed in float64 from its weights: (W_dec, encoder weight, the
    residual e, AuxK's codes), with ``grad`` ("decoder" or "encoder") the one weight that
    requires a gradient; the main codes and e carry none."""
    W = m.W_dec.detach().double().requires_grad_(grad == "decoder")
    enc = m.encoder_weight.detach().double().requires_grad_(grad == "encoder")
    X, b_dec = x.double(), m.b_dec.detach().double()
    pre = (X - b_dec) @ enc + m.b_enc.detach().double()
    codes = topk_select(pre.detach(), m.cfg.k, m.cfg.signed)
    e = X - (sparse_decode(codes, W.detach()) + b_dec)
    aux = auxk_select(pre, dead, min(x.shape[1] // 2, int(dead.sum())), m.cfg.signed)
    return W, enc, e, aux


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("arch", ["topk", "isae"])
def test_detached_auxk_moves_the_dead_decoder_rows_only(ops, arch):
    """With aux_detach, AuxK's gradient is the float64 gradient of
    ||e - sum_j z_j W_dec[j]||^2 / ||e - mean(e)||^2 in W_dec alone, the codes z and the
    residual e held fixed: nothing reaches the encoder, its bias, or a live latent's row."""
    m, x, dead, _ = _auxk_backward(ops, arch, seed=0, aux_detach=True)
    # The reference, in float64 from the same weights.
    W, _, e, aux = _float64_auxk(m, x, dead, grad="decoder")
    loss = (e - sparse_decode(aux, W)).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    loss.backward()
    got = m.W_dec.grad.double()
    assert float(got[~dead].abs().max()) == 0.0
    cos = torch.nn.functional.cosine_similarity(got.flatten(), W.grad.flatten(), dim=0)
    assert float(cos) > (0.999999 if ops == "reference" else 0.97)
    if m.W_enc is not None:
        assert m.W_enc.grad is None or float(m.W_enc.grad.abs().max()) == 0.0
        assert m.b_enc.grad is None or float(m.b_enc.grad.abs().max()) == 0.0


def test_fit_to_is_each_rows_least_squares_scale():
    """fit_to scales each row of e_hat by the float64 least-squares solution of
    min_c ||err - c e_hat||^2, leaves a zero row at zero, and carries no gradient through
    the scale: the gradient in e_hat is c x the gradient of ||err - c e_hat||^2 with c held."""
    torch.manual_seed(0)
    err, e_hat = torch.randn(7, 5), torch.randn(7, 5) * 3
    e_hat[2] = 0
    got = fit_to(err, e_hat)
    E, H = err.double(), e_hat.double()
    for r in range(7):
        c = 0.0 if r == 2 else float(torch.linalg.lstsq(H[r, :, None], E[r, :, None]).solution)
        assert torch.allclose(got[r].double(), c * H[r], rtol=1e-5, atol=1e-6), r
    e_hat.requires_grad_(True)
    (err - fit_to(err, e_hat)).pow(2).sum().backward()
    c = (E * H).sum(1, keepdim=True) / H.pow(2).sum(1, keepdim=True).clamp_min(1e-300)
    want = -2 * c * (E - c * H)
    assert torch.allclose(e_hat.grad.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("arch", ["topk", "isae-tied"])
def test_fitted_auxk_is_the_residuals_fitted_decode(ops, arch):
    """With aux_fit, AuxK is sum_r ||e_r - c_r e_hat_r||^2 / ||e - mean(e)||^2 with c_r the
    row's least-squares scale (float64, from the same weights), never above the unfitted
    loss's share of the residual, and its gradient reaches the encoder (the codes carry it)
    as the float64 gradient with c held fixed."""
    m, x, dead, out = _auxk_backward(ops, arch, seed=1, aux_fit=True)
    W, enc, e, aux = _float64_auxk(m, x, dead, grad="encoder")
    e_hat = sparse_decode(aux, W)
    c = ((e * e_hat).sum(1, keepdim=True) / e_hat.pow(2).sum(1, keepdim=True)).detach()
    total = (e - e.mean(0)).pow(2).sum()
    loss = (e - c * e_hat).pow(2).sum() / total
    tol = 1e-5 if ops == "reference" else 0.03
    assert abs(float(out.auxk.detach()) / float(loss.detach()) - 1) < tol
    assert float(loss.detach()) <= float(e.pow(2).sum().detach() / total.detach()) + 1e-12
    loss.backward()
    got = m.encoder_weight.grad.double()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), enc.grad.flatten(), dim=0)
    assert float(cos) > (0.99999 if ops == "reference" else 0.97)


def test_which_coders_fit():
    """auxk_fit picks coders as auxk_detach does, and never one whose codes are detached."""
    cfgs = {a: SAEConfig.from_arch(a, d_in=8, d_sae=32, k=2) for a in ("topk", "isae", "isae-tied")}
    assert not any(TrainConfig().auxk_fits(c) for c in cfgs.values())
    signed = TrainConfig(auxk_fit="signed")
    assert [signed.auxk_fits(c) for c in cfgs.values()] == [False, True, True]
    assert all(TrainConfig(auxk_fit="all").auxk_fits(c) for c in cfgs.values())
    # gpu.yaml's pairing: tied coders detached (isae), the untied signed one fitted.
    paired = TrainConfig(auxk_fit="signed", auxk_detach="tied")
    assert [paired.auxk_fits(c) for c in cfgs.values()] == [False, False, True]
    with pytest.raises(UserError, match="auxk_fit"):
        TrainConfig(auxk_fit="tied")


def test_which_coders_detach():
    tied = SAEConfig.from_arch("isae", d_in=8, d_sae=32, k=2)
    untied = SAEConfig.from_arch("topk", d_in=8, d_sae=32, k=2)
    live, sp = TrainConfig.from_recipe("live"), TrainConfig.from_recipe("sparsify")
    assert live.auxk_detaches(tied) and not live.auxk_detaches(untied)
    assert sp.auxk_detaches(tied) and sp.auxk_detaches(untied)
    assert not TrainConfig().auxk_detaches(tied)
    signed = TrainConfig(auxk_detach="signed")
    for arch, detaches in (("topk", False), ("isae", True), ("isae-tied", True),
                           ("topk+signed", True), ("isae-signed", False)):
        cfg = SAEConfig.from_arch(arch, d_in=8, d_sae=32, k=2)
        assert signed.auxk_detaches(cfg) == detaches == cfg.signed, arch
    with pytest.raises(UserError, match="auxk_detach"):
        TrainConfig(auxk_detach="decoder")


def test_the_stacked_group_leaves_out_what_it_does_not_compute(tmp_path):
    """The grouped (stacked) model computes Gao et al.'s AuxK normalisation only: under
    sparsify's AuxK no run joins it; the live recipe's detached AuxK codes (tied isae) it
    computes, so every run joins."""
    cpu = torch.device("cpu")

    def runs(archs, tcfg):
        return [Run(SAEConfig.from_arch(a, d_in=8, d_sae=40, k=3, seed=i), tcfg,
                    tmp_path / f"{a}{i}", cpu, REFERENCE) for i, a in enumerate(archs)]

    both = ["topk", "topk", "isae", "isae"]
    group = group_runs(runs(both, TrainConfig()), TrainConfig(), cpu, grouped=True)
    assert sorted(r.cfg.arch for r in group.runs) == sorted(both)
    live = TrainConfig.from_recipe("live")
    assert sorted(r.cfg.arch for r in group_runs(runs(both, live), live, cpu, grouped=True).runs) \
        == sorted(both)
    sp = TrainConfig.from_recipe("sparsify")
    assert group_runs(runs(both, sp), sp, cpu, grouped=True) is None


def test_which_coders_skip_auxk():
    it = SAEConfig.from_arch("isae-iter", d_in=8, d_sae=32, k=2)
    for arch in ("topk", "isae", "topk+iter", "isae-iter"):
        sae = SAEConfig.from_arch(arch, d_in=8, d_sae=32, k=2)
        skips = sae.encoder_steps > 0
        assert TrainConfig(auxk_skip="iter").auxk_alpha_for(sae) == (0.0 if skips else 1 / 32)
        assert TrainConfig().auxk_alpha_for(sae) == 1 / 32
    assert TrainConfig(auxk_skip="iter", auxk_alpha=0.5).auxk_alpha_for(it) == 0.0
    with pytest.raises(UserError, match="auxk_skip"):
        TrainConfig(auxk_skip="tied")
