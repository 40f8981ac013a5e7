"""CUDA fast paths of the TopK family's hot loop, behind the same API as the reference.

The reference path (sae.py on the CPU) lets autograd differentiate ``topk`` + ``gather`` and
``embedding_bag``; on a GPU that costs a dense [B, N] float32 gradient, an ``index_add_`` for
the encoder weight and a float32 matmul. Here the two sparse maps get their own backward:

* encoder: pre = (x - b_dec) W_enc + b_enc in bfloat16 (float32 accumulation), TopK on it;
  backward scatters the k code gradients into a bfloat16 [B, N] matrix and forms
  dW_enc = (x - b_dec)^T G as one dense bfloat16 matmul; db_enc is a k-sparse index_add and
  db_dec = -db_enc W_enc^T needs no [B, D] gradient at all.
* decoder: x_hat = embedding_bag(idx, W_dec, val) in float32; backward forms
  dW_dec = Z^T g from the scattered codes as one bfloat16 matmul and d val by gathering the
  k selected rows.

Parameters, optimiser state, the loss and the reconstruction stay float32. The checks that
these paths match the float32 reference are tests/test_fast_gpu.py (GPU only) and
benchmarks/gpu_bench.py.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

LOW = torch.bfloat16

#: Switch for benchmarks and equivalence checks: False sends CUDA tensors down the reference path.
ENABLED = True


def enabled(x: Tensor) -> bool:
    """The fast paths serve CUDA tensors; everything else takes the reference path."""
    return ENABLED and x.is_cuda


class _TopKEncode(Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, signed: bool, only=None, pre=None):
        xc = (x - b_dec).to(LOW)
        if pre is None:
            pre = torch.addmm(b_enc.to(LOW), xc, W_enc.to(LOW))  # [B, N] bf16
        if only is not None:
            # AuxK: select among the dead latents only, on their columns alone (a far
            # smaller top-k than over all N).
            cols = only.nonzero().squeeze(1)
            sub = pre.index_select(1, cols)
            score = sub.abs() if signed else sub
            j = score.topk(k, dim=-1, sorted=False).indices
            idx = cols[j]
            val = sub.gather(-1, j).float()
            if not signed:
                val = val.relu_()
        elif signed:
            idx = pre.abs().topk(k, dim=-1, sorted=False).indices
            val = pre.gather(-1, idx).float()
        else:
            val, idx = pre.topk(k, dim=-1, sorted=False)
            val = val.float().relu_()
        ctx.save_for_backward(xc, W_enc, idx, val)
        ctx.signed = signed
        ctx.mark_non_differentiable(idx, pre)
        return val, idx, pre

    @staticmethod
    def backward(ctx, g_val: Tensor, _g_idx, _g_pre):
        xc, W_enc, idx, val = ctx.saved_tensors
        if not ctx.signed:
            g_val = g_val * (val > 0)
        B, N = xc.shape[0], W_enc.shape[1]
        G = torch.zeros(B, N, dtype=LOW, device=xc.device).scatter_(1, idx, g_val.to(LOW))
        dW = (xc.T @ G).float() if ctx.needs_input_grad[2] else None
        db_enc = torch.zeros(N, device=xc.device, dtype=torch.float32)
        db_enc.index_add_(0, idx.reshape(-1), g_val.reshape(-1).float())
        db_dec = -(db_enc @ W_enc.T) if ctx.needs_input_grad[1] else None
        return None, db_dec, dW, db_enc if ctx.needs_input_grad[3] else None, None, None, None, None


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, val: Tensor, idx: Tensor, W_dec: Tensor):
        ctx.save_for_backward(val, idx, W_dec)
        return torch.nn.functional.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        val, idx, W_dec = ctx.saved_tensors
        g_low = g.to(LOW)
        g_val = None
        if ctx.needs_input_grad[0]:
            rows = W_dec.to(LOW)[idx]  # [B, K, D]
            g_val = torch.bmm(rows, g_low.unsqueeze(-1)).squeeze(-1).float()
        dW = None
        if ctx.needs_input_grad[2]:
            B, N = val.shape[0], W_dec.shape[0]
            Z = torch.zeros(B, N, dtype=LOW, device=val.device).scatter_(1, idx, val.to(LOW))
            dW = (Z.T @ g_low).float()
        return g_val, None, dW


def topk_encode(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, signed: bool,
                only: Tensor | None = None, pre: Tensor | None = None):
    """-> (val [B, K] float32, idx [B, K], pre [B, N] bfloat16, no grad).

    only: [N] bool, select among these latents (AuxK's dead ones); pre: reuse the
    pre-activations of an earlier call on the same x.
    """
    return _TopKEncode.apply(x, b_dec, W_enc, b_enc, k, signed, only, pre)


class _ScatterDecode(Function):
    """For large k (AuxK's d/2 latents) gathering k rows per token costs more memory traffic
    than scattering the codes into a bf16 [B, N] matrix and doing one dense matmul."""

    @staticmethod
    def forward(ctx, val: Tensor, idx: Tensor, W_dec: Tensor):
        B, N = val.shape[0], W_dec.shape[0]
        Z = torch.zeros(B, N, dtype=LOW, device=val.device).scatter_(1, idx, val.to(LOW))
        W = W_dec.to(LOW)
        ctx.save_for_backward(Z, idx, W)
        return torch.mm(Z, W).float()

    @staticmethod
    def backward(ctx, g: Tensor):
        Z, idx, W = ctx.saved_tensors
        g_low = g.to(LOW)
        g_val = (g_low @ W.T).gather(1, idx).float() if ctx.needs_input_grad[0] else None
        dW = (Z.T @ g_low).float() if ctx.needs_input_grad[2] else None
        return g_val, None, dW


#: Above this many codes per row the decoder scatters and multiplies instead of gathering.
GATHER_MAX_K = 64


def sparse_decode(val: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j val_j W_dec[idx_j], float32 [B, D], with a dense-bf16-matmul backward."""
    if val.shape[1] > GATHER_MAX_K:
        return _ScatterDecode.apply(val, idx, W_dec)
    return _SparseDecode.apply(val, idx, W_dec)


@torch.no_grad()
def delta_by_squaring(
    W: Tensor, supports: Tensor, sizes: Tensor, squarings: int = 14, chunk: int = 16384
) -> Tensor:
    """δ_U = ||D_U D_U^T - I||_2 for a batch of supports, float32 on the GPU.

    Because G_U = D_U D_U^T has a unit diagonal, max(σ_max² - 1, 1 - σ_min²) is the spectral
    norm of the symmetric M = G_U - I. Squaring M ``squarings`` times (renormalising each
    time) leaves only its eigenvectors of largest |eigenvalue| (to the power 2^squarings);
    the largest column v of that power then gives |λ|max = ||M v|| / ||v||. An eigenvalue
    within a relative ε of the top one can leak in with weight ~exp(-2^squarings ε), so the
    error is below ~1/(e 2^squarings) relative (4e-5 at 14), far inside the 1e-4 target;
    the GPU test checks it against float64 SVD.

    (W: [N, D] on the GPU), (supports: [P, S] int, padding past sizes[p]), (sizes: [P]).
    Padded rows are masked out of M, so one batch holds supports of every size.
    """
    Wn = W.float() / W.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = torch.empty(supports.shape[0], device=W.device, dtype=torch.float32)
    S = supports.shape[1]
    ar = torch.arange(S, device=W.device)
    eye = torch.eye(S, device=W.device)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32: the 1e-4 check needs it
    try:
        for c in range(0, supports.shape[0], chunk):
            sup = supports[c : c + chunk].to(W.device, torch.long)
            mask = (ar[None, :] < sizes[c : c + chunk].to(W.device)[:, None]).float()  # [p, S]
            Du = Wn[sup.clamp(0, Wn.shape[0] - 1)] * mask[..., None]
            M = (Du @ Du.transpose(1, 2) - eye) * (mask[:, :, None] * mask[:, None, :])
            A = M
            for _ in range(squarings):
                A = A @ A
                A = A / A.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
            col = A.norm(dim=1).argmax(dim=1)  # [p]
            v = A.gather(2, col[:, None, None].expand(-1, S, 1))  # [p, S, 1]
            Mv = M @ v
            out[c : c + chunk] = Mv.norm(dim=(1, 2)) / v.norm(dim=(1, 2)).clamp_min(1e-30)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return out
