"""The fast path's autograd functions (fast.py) against the float32 reference, on the CPU.

On a CPU tensor kernels.py computes each kernel's result with stock torch ops, so these
tests check fast.py's hand-written backward passes (segmented weight gradients, gathered
dots, AuxK on dead columns, the IHT step) without a GPU; tests/test_kernels.py checks the
Triton kernels themselves, tests/test_fast_gpu.py the whole path on CUDA.
"""

import pytest
import torch

from isae import fast
from isae.config import SAEConfig
from isae.sae import SparseCoder


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
    val, idx, _ = fast.topk_encode(x, b_dec, W_enc, b_enc, k, True)
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
