"""The SAE family on hand-set weights: exact answers and float64 references."""

import json

import numpy as np
import pytest
import torch

from isae.errors import UserError
from isae.models.config import SAEConfig, parse_arch
from isae.models.dictionary_learning import omp
from isae.models.sparse_coder import Codes, SparseCoder, sparse_decode, topk_select


def test_topk_select_signed_and_unsigned():
    pre = torch.tensor([[0.5, -3.0, 2.0, -0.1, 1.0]])
    s = topk_select(pre, 2, signed=True)
    assert sorted(zip(s.idx[0].tolist(), s.val[0].tolist())) == [(1, -3.0), (2, 2.0)]
    u = topk_select(pre, 2, signed=False)
    assert sorted(zip(u.idx[0].tolist(), u.val[0].tolist())) == [(2, 2.0), (4, 1.0)]


@pytest.mark.parametrize("B,N,D,K", [(4, 8, 3, 2), (7, 33, 5, 3), (16, 64, 16, 8)])
def test_sparse_decode_matches_dense_float64(B, N, D, K):
    g = torch.Generator().manual_seed(B * N)
    W = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
    val = torch.randn(B, K, generator=g)
    dense = np.zeros((B, N))
    for b in range(B):
        dense[b, idx[b].numpy()] = val[b].double().numpy()
    ref = dense @ W.double().numpy()
    got = sparse_decode(Codes(val, idx), W)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Codes(val, idx).dense(N).double().numpy(), dense, atol=0)


def _model(arch, d=4, n=6, k=2, seed=0):
    return SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=seed))


def test_hand_set_topk_forward():
    m = _model("topk", d=2, n=3, k=1)
    with torch.no_grad():
        m.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        m.W_enc.copy_(m.W_dec.T)
        m.b_dec.copy_(torch.tensor([1.0, 1.0]))
    x = torch.tensor([[1.0, 3.0], [1.0, -4.0]])  # centred: (0, 2) and (0, -5)
    with torch.no_grad():
        out = m(x)
    # Row 0: pre = (0, 2, 1.6) -> latent 1 at 2 -> x_hat = (1, 3): exact.
    # Row 1: pre = (0, -5, -4) -> ReLU kills all; topk picks a zero -> x_hat = b_dec.
    assert out.codes.idx[0, 0] == 1 and out.codes.val[0, 0] == pytest.approx(2.0)
    np.testing.assert_allclose(out.x_hat[0].numpy(), [1.0, 3.0], atol=1e-6)
    np.testing.assert_allclose(out.x_hat[1].numpy(), [1.0, 1.0], atol=1e-6)
    signed = _model("topk+signed", d=2, n=3, k=1)
    signed.load_state_dict(m.state_dict())
    with torch.no_grad():
        o2 = signed(x)
    assert o2.codes.idx[1, 0] == 1 and o2.codes.val[1, 0] == pytest.approx(-5.0)
    np.testing.assert_allclose(o2.x_hat.numpy(), x.numpy(), atol=1e-6)


def test_tied_shares_one_parameter_and_nobias_has_none():
    m = _model("isae")
    names = {n for n, _ in m.named_parameters()}
    assert names == {"W_dec"}
    assert torch.equal(m.encoder_weight, m.W_dec.T)
    assert not m.b_dec.requires_grad and float(m.b_dec.abs().sum()) == 0


def test_iht_steps_never_increase_error():
    torch.manual_seed(0)
    base = _model("isae", d=16, n=48, k=4)
    it = _model("isae-iter", d=16, n=48, k=4)
    it.load_state_dict(base.state_dict())
    x = torch.randn(256, 16)
    e0 = (x - base.decode(base.encode(x))).pow(2).sum(-1)
    e3 = (x - it.decode(it.encode(x))).pow(2).sum(-1)
    assert (e3 <= e0 + 1e-5).all()
    assert e3.mean() < 0.95 * e0.mean()  # and they do help


def test_relu_export_folds_norms_without_changing_reconstruction():
    m = _model("relu", d=5, n=9)
    with torch.no_grad():
        m.W_dec.mul_(torch.linspace(0.3, 2.0, 9)[:, None])
        m.b_enc.uniform_(-0.1, 0.1)
    x = torch.randn(32, 5)
    before = m.decode(m.encode(x))
    t = m.export_tensors()
    np.testing.assert_allclose(t["W_dec"].norm(dim=1).numpy(), 1.0, rtol=1e-6)
    m2 = _model("relu", d=5, n=9)
    m2.load_exported(t)
    np.testing.assert_allclose(m2.decode(m2.encode(x)).detach().numpy(), before.detach().numpy(), atol=1e-5)


