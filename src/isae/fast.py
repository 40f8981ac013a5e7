"""CUDA fast paths of the TopK family's hot loop, behind the same API as the reference.

The reference path (sae.py on the CPU) lets autograd differentiate ``topk`` + ``gather`` and
``embedding_bag``; on a GPU that costs a dense [B, N] float32 gradient, an ``index_add_`` for
the encoder weight and a float32 matmul. Here the sparse maps get their own backward, built
on the Triton kernels of kernels.py:

* encoder: pre = (x - b_dec) W_enc + b_enc in bfloat16 (float32 accumulation), then a
  Triton top-k. Backward: dW_enc is a segmented reduction of the k code gradients over the
  latents (each latent sums its rows of x - b_dec), db_enc a k-sparse index_add, and
  db_dec = -db_enc W_enc^T needs no [B, D] gradient at all.
* decoder: x_hat = sum_j val_j W_dec[idx_j] from a bfloat16 copy of W_dec, float32
  accumulation. Backward: d val by gathered dot products, dW_dec by the same segmented
  reduction (the latents are sorted once and shared with the encoder's backward).
* AuxK gathers the dead latents' columns of the pre-activations the encoder computed anyway
  (a fixed number of columns, so a step's shapes do not depend on how many are dead), and
  its encoder gradient goes into the same [N, D] buffer as the main one.
* IHT (isae-iter) selects each new support from a dense bfloat16 correlation computed
  without gradient, and differentiates only the correlations it keeps (gathered dots).

Parameters, optimiser state, the loss and the reconstruction stay float32. The checks that
these paths match the float32 reference are tests/test_fast_cpu.py (the same functions on
stock ops), tests/test_kernels.py (Triton in interpret mode), tests/test_fast_gpu.py (GPU
only) and benchmarks/gpu_bench.py.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from . import kernels

LOW = torch.bfloat16

#: Switch for benchmarks and equivalence checks: False sends CUDA tensors down the reference path.
ENABLED = True
#: Tests set this to run the fast path's autograd functions on CPU tensors (stock-op kernels).
FORCE = False


def enabled(x: Tensor) -> bool:
    """The fast paths serve CUDA tensors; everything else takes the reference path."""
    return ENABLED and (x.is_cuda or FORCE)


def low(W: Tensor) -> Tensor:
    """A bfloat16 copy of a parameter, made once per version of it (a step casts W_dec for
    the decoder, its backward and every IHT step; the optimiser's in-place update bumps the
    version and so invalidates the copy).

    The copy keeps its buffer: it is refreshed in place, so a recorded CUDA graph that reads
    it (graphs.py) always finds the current one there.
    """
    cached = getattr(W, "_isae_low", None)
    if cached is not None and cached[0] == W._version and cached[1].shape == W.shape:
        return cached[1]
    buf = _low_buffer(W)
    buf.copy_(W.detach())
    W._isae_low = (W._version, buf)
    return buf


def _low_buffer(W: Tensor) -> Tensor:
    """The buffer that holds W's bfloat16 copy: the cached one when its shape still fits."""
    cached = getattr(W, "_isae_low", None)
    if cached is not None and cached[1].shape == W.shape:
        return cached[1]
    return torch.empty(W.shape, dtype=LOW, device=W.device)


@torch.no_grad()
def normalize_rows_(W: Tensor) -> None:
    """W's rows to unit norm in place, writing its bfloat16 copy (``low``) in the same pass:
    the next forward's decoder reads that copy instead of casting W again."""
    buf = _low_buffer(W)
    kernels.normalize_rows_(W, buf)
    torch.autograd.graph.increment_version(W)  # a Triton write is invisible to autograd
    W._isae_low = (W._version, buf)


class _FVU(Function):
    @staticmethod
    def forward(ctx, x: Tensor, x_hat: Tensor):
        err = x - x_hat
        total_var = (x.var(0, unbiased=False).sum() * x.shape[0]).clamp_min(1e-12)
        ctx.save_for_backward(err, total_var)
        ctx.mark_non_differentiable(err)
        return torch.linalg.vector_norm(err).square() / total_var, err

    @staticmethod
    def backward(ctx, g: Tensor, _g_err):
        err, total_var = ctx.saved_tensors
        return None, err * (-2.0 * g / total_var)


