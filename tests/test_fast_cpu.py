"""The fast path's autograd functions (gpu/ops.py) against the float32 reference, on the CPU.

On a CPU tensor kernels.py computes each kernel's result with stock torch ops, so these
tests check ops.py's hand-written backward passes (segmented weight gradients, gathered
dots, AuxK on dead columns, the IHT step) without a GPU; tests/test_kernels.py checks the
Triton kernels themselves, tests/test_fast_gpu.py the whole path on CUDA.
"""

import pytest
import torch

from isae.gpu import ops as fast
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder


@pytest.fixture
def forced():
    fast.FORCE = True
    try:
        yield
    finally:
        fast.FORCE = False
        fast.ENABLED = True


def _grads(m, x, dead, use_fast):
    fast.ENABLED = use_fast
    m.zero_grad(set_to_none=True)
    out = m(x, dead)
    (out.fvu + out.auxk / 32).backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("arch", ["topk", "isae", "topk+signed", "isae-iter"])
def test_fast_functions_match_reference_gradients(forced, arch):
    torch.manual_seed(0)
    d, n, k = 48, 384, 6
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=1))
    if m.cfg.bias == "learned":
        with torch.no_grad():
            m.b_dec.normal_(0, 0.1)
            m.b_enc.normal_(0, 0.1)
    x = torch.randn(512, d)
    dead = torch.rand(n) < 0.2
    ref, g_ref = _grads(m, x, dead, False)
    got, g_got = _grads(m, x, dead, True)
    # bfloat16 pre-activations: near-ties may pick another latent in a few rows.
    assert abs(float(got.fvu) - float(ref.fvu)) / float(ref.fvu) < 0.02
    if m.cfg.kind == "topk":
        assert float(ref.auxk) > 0
        assert abs(float(got.auxk) - float(ref.auxk)) / float(ref.auxk) < 0.03
    floor = 0.9 if "iter" in arch else 0.98
    for name, g in g_ref.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g_got[name].flatten(), dim=0)
        assert cos > floor, (name, float(cos))


def test_segmented_gradients_equal_float64_dense_reference(forced):
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
def test_auxk_codes_and_their_gradients_equal_float64_reference(forced, signed):
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
def test_padded_aux_width_changes_nothing(forced, arch):
    """A fixed AuxK width larger than the dead count (what a CUDA graph uses) gives the same
    loss and gradients as reading exactly the dead columns."""
    torch.manual_seed(2)
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=24, d_sae=200, k=4, seed=3))
    x = torch.randn(256, 24)
    dead = torch.rand(200) < 0.1
    res = []
    for width in (None, int(dead.sum()) + 37):
        m.zero_grad(set_to_none=True)
        out = m(x, dead, aux_width=width)
        (out.fvu + out.auxk / 32).backward()
        res.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = res
    assert float(a.auxk) > 0
    torch.testing.assert_close(b.auxk, a.auxk, rtol=1e-6, atol=1e-7)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6)


def test_fvu_and_its_gradient_equal_float64_autograd():
    torch.manual_seed(4)
    x = torch.randn(300, 20) * 3 + 1
    x_hat = (x + 0.5 * torch.randn(300, 20)).requires_grad_()
    got, err = fast.fvu(x, x_hat)
    got.backward(torch.tensor(1.7))
    x64 = x.double()
    xh64 = x_hat.detach().double().requires_grad_()
    ref = (x64 - xh64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    (1.7 * ref).backward()
    assert abs(float(got) - float(ref)) < 1e-6 * float(ref)
    torch.testing.assert_close(err.double(), x64 - xh64.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_hat.grad.double(), xh64.grad, rtol=1e-5, atol=1e-9)
    assert not err.requires_grad


def test_normalize_keeps_the_low_copy_current(forced):
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
def test_one_decoder_buffer_equals_autograd_summing(forced, arch, monkeypatch):
    """fast.collect: the decoder's readers add into one buffer instead of each returning an
    [N, D] gradient for autograd to sum. Same sums, another order: equal to float32 rounding."""
    from isae.models import sparse_coder as sae_mod

    torch.manual_seed(2)
    d, n, k = 32, 256, 5
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=3))
    x = torch.randn(256, d)
    dead = torch.rand(n) < 0.2
    _, g_buf = _grads(m, x, dead, True)

    def autograd_sums(self):
        tied = self.W_enc is None
        return sae_mod._FastWeights(self.W_dec, self.W_dec.T if tied else self.W_enc, None, tied)

    monkeypatch.setattr(SparseCoder, "_fast_weights", autograd_sums)
    _, g_sum = _grads(m, x, dead, True)
    for name, g in g_sum.items():
        torch.testing.assert_close(g_buf[name], g, rtol=1e-5, atol=1e-6, msg=name)