def test_omp_recovers_exact_sparse_combination():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    D = Q[:12].float()  # 12 orthonormal atoms in R^20
    idx = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(50)])
    val = torch.randn(50, 3, generator=g)
    x = sparse_decode(Codes(val, idx), D)
    c = omp(x, D, 3)
    np.testing.assert_allclose(c.dense(12).numpy(), Codes(val, idx).dense(12).numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "arch,field,value",
    [("topk+signed", "signed", True), ("isae-tied", "tied", False), ("topk+nobias", "bias", "none"),
     ("topk+iter", "encoder_steps", 3), ("isae-iter", "encoder_steps", 3), ("isae-nobias", "bias", "learned"),
     ("topk+iter10", "encoder_steps", 10), ("isae+iter1", "encoder_steps", 1),
     ("isae-iter+iter10", "encoder_steps", 10), ("isae-iter+sg", "iht_gradient", "final"),
     ("isae", "iht_gradient", "steps")],
)
def test_arch_names_set_one_switch(arch, field, value):
    assert parse_arch(arch).fields[field] == value


@pytest.mark.parametrize(
    "name,preset,changes",
    [("topk", "topk", ""), ("isae-iter", "isae-iter", ""), ("isae-iter-tied", "isae-iter", "-tied"),
     ("isae-tied", "isae", "-tied"), ("topk+signed+iter", "topk", "+signed+iter"),
     ("isae-iter+sg", "isae-iter", "+sg"), ("isae+iter10+sg", "isae", "+iter10+sg")],
)
def test_arch_names_split_into_preset_and_changes(name, preset, changes):
    """The longest preset wins: isae-iter is a preset, not isae without iter."""
    arch = parse_arch(name)
    assert (arch.name, arch.preset, arch.changes) == (name, preset, changes)


@pytest.mark.parametrize("bad", ["topkk", "topk+sined", "isae+", "relu+signed", "topk signed",
                                 "topk+signed2", "topk-iter3", "topk+iter0", "isae+sg",
                                 "isae-iter+sg-iter", "topk+sg2"])
def test_unknown_arch_or_switch(bad):
    with pytest.raises(UserError):
        parse_arch(bad)


@pytest.mark.parametrize("name,message", [
    ("isae-iter-sg", "-sg changes nothing .*did you mean isae-iter\\+sg"),
    ("topk-signed", "-signed changes nothing"),
    ("isae-iter+iter", r"\+iter changes nothing"),
    ("isae-iter+iter3", r"\+iter3 changes nothing"),
    ("isae-iter+sg+sg", r"\+sg changes nothing"),
    ("isae+sg", "has none"),
])
def test_a_change_must_change_something(name, message):
    """Every name means one model: a switch set to what the name already has is refused
    (isae-iter-sg would otherwise silently be isae-iter), and +sg needs steps to stop."""
    with pytest.raises(UserError, match=message):
        parse_arch(name)


def test_stop_gradient_name_round_trips_through_a_checkpoint(tmp_path):
    from isae.data import checkpoints
    from isae.data.activations import Normalizer

    m = _model("isae-iter+sg", d=12, n=40, k=3)
    path = checkpoints.save(m, tmp_path / "ck", Normalizer(mean=np.zeros(12, dtype=np.float32), scale=1.0))
    ck = checkpoints.load(path)
    assert ck.model.cfg.arch == "isae-iter+sg" and ck.model.cfg.iht_gradient == "final"
    assert ck.model.cfg == m.cfg
    x = torch.randn(30, 12)
    with torch.no_grad():
        assert torch.equal(ck.model.encode(x).idx, m.encode(x).idx)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["iht_gradient"] == "final"
    # every other arch writes no such key (its cfg.json as before the switch existed), and
    # a cfg.json without it differentiates through its steps
    plain = checkpoints.save(_model("isae-iter", d=12, n=40, k=3), tmp_path / "plain",
                             Normalizer(mean=np.zeros(12, dtype=np.float32), scale=1.0))
    assert "iht_gradient" not in json.loads((plain / "cfg.json").read_text())
    assert checkpoints.load(plain).model.cfg.iht_gradient == "steps"
    cfg["arch"] = "isae-iter"  # and a name that contradicts the key is refused
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="iht_gradient"):
        checkpoints.load(path)


def test_stop_gradient_is_decided_by_the_name():
    assert SAEConfig.from_arch("isae-iter+sg", d_in=4, d_sae=8, k=2).iht_gradient == "final"
    assert SAEConfig.from_arch("isae-iter", d_in=4, d_sae=8, k=2).iht_gradient == "steps"
    with pytest.raises(UserError, match="means iht_gradient='steps', not iht_gradient='final'"):
        SAEConfig(d_in=4, d_sae=8, k=2, arch="isae-iter", iht_gradient="final")


def test_k_must_be_below_width():
    with pytest.raises(UserError, match="k must satisfy"):
        SAEConfig(d_in=4, d_sae=8, k=8)


# ----------------------------------------------------------------------------- each kind's loss


def _weights64(m):
    """The model's weights in float64 numpy: W_enc [D, N], W_dec [N, D], b_enc, b_dec."""
    return {k: t.detach().double().numpy() for k, t in (
        ("W_enc", m.encoder_weight), ("W_dec", m.W_dec), ("b_enc", m.b_enc), ("b_dec", m.b_dec))}


