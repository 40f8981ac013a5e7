"""The differentiated IHT step's hand-written backward (kernels.iht_grad, ops.iht_step_grad)
against autograd through the reference op set's step, in float64.

The reference chooses the new support and which rows keep it; the fused step is handed the
same choices and must give the same outputs and the same gradients for x_hat, the old
values, the decoder and its bias. tests/test_kernels.py checks the Triton kernel against
the stock-op form used here; tests/test_fast_gpu.py the whole step on CUDA.
"""

import pytest
import torch

from isae.gpu import kernels
from isae.gpu import ops as fast
from isae.models.reference import REFERENCE, Codes, topk_select


def _case(B: int, N: int, D: int, k: int, signed: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    val = torch.randn(B, k, generator=g, dtype=torch.float64)
    val = val if signed else val.abs()
    bias = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    x_hat = torch.einsum("bk,bkd->bd", val, W[idx]) + bias
    return W, x, idx, val, bias, x_hat, g


def _reference(W, x, idx, val, bias, k, signed, scale):
    """The reference step with autograd, from the codes (val, idx) and their decode:
    -> (kept codes, their decode, the leaves W, val, bias). The reference decodes the kept
    codes afresh, where the fused step passes an unchanged row's x_hat through: the same
    once x_hat is the codes' decode, as here."""
    leaves = [t.clone().requires_grad_(True) for t in (W, val, bias)]
    Wl, vl, bl = leaves
    w = REFERENCE.weights(Wl, None, bl, torch.zeros(W.shape[0], dtype=W.dtype))
    x_hat = REFERENCE.decode(Codes(vl, idx), w)
    kept, _ = REFERENCE.iht_step(x, x_hat, Codes(vl, idx), w, k, signed, scale)
    return kept, REFERENCE.decode(kept, w), leaves


def _step_size(W, x, x_hat, idx, scale):
    r = x - x_hat
    g_S = torch.einsum("bkd,bd->bk", W[idx], r)
    Dg = torch.einsum("bk,bkd->bd", g_S, W[idx])
    return scale * g_S.pow(2).sum(-1, keepdim=True) / Dg.pow(2).sum(-1, keepdim=True)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_iht_grad_matches_autograd_through_the_reference_step(signed, seed):
    B, N, D, k, scale = 40, 90, 24, 5, 0.9
    W, x, idx, val, bias, x_hat, g = _case(B, N, D, k, signed, seed)
    kept, x_k, (Wl, vl, bl) = _reference(W, x, idx, val, bias, k, signed, scale)
    # which rows took the new codes, and the support the reference chose
    took = (kept.idx != idx).any(-1) | (kept.val.detach() != val).any(-1)
    assert took.any() and not took.all(), took.sum()
    step = _step_size(W, x, x_hat, idx, scale)
    u = ((x - x_hat) @ W.T * step).scatter_add(-1, idx, val)
    new_idx = topk_select(u, k, signed).idx
    A = torch.randn(B, k, generator=g, dtype=torch.float64)
    C = torch.randn(B, D, generator=g, dtype=torch.float64)
    ((kept.val * A).sum() + (x_k * C).sum()).backward()

    val_k, idx_k, xh_k, took_k = kernels.iht_update_kept(x, x_hat, val, idx, new_idx, step, W,
                                                         bias, signed)
    assert torch.equal(took_k, took) and torch.equal(idx_k, kept.idx)
    # (the stock forms of the forward's gathered products compute in float32)
    assert torch.allclose(val_k, kept.val.detach(), rtol=0, atol=1e-6)
    assert torch.allclose(xh_k, x_k.detach(), rtol=0, atol=1e-6)

    g_old, g_xhat, wnx, wnr, wod, wor, gdg, r = kernels.iht_grad(
        x, x_hat, val, idx, new_idx, step, took, W, scale, signed, A, C)
    dW = torch.zeros_like(W)
    for wts, src, sup in ((wnx, C, new_idx), (wnr, r, new_idx), (wod, gdg, idx), (wor, r, idx)):
        dW.index_add_(0, sup.reshape(-1), (wts.unsqueeze(-1) * src.unsqueeze(1)).reshape(-1, D))
    db = (C * took.unsqueeze(-1)).sum(0)
    # and x_hat = val W[idx] + bias, the codes' decode, by hand
    g_old = g_old + torch.einsum("bkd,bd->bk", W[idx], g_xhat)
    dW.index_add_(0, idx.reshape(-1), (val.unsqueeze(-1) * g_xhat.unsqueeze(1)).reshape(-1, D))
    db = db + g_xhat.sum(0)
    for name, got, want in (("val", g_old, vl.grad),
                            ("W_dec", dW, Wl.grad), ("b_dec", db, bl.grad)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11), (
            name, (got - want).abs().max())


def test_iht_grad_without_an_output_gradient_passes_zeros():
    """A step whose codes' values feed nothing (the last one: only its reconstruction is
    read) gets g_val None; the same as a zero gradient."""
    B, N, D, k = 12, 50, 16, 4
    W, x, idx, val, bias, x_hat, g = _case(B, N, D, k, False, 3)
    new_idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    step = _step_size(W, x, x_hat, idx, 1.0)
    took = torch.rand(B, generator=g) < 0.5
    C = torch.randn(B, D, generator=g, dtype=torch.float64)
    a = kernels.iht_grad(x, x_hat, val, idx, new_idx, step, took, W, 1.0, False, None, C)
    b = kernels.iht_grad(x, x_hat, val, idx, new_idx, step, took, W, 1.0, False,
                         torch.zeros(B, k, dtype=torch.float64), C)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("N, D, k", [(120, 32, 6), (200, 600, 32)])
def test_the_fused_step_matches_the_unfused_one_through_three_steps(signed, N, D, k):
    """ops.iht_step_fused (stock ops on the CPU) against ops.iht_step_unfused (the step as
    autograd differentiates it through the gathered products), from one amortised encoding
    through three steps: the same supports, the same loss, and the same gradients for the
    decoder, its bias and the encoder; on rows the row kernels hold (FastOps.iht_step takes
    the fused step there) and on wider ones (it takes the unfused one)."""
    torch.manual_seed(0)
    B = 64
    W = torch.randn(N, D)
    W = W / W.norm(dim=1, keepdim=True)
    W_enc = W.T.clone() + 0.1 * torch.randn(D, N)
    x = torch.randn(B, D)
    ops = fast.FastOps(cuda_graphs=False)

    def unfused(*a):
        return fast.iht_step_unfused(ops, *a)

    results = []
    for step_fn in (fast.iht_step_fused, unfused, ops.iht_step):
        leaves = [t.clone().requires_grad_(True) for t in (W, W_enc, torch.zeros(D))]
        Wl, We, bl = leaves
        w = ops.weights(Wl, We, bl, torch.zeros(N))
        codes, _, _ = ops.topk_encode(x, w, k, signed, None, 0)
        x_hat = ops.decode(codes, w)
        for _ in range(3):
            codes, x_hat = step_fn(x, x_hat, codes, w, k, signed, 1.0)
        loss = (x - x_hat).pow(2).sum() / B + codes.val.pow(2).mean()
        loss.backward()
        results.append((codes.idx, loss.detach(), [t.grad for t in leaves]))
    (i_f, l_f, g_f), (i_u, l_u, g_u), (i_d, l_d, g_d) = results
    assert torch.equal(i_f, i_u)
    assert abs(float(l_f - l_u)) < 1e-5 * float(l_u)
    for name, a, b in zip(("W_dec", "W_enc", "b_dec"), g_f, g_u):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (
            name, float((a - b).abs().max()), float(b.abs().max()))
    # FastOps.iht_step: exactly one of the two, by the row's width
    i_w, l_w, g_w = (i_f, l_f, g_f) if kernels.iht_row_fits(D, k) else (i_u, l_u, g_u)
    assert torch.equal(i_d, i_w) and torch.equal(l_d, l_w)
    assert all(torch.equal(a, b) for a, b in zip(g_d, g_w))
    assert kernels.iht_row_fits(D, k) == (D < 100)
