"""Both op sets against float64 on the CPU, and the fast op set's autograd functions
(gpu/ops.py) against dense float64 algebra.

On a CPU tensor kernels.py computes each kernel's result with stock torch ops, so these
tests check ops.py's hand-written backward passes (segmented weight gradients, gathered
dots, AuxK on dead columns, the IHT step) without a GPU; tests/test_kernels.py checks the
Triton kernels themselves, tests/test_fast_gpu.py the whole path on CUDA.
"""

import pytest
import torch
from opsets import OP_SETS, check_against_float64, model, step

from isae.errors import UserError
from isae.gpu import ops as fast
from isae.gpu.ops import FastOps
from isae.models.compute import select_ops
from isae.models.config import SAEConfig
from isae.models.reference import REFERENCE, Codes, Weights
from isae.models.sparse_coder import SparseCoder


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("arch", ["topk", "isae", "topk+signed", "isae-iter", "isae-iter+sg",
                                  "topk+iter+sg"])
def test_op_sets_match_float64_forward_and_gradients(ops, arch):
    torch.manual_seed(0)
    d, n, k = 48, 384, 6
    m = model(arch, d, n, k, OP_SETS[ops]())
    x = torch.randn(512, d)
    dead = torch.rand(n) < 0.2
    check_against_float64(m, ops, x, dead)


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("arch", ["relu", "dl"])
def test_op_sets_serve_relu_and_dl_alike(ops, arch):
    """relu and dl use the op set's FVU (and dl its sparse decode) only."""
    torch.manual_seed(1)
    m = model(arch, 24, 96, 4, OP_SETS[ops]())
    x = torch.randn(128, 24)
    with torch.no_grad():
        got = m(x)
        ref = model(arch, 24, 96, 4, REFERENCE)
        ref.load_state_dict(m.state_dict())
        want = ref(x)
    assert torch.equal(got.codes.idx, want.codes.idx)
    torch.testing.assert_close(got.x_hat, want.x_hat, rtol=0, atol=0.02 if ops == "fast" else 0)


def test_select_ops_chooses_once_from_the_device_and_the_environment(monkeypatch):
    monkeypatch.delenv("ISAE_REFERENCE_OPS", raising=False)
    assert select_ops("cpu") is REFERENCE and select_ops(torch.device("cpu")) is REFERENCE
    assert isinstance(select_ops("cuda:0"), FastOps)  # building the op set needs no GPU
    monkeypatch.setenv("ISAE_REFERENCE_OPS", "0")
    assert isinstance(select_ops("cuda"), FastOps)
    monkeypatch.setenv("ISAE_REFERENCE_OPS", "1")
    assert select_ops("cuda") is REFERENCE
    monkeypatch.setenv("ISAE_REFERENCE_OPS", "yes")
    with pytest.raises(UserError, match="ISAE_REFERENCE_OPS must be 0 or 1"):
        select_ops("cuda")