def fvu(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(FVU = ||x - x_hat||^2 / ||x - mean(x)||^2, the residual x - x_hat without gradient).

    Differentiable in x_hat only (x is data). Three reductions and one elementwise backward,
    where autograd on the stock expression launches about a dozen [B, D] kernels.
    """
    return _FVU.apply(x, x_hat)


def _segments(ctx, idx: Tensor, n: int) -> kernels.Segments:
    """The sorted latents of ``idx``, built once and shared by the functions that saw it."""
    holder = ctx.holder
    if "seg" not in holder:
        holder["seg"] = kernels.Segments(idx, n)
    return holder["seg"]


def _holder(idx: Tensor) -> dict:
    h = getattr(idx, "_isae_holder", None)
    if h is None:
        h = {}
        idx._isae_holder = h
    return h


def aux_columns(dead: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``width`` latent columns for AuxK, the dead ones first (in index order), and which of
    them are dead. A fixed width gives every step the same shapes whatever the number of
    dead latents, and needs no host sync (CUDA graphs, graphs.py)."""
    cols = torch.argsort(dead.logical_not().to(torch.uint8), stable=True)[:width]
    return cols, dead.index_select(0, cols)


class _TopKEncode(Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, signed: bool, aux_cols, aux_valid, k_aux: int):
        xc = (x - b_dec).to(LOW)
        pre = torch.addmm(b_enc.to(LOW), xc, W_enc.to(LOW))  # [B, N] bf16
        val, idx = kernels.topk_rows(pre, k, signed)
        if aux_cols is None:
            z = keep = val.new_zeros(x.shape[0], 0)
        else:
            # AuxK reads the pre-activations already computed: its dead columns are a gather,
            # not a second matmul; columns that are not dead count as zero.
            sub = pre.index_select(1, aux_cols).mul_(aux_valid.to(LOW))
            with torch.no_grad():
                j = kernels.topk_rows(sub, k_aux, signed)[1]
            keep = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, j, True)
            keep &= aux_valid if signed else (sub > 0)
            z = torch.where(keep, sub, 0).float()
        ctx.save_for_backward(xc, W_enc, idx, val, aux_cols, keep)
        ctx.signed = signed
        ctx.holder = _holder(idx)
        ctx.mark_non_differentiable(idx, pre)
        return val, idx, pre, z

    @staticmethod
    def backward(ctx, g_val: Tensor, _g_idx, _g_pre, g_z: Tensor):
        xc, W_enc, idx, val, cols, keep = ctx.saved_tensors
        if not ctx.signed:
            g_val = g_val * (val > 0)
        N = W_enc.shape[1]
        db_enc = torch.zeros(N, device=xc.device, dtype=torch.float32)
        db_enc.index_add_(0, idx.reshape(-1), g_val.reshape(-1).float())
        if cols is not None:
            g_z = torch.where(keep, g_z, 0.0)
            db_enc.index_add_(0, cols, g_z.sum(0))
        dW = None
        if ctx.needs_input_grad[2]:
            dW = _segments(ctx, idx, N).reduce(g_val, xc)  # [N, D]
            if cols is not None:  # AuxK's share, straight into the same [N, D] gradient
                dW.index_add_(0, cols, (g_z.to(LOW).T @ xc).float())
            # [D, N] as a view: W_enc is stored latent-major (sae.py), so this is its own
            # layout and autograd takes it without a copy.
            dW = dW.T
        db_dec = -(db_enc @ W_enc.T) if ctx.needs_input_grad[1] else None
        return (None, db_dec, dW, db_enc if ctx.needs_input_grad[3] else None,
                None, None, None, None, None)


def topk_encode(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, signed: bool,
                aux: tuple[Tensor, Tensor] | None = None, k_aux: int = 0):
    """-> (val [B, K] float32, idx [B, K], pre [B, N] bfloat16 no grad, z [B, C] float32).

    aux = (cols [C], valid [C]) from ``aux_columns``: z holds AuxK's codes on those columns,
    the k_aux largest of each row kept, zero elsewhere and on columns not valid. Without aux
    z is [B, 0].
    """
    cols, valid = aux if aux is not None else (None, None)
    return _TopKEncode.apply(x, b_dec, W_enc, b_enc, k, signed, cols, valid, k_aux)


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, val: Tensor, idx: Tensor, W_dec: Tensor):
        W_low = low(W_dec)
        ctx.save_for_backward(val, idx, W_low)
        ctx.n = W_dec.shape[0]
        ctx.holder = _holder(idx)
        return kernels.gather_decode(val, idx, W_low)

    @staticmethod
    def backward(ctx, g: Tensor):
        val, idx, W_low = ctx.saved_tensors
        g_val = kernels.gather_dot(g, idx, W_low) if ctx.needs_input_grad[0] else None
        dW = _segments(ctx, idx, ctx.n).reduce(val, g) if ctx.needs_input_grad[2] else None
        return g_val, None, dW


def sparse_decode(val: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j val_j W_dec[idx_j], float32 [B, D], with a segmented-reduction backward."""
    return _SparseDecode.apply(val, idx, W_dec)


class _GatherDot(Function):
    @staticmethod
    def forward(ctx, r: Tensor, idx: Tensor, W_dec: Tensor):
        W_low = low(W_dec)
        ctx.save_for_backward(r, idx, W_low)
        ctx.n = W_dec.shape[0]
        ctx.holder = _holder(idx)
        return kernels.gather_dot(r, idx, W_low)

    @staticmethod
    def backward(ctx, g: Tensor):
        r, idx, W_low = ctx.saved_tensors
        dr = kernels.gather_decode(g, idx, W_low) if ctx.needs_input_grad[0] else None
        dW = _segments(ctx, idx, ctx.n).reduce(g, r) if ctx.needs_input_grad[2] else None
        return dr, None, dW


def gather_dot(r: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """<r[b], W_dec[idx[b, j]]>, float32 [B, K], differentiable in r and W_dec."""
    return _GatherDot.apply(r, idx, W_dec)


def select_topk(score_src: Tensor, k: int, signed: bool) -> Tensor:
    """Indices [B, k] of the top-k of a (bfloat16) matrix, no gradient."""
    return kernels.topk_rows(score_src, k, signed)[1]


def dense_decode(z: Tensor, W_rows: Tensor) -> Tensor:
    """z [B, M] @ W_rows [M, D] in bfloat16 with float32 output."""
    return (z.to(LOW) @ W_rows.to(LOW)).float()  # W_rows: a gathered copy, so no caching


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