def test_relu_loss_is_squared_error_per_dimension_plus_weighted_l1():
    """ReLU's loss (Anthropic, April 2024) against float64: mean over rows of ||x - x_hat||^2
    / d, plus l1_coeff x mean over rows of sum_i z_i ||W_dec[i]||."""
    torch.manual_seed(0)
    m = SparseCoder(SAEConfig.from_arch("relu", d_in=6, d_sae=10, k=2, l1_coeff=0.05, seed=3))
    with torch.no_grad():
        m.W_dec.mul_(torch.rand(10, 1) * 3)  # free row norms, as training leaves them
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_(0, 0.3)
    x = torch.randn(32, 6)
    out = m(x)
    w = _weights64(m)
    xd = x.double().numpy()
    z = np.maximum((xd - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    err = xd - (z @ w["W_dec"] + w["b_dec"])
    l1 = (z * np.linalg.norm(w["W_dec"], axis=1)).sum(1).mean()
    want = (err ** 2).sum(1).mean() / 6 + 0.05 * l1
    assert (z > 0).any() and l1 > 0
    assert float(m.loss(x, out, auxk_alpha=123.0).detach()) == pytest.approx(want, rel=1e-5)  # no AuxK


def test_topk_loss_is_fvu_plus_weighted_auxk():
    """TopK's loss against float64: the FVU plus auxk_alpha x AuxK's FVU of the residual by
    the k_aux = d / 2 largest pre-activations among the dead latents."""
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=8, d_sae=20, k=2, seed=1))
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4, 5, 9, 11, 13, 17]] = True
    out = m(x, dead=dead)
    w = _weights64(m)
    xd = x.double().numpy()
    pre = (xd - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    score = np.maximum(pre, 0)
    z = np.zeros_like(pre)
    top = np.argsort(-score, axis=1)[:, :2]
    np.put_along_axis(z, top, np.take_along_axis(score, top, 1), 1)
    err = xd - (z @ w["W_dec"] + w["b_dec"])
    fvu = (err ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    aux_score = np.where(dead.numpy(), score, -1.0)
    aux_top = np.argsort(-aux_score, axis=1)[:, :4]  # k_aux = d / 2 = 4 of 7 dead
    za = np.zeros_like(pre)
    np.put_along_axis(za, aux_top, np.take_along_axis(score, aux_top, 1), 1)
    e_hat = za @ w["W_dec"]
    auxk = ((err - e_hat) ** 2).sum() / ((err - err.mean(0)) ** 2).sum()
    assert auxk > 0
    assert float(m.loss(x, out, auxk_alpha=0.25).detach()) == pytest.approx(fvu + 0.25 * auxk, rel=1e-5)


@pytest.mark.parametrize("arch", ["topk", "relu", "isae"])
def test_fired_counts_rows_where_each_latent_is_nonzero(arch):
    m = _model(arch, d=5, n=12, k=3, seed=4)
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(5))
    codes = m.encode(x)
    dense = codes.dense(12).detach().numpy()
    assert np.array_equal(m.fired(codes).numpy(), (dense != 0).sum(0))
    assert m.fired(codes).dtype == torch.int64


def test_what_each_kind_asks_of_the_trainer():
    kinds = {a: (_model(a).by_gradient, _model(a).replays_steps) for a in ("topk", "isae-iter", "relu", "dl")}
    assert kinds == {"topk": (True, True), "isae-iter": (True, True), "relu": (True, False),
                     "dl": (False, False)}


# ----------------------------------------------------------------------------- the name decides


@pytest.mark.parametrize("arch,fields,says", [
    ("topk", dict(encoder_steps=3), "ask for the steps by name: topk+iter3"),
    ("isae-iter", dict(encoder_steps=1), "ask for the steps by name: isae+iter1"),
    ("isae", dict(encoder_steps=0, tied=False), "not tied=False"),
    ("topk", dict(kind="dl"), "arch 'topk' means kind='topk', not kind='dl'"),
    ("dl", dict(kind="topk"), "arch 'dl' means kind='dl'"),
    ("relu", dict(encoder_steps=2), "relu runs no thresholding steps"),
    ("truth", dict(tied=False), "arch 'truth' means tied=True"),
])
def test_a_config_cannot_contradict_its_arch(arch, fields, says):
    with pytest.raises(UserError, match="means") as e:
        SAEConfig(d_in=4, d_sae=8, k=2, arch=arch, **fields)
    assert says in str(e.value)
    if arch != "truth":  # the same fields, agreeing with the name: accepted
        agree = {k: parse_arch(arch).fields[k] for k in fields}
        assert SAEConfig(d_in=4, d_sae=8, k=2, arch=arch, **agree) == SAEConfig(d_in=4, d_sae=8, k=2, arch=arch)