def test_segmented_gradients_equal_float64_dense_reference():
    """With exactly representable inputs the selection cannot differ: compare the weight
    gradients of encode+decode with a dense float64 computation."""
    torch.manual_seed(3)
    B, d, n, k = 64, 16, 40, 4
    W_enc = torch.randn(d, n, requires_grad=True)
    W_dec = torch.randn(n, d, requires_grad=True)
    b_dec = torch.zeros(d, requires_grad=True)
    b_enc = torch.zeros(n, requires_grad=True)
    x = torch.randn(B, d)
    val, idx, _, _ = fast.topk_encode(x, b_dec, W_enc, b_enc, k, True)
    x_hat = fast.sparse_decode(val, idx, W_dec)
    g_out = torch.randn(B, d)
    (x_hat * g_out).sum().backward()
    # Reference: the same selected support, dense float64 algebra.
    xc = x.double().to(torch.bfloat16).double()  # the encoder reads x in bfloat16
    mask = torch.zeros(B, n, dtype=torch.float64).scatter_(1, idx, 1.0)
    Z = torch.zeros(B, n, dtype=torch.float64).scatter_(1, idx, val.detach().double())
    Wd = W_dec.detach().double().to(torch.bfloat16).double()
    dZ = (g_out.double() @ Wd.T) * mask
    torch.testing.assert_close(W_dec.grad.double(), Z.T @ g_out.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W_enc.grad.double(), xc.T @ dZ, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_enc.grad.double(), dZ.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_auxk_codes_and_their_gradients_equal_float64_reference(signed):
    """AuxK's codes come from the encoder's own pre-activations on the dead columns (padded
    to a fixed width with live ones, which must get nothing); their gradient joins the main
    encoder gradient. Compare with dense float64 algebra on the same selection."""
    torch.manual_seed(5)
    B, d, n, k, k_aux = 32, 16, 50, 3, 4
    W_enc = torch.randn(d, n, requires_grad=True)
    b_enc = (0.1 * torch.randn(n)).requires_grad_()
    b_dec = (0.1 * torch.randn(d)).requires_grad_()
    x = torch.randn(B, d)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[3, 7, 8, 20, 31, 44, 45]] = True
    cols, valid = fast.aux_columns(dead, 12)
    assert cols[:7].tolist() == [3, 7, 8, 20, 31, 44, 45] and valid.sum() == 7 and not valid[7:].any()
    val, idx, pre, z = fast.topk_encode(x, b_dec, W_enc, b_enc, k, signed, (cols, valid), k_aux)
    g_val, g_z = torch.randn(B, k), torch.randn(B, 12)
    ((val * g_val).sum() + (z * g_z).sum()).backward()

    xc = (x - b_dec.detach()).to(torch.bfloat16).double()
    pre64 = pre.double()  # the selection is made on these bfloat16 values
    score = pre64.abs() if signed else pre64.clamp_min(0)
    score = torch.where(dead, score, torch.tensor(-1.0, dtype=torch.float64))
    top = score.topk(k_aux, dim=1).indices
    keep = torch.zeros(B, n, dtype=torch.bool).scatter_(1, top, True) & dead
    if not signed:
        keep &= pre64 > 0
    z_ref = torch.where(keep, pre64, 0.0)
    torch.testing.assert_close(z.double(), z_ref[:, cols] * valid, rtol=0, atol=0)
    # d/dpre of the two outputs, scattered to the full width
    dpre = torch.zeros(B, n, dtype=torch.float64)
    g_main = g_val.double() * ((val.detach() > 0).double() if not signed else 1.0)
    dpre.scatter_add_(1, idx, g_main)
    dz_full = torch.zeros(B, n, dtype=torch.float64)
    dz_full[:, cols] = g_z.bfloat16().double()  # z is bfloat16, so is the gradient it gets
    dpre += dz_full * keep
    ref = xc.T @ dpre  # AuxK's share is a bfloat16 product: compare in norm
    assert float((W_enc.grad.double() - ref).norm() / ref.norm()) < 5e-3
    torch.testing.assert_close(b_enc.grad.double(), dpre.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_dec.grad.double(), -(dpre.sum(0) @ W_enc.detach().double().T),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "isae"])
@pytest.mark.parametrize("frac", [0.1, 0.01])
def test_padded_aux_width_changes_nothing(arch, frac):
    """A fixed AuxK width larger than the dead count (what a CUDA graph uses) gives the same
    loss and gradients as reading exactly the dead columns, also with fewer dead latents
    than AuxK's k (d / 2 = 12 here), where the padding's live columns must stay unused."""
    torch.manual_seed(2)
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=24, d_sae=200, k=4, seed=3), ops=FastOps())
    x = torch.randn(256, 24)
    dead = torch.rand(200) < frac
    assert 0 < int(dead.sum()) < 12 if frac < 0.05 else int(dead.sum()) > 12
    (a, ga), (b, gb) = (step(m, x, dead, width) for width in (None, int(dead.sum()) + 37))
    assert float(a.auxk.detach()) > 0
    torch.testing.assert_close(b.auxk, a.auxk, rtol=1e-6, atol=1e-7)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ops", OP_SETS)
def test_fvu_and_its_gradient_equal_float64_autograd(ops):
    torch.manual_seed(4)
    x = torch.randn(300, 20) * 3 + 1
    x_hat = (x + 0.5 * torch.randn(300, 20)).requires_grad_()
    got, err = OP_SETS[ops]().fvu(x, x_hat)
    got.backward(torch.tensor(1.7))
    x64 = x.double()
    xh64 = x_hat.detach().double().requires_grad_()
    ref = (x64 - xh64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    (1.7 * ref).backward()
    assert abs(float(got) - float(ref)) < 1e-6 * float(ref)
    torch.testing.assert_close(err.double(), x64 - xh64.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_hat.grad.double(), xh64.grad, rtol=1e-5, atol=1e-9)
    if ops == "fast":
        assert not err.requires_grad  # the residual is data for AuxK: no graph kept


@pytest.mark.parametrize("ops", OP_SETS)
def test_decoder_row_constraint_equals_float64(ops):
    """project_rows_ removes each row's radial gradient, normalize_rows_ makes unit rows."""
    torch.manual_seed(6)
    W, G = torch.randn(40, 17) * 2, torch.randn(40, 17)
    W[5] = 0.0  # a zero row stays zero (the norm's floor)
    Wn = W.double() / W.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    op = OP_SETS[ops]()
    op.normalize_rows_(W)
    torch.testing.assert_close(W.double(), Wn, rtol=0, atol=1e-6)
    ref = G.double() - (G.double() * W.double()).sum(-1, keepdim=True) * W.double()
    op.project_rows_(G, W)
    torch.testing.assert_close(G.double(), ref, rtol=0, atol=1e-5)


def test_normalize_keeps_the_low_copy_current():
    """normalize_rows_ writes W's bfloat16 copy in the same pass, into the buffer ``low``
    hands out (a recorded CUDA graph keeps reading that buffer)."""
    W = torch.nn.Parameter(torch.randn(30, 12) * 2)
    first = fast.low(W)
    fast.normalize_rows_(W)
    again = fast.low(W)
    assert again.data_ptr() == first.data_ptr()
    torch.testing.assert_close(W.detach().norm(dim=1), torch.ones(30))
    assert torch.equal(again, W.detach().bfloat16())
    with torch.no_grad():
        W.mul_(3)  # any other change: the copy is refreshed in place
    assert fast.low(W).data_ptr() == first.data_ptr() and torch.equal(first, W.detach().bfloat16())


@pytest.mark.parametrize("arch", ["topk", "isae", "isae-iter"])
def test_one_decoder_buffer_equals_autograd_summing(arch, monkeypatch):
    """fast.collect: the decoder's readers add into one buffer instead of each returning an
    [N, D] gradient for autograd to sum. Same sums, another order: equal to float32 rounding."""
    torch.manual_seed(2)
    d, n, k = 32, 256, 5
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=3), ops=FastOps())
    x = torch.randn(256, d)
    dead = torch.rand(n) < 0.2
    _, g_buf = step(m, x, dead)

    def autograd_sums(self, W_dec, W_enc, b_dec, b_enc):
        tied = W_enc is None
        return Weights(W_dec, W_dec.T if tied else W_enc, b_dec, b_enc, tied, None)

    monkeypatch.setattr(FastOps, "weights", autograd_sums)
    _, g_sum = step(m, x, dead)
    for name, g in g_sum.items():
        torch.testing.assert_close(g_buf[name], g, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- +sg


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("base", ["isae-iter", "topk+iter", "isae+iter10"])
def test_stop_gradient_steps_compute_the_same_codes(ops, base):
    """+sg runs the same steps without gradient: on the CPU (the reference, and the fast
    op set on stock ops) the codes, the reconstruction and the losses are those of the
    differentiated steps, bit for bit; only the gradients differ."""
    torch.manual_seed(7)
    d, n, k = 32, 160, 5
    full = model(base, d, n, k, OP_SETS[ops]())
    sg = model(base + "+sg", d, n, k, OP_SETS[ops]())
    sg.load_state_dict(full.state_dict())
    assert sg.cfg.iht_gradient == "final" and sg.cfg.encoder_steps == full.cfg.encoder_steps
    x, dead = torch.randn(300, d), torch.rand(n) < 0.2
    (a, ga), (b, gb) = step(full, x, dead), step(sg, x, dead)
    assert torch.equal(a.codes.idx, b.codes.idx) and torch.equal(a.codes.val, b.codes.val)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.fvu, b.fvu) and torch.equal(a.auxk, b.auxk)
    assert a.fvu_amortised is None and float(b.fvu_amortised) > float(b.fvu)  # the steps help
    assert any(not torch.equal(ga[name], gb[name]) for name in ga)
    with torch.no_grad():  # and encode() (evaluation) agrees
        assert torch.equal(full.encode(x).idx, sg.encode(x).idx)


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("arch", ["isae-iter+sg", "topk+iter+sg", "topk+signed+iter2+sg"])
def test_stop_gradient_equals_float64_reference(ops, arch):
    """The gradient +sg defines: that of the final codes' FVU with the codes as constants,
    Z^T dFVU/dx_hat into the decoder (dense float64 algebra; on the fast op set the
    reconstruction reads the bfloat16 table, and so does the reference), plus that of the
    amortised TopK codes' FVU, which is the gradient of the same model without steps (on
    the reference op set its float64 twin; on the fast one its twin on the same op set,
    whose bfloat16 encoder selects the same latents)."""
    torch.manual_seed(8)
    d, n, k = 24, 150, 4
    m = model(arch, d, n, k, OP_SETS[ops]())
    x = torch.randn(200, d)
    out, g = step(m, x, None)
    base = arch.replace("+sg", "").replace("+iter2", "").replace("+iter", "")
    twin = SparseCoder(SAEConfig.from_arch(base.replace("isae-iter", "isae"), d_in=d, d_sae=n,
                                           k=k), ops=OP_SETS[ops]())
    twin.load_state_dict(m.state_dict())
    if ops == "reference":
        twin = twin.double()
    _, want = step(twin, x.to(twin.W_dec.dtype), None)  # the amortised term
    want = {name: w.double() for name, w in want.items()}
    Wd = m.W_dec.detach().double()
    if ops == "fast":
        Wd = Wd.to(torch.bfloat16).double()
    Z = torch.zeros(200, n, dtype=torch.float64).scatter_(1, out.codes.idx,
                                                          out.codes.val.detach().double())
    x64 = x.double()
    G = -2 * (x64 - Z @ Wd - m.b_dec.detach().double()) / (x64 - x64.mean(0)).pow(2).sum()
    want["W_dec"] = want["W_dec"] + Z.T @ G
    if "b_dec" in want:
        want["b_dec"] = want["b_dec"] + G.sum(0)
    assert g.keys() == want.keys() and not out.codes.val.requires_grad
    for name, w in want.items():
        err = float((g[name].double() - w).norm() / w.norm())
        assert err < 1e-5, (name, err)


def test_iht_forward_equals_the_differentiated_steps():
    """FastOps.iht_forward (the +sg steps: two row kernels around the correlation, here on
    stock ops) gives the codes and reconstruction of iht_step applied step by step."""
    torch.manual_seed(10)
    for signed, bias in ((True, False), (False, True)):
        m = model("topk+iter" + ("+signed" if signed else ""), 20, 90, 4, FastOps())  # biases on
        if not bias:
            with torch.no_grad():
                m.b_dec.zero_()
        x = torch.randn(64, 20)
        w = m._weights()
        codes = m.ops.topk_encode(x, w, 4, signed, None, 0)[0]
        with torch.no_grad():
            got, x_got = m.ops.iht_forward(x, codes, m.ops.decode(codes, w), w, 4, signed, 0.8, 3)
            c, x_hat = Codes(codes.val, codes.idx), m.ops.decode(codes, w)
            for _ in range(3):
                c, x_hat = m.ops.iht_step(x, x_hat, c, w, 4, signed, 0.8)
        assert torch.equal(got.idx, c.idx) and torch.equal(got.val, c.val)
        assert torch.equal(x_got, x_hat)
