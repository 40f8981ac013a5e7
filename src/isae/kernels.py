"""Triton kernels for the TopK family's hot loop on the GPU.

Four small kernels, each replacing a stock op that dominated the training step on an H200
(benchmarks/RESULTS.md):

* ``topk_rows``: per-row top-k by radix select (bisection on the float bits, the row held in
  registers) and one scan to write the winners. Stock ``topk`` spends ~1.6 ms on a
  [8192, 24576] bf16 matrix.
* ``gather_decode``: sum_j val[b, j] W[idx[b, j]] (the sparse decoder) from a bf16 table.
* ``gather_dot``: <g[b], W[idx[b, j]]> for each selected latent (the decoder's value
  gradient, and IHT's correlations on a support).
* ``segment_rows``: out[n] = sum over (b, j) with idx[b, j] = n of w[b, j] src[b]: the
  weight gradients of a k-sparse map as a segmented reduction over latents (sorted once),
  instead of a dense [B, N] scatter and a B x N x D matmul.

The wrappers accept CUDA tensors; with ``TRITON_INTERPRET=1`` set before import they also
run on CPU tensors, which is how tests/test_kernels.py checks them without a GPU.
Where a kernel cannot run (no Triton, or a CPU tensor outside interpret mode) each wrapper
computes the same thing with stock torch ops, so fast.py's autograd functions stay testable
on any machine (tests/test_fast_cpu.py).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs: fast.py falls back to stock ops
    AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def usable(t: Tensor) -> bool:
    """Whether the kernels can run on this tensor's device."""
    return AVAILABLE and (t.is_cuda or INTERPRET)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


if AVAILABLE:

    @triton.jit
    def _keys(base, o, N, SIGNED: tl.constexpr, SHIFT: tl.constexpr):
        # The float bits of |x| (signed) or max(x, 0) (TopK after ReLU) are monotone in the
        # value for non-negative floats; padding gets -1, below every real key. bfloat16 rows
        # use the top 16 bits only (SHIFT 16), all a bfloat16 value has.
        m = o < N
        x = tl.load(base + o, mask=m, other=0.0).to(tl.float32)
        a = tl.abs(x) if SIGNED else tl.maximum(x, 0.0)
        return tl.where(m, a.to(tl.int32, bitcast=True) >> SHIFT, -1)

    @triton.jit
    def _topk_kernel(pre, out_val, out_idx, N, stride_row, K,
                     BLOCK: tl.constexpr, NCHUNK: tl.constexpr, SIGNED: tl.constexpr,
                     SHIFT: tl.constexpr, BITS: tl.constexpr):
        # Radix select by bisection: t = the k-th largest key, found bit by bit from the top
        # (BITS passes, each a count over the row), then one scan writes the elements above
        # t and the first ties at t in index order. Rows of <= BLOCK columns stay in
        # registers; wider rows are re-read chunk by chunk (from L2) on every pass.
        row = tl.program_id(0).to(tl.int64)
        base = pre + row * stride_row
        offs = tl.arange(0, BLOCK)
        if NCHUNK == 1:
            key = _keys(base, offs, N, SIGNED, SHIFT)
        t = tl.full([], 0, tl.int32)
        for bit in tl.static_range(BITS - 1, -1, -1):
            cand = t | (1 << bit)
            if NCHUNK == 1:
                cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            else:
                cnt = tl.full([], 0, tl.int32)
                for c in range(NCHUNK):
                    kc = _keys(base, c * BLOCK + offs, N, SIGNED, SHIFT)
                    cnt += tl.sum((kc >= cand).to(tl.int32), axis=0)
            t = tl.where(cnt >= K, cand, t)
        done_gt = tl.full([], 0, tl.int32)
        done_tie = tl.full([], 0, tl.int32)
        n_gt = tl.full([], 0, tl.int32)
        if NCHUNK == 1:
            n_gt = tl.sum((key > t).to(tl.int32), axis=0)
        else:
            for c in range(NCHUNK):
                kc = _keys(base, c * BLOCK + offs, N, SIGNED, SHIFT)
                n_gt += tl.sum((kc > t).to(tl.int32), axis=0)
        need = K - n_gt
        for c in range(NCHUNK):
            o = c * BLOCK + offs
            if NCHUNK == 1:
                kc = key
            else:
                kc = _keys(base, o, N, SIGNED, SHIFT)
            gt = kc > t
            tie = kc == t
            # one scan for both counts: ties in the high half, > t in the low half
            both = tl.cumsum(gt.to(tl.int32) + (tie.to(tl.int32) << 16), axis=0)
            c_gt = done_gt + (both & 65535)
            c_tie = done_tie + (both >> 16)
            sel = gt | (tie & (c_tie <= need))
            pos = c_gt + tl.minimum(c_tie, need) - 1
            v = tl.load(base + o, mask=sel, other=0.0).to(tl.float32)
            if not SIGNED:
                v = tl.maximum(v, 0.0)
            tl.store(out_val + row * K + pos, v, mask=sel)
            tl.store(out_idx + row * K + pos, o.to(tl.int64), mask=sel)
            done_gt += tl.sum(gt.to(tl.int32), axis=0)
            done_tie += tl.sum(tie.to(tl.int32), axis=0)

    @triton.jit
    def _gather_decode_kernel(val, idx, W, out, D, K: tl.constexpr, KP: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, KP)
        km = kk < K
        j = tl.load(idx + row * K + kk, mask=km, other=0)
        v = tl.load(val + row * K + kk, mask=km, other=0.0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            tl.store(out + row * D + d, tl.sum(w.to(tl.float32) * v[:, None], axis=0), mask=dm)

    @triton.jit
    def _gather_dot_kernel(g, idx, W, out, D, K: tl.constexpr, KP: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, KP)
        km = kk < K
        j = tl.load(idx + row * K + kk, mask=km, other=0)
        acc = tl.zeros([KP], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            gv = tl.load(g + row * D + d, mask=dm, other=0.0).to(tl.float32)
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * gv[None, :], axis=1)
        tl.store(out + row * K + kk, acc, mask=km)

    @triton.jit
    def _segment_kernel(order, offsets, item_latent, item_first, wts, src, out, N, D,
                        K: tl.constexpr, PMAX: tl.constexpr, P: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        i = tl.program_id(0)
        n = tl.load(item_latent + i)
        if n < N:
            c = i - tl.load(item_first + n)
            seg0 = tl.load(offsets + n)
            seg1 = tl.load(offsets + n + 1)
            s = seg0 + c * PMAX
            e = tl.minimum(seg1, s + PMAX)
            split = seg1 - seg0 > PMAX  # this latent's sum is spread over several programs
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                for p0 in range(s, e, P):
                    p = p0 + tl.arange(0, P)
                    pm = p < e
                    f = tl.load(order + p, mask=pm, other=0).to(tl.int64)
                    wv = tl.load(wts + f, mask=pm, other=0.0).to(tl.float32)
                    b = f // K
                    x = tl.load(src + b[:, None] * D + d[None, :],
                                mask=pm[:, None] & dm[None, :], other=0.0)
                    acc += tl.sum(x.to(tl.float32) * wv[:, None], axis=0)
                dst = out + n.to(tl.int64) * D + d
                if split:
                    tl.atomic_add(dst, acc, mask=dm)
                else:
                    tl.store(dst, acc, mask=dm)


def topk_rows(pre: Tensor, k: int, signed: bool, block: int = 32768, num_warps: int = 16
              ) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``pre`` [B, N] -> (val float32 [B, k], idx int64 [B, k]).

    signed: by |pre|, keeping the sign; unsigned: of ReLU(pre) (values clipped at 0). Exact
    for any float dtype; equal scores go to the lower index; within a row the k come out in
    index order (not sorted by score).
    """
    B, N = pre.shape
    if not 0 < k <= N:
        raise ValueError(f"k={k} outside 1..{N} columns")
    if not usable(pre):
        score = pre.float().abs() if signed else pre.float().relu()
        idx = score.topk(k, dim=-1).indices.sort(dim=-1).values
        val = pre.float().gather(1, idx)
        return (val if signed else val.relu()), idx
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    block = min(block, _pow2(N))
    narrow = pre.dtype == torch.bfloat16
    val = torch.empty(B, k, device=pre.device, dtype=torch.float32)
    idx = torch.empty(B, k, device=pre.device, dtype=torch.int64)
    if B:
        _topk_kernel[(B,)](pre, val, idx, N, pre.stride(0), k, BLOCK=block,
                           NCHUNK=triton.cdiv(N, block), SIGNED=signed,
                           SHIFT=16 if narrow else 0, BITS=15 if narrow else 31,
                           num_warps=num_warps)
    return val, idx


def gather_decode(val: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """sum_j val[b, j] W[idx[b, j]] -> float32 [B, D] (W [N, D], any float dtype)."""
    B, K = idx.shape
    D = W.shape[1]
    if not usable(W):
        return torch.nn.functional.embedding_bag(idx, W.float(), per_sample_weights=val.float(),
                                                 mode="sum")
    out = torch.empty(B, D, device=W.device, dtype=torch.float32)
    BLOCK_D = min(_pow2(D), 256)
    if B:
        _gather_decode_kernel[(B,)](
            val.float().contiguous(), idx.contiguous(), W.contiguous(), out, D,
            K=K, KP=_pow2(K), BLOCK_D=BLOCK_D, num_warps=4)
    return out


def gather_dot(g: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """<g[b], W[idx[b, j]]> -> float32 [B, K]."""
    B, K = idx.shape
    D = W.shape[1]
    if not usable(W):
        return torch.einsum("bkd,bd->bk", W.float()[idx], g.float())
    out = torch.empty(B, K, device=W.device, dtype=torch.float32)
    BLOCK_D = min(_pow2(D), 128)
    if B:
        _gather_dot_kernel[(B,)](g.contiguous(), idx.contiguous(), W.contiguous(), out, D,
                                 K=K, KP=_pow2(K), BLOCK_D=BLOCK_D, num_warps=4)
    return out


class Segments:
    """The latents of a batch's codes sorted once, for segmented reductions over latents.

    Each latent's entries are cut into work items of at most ``pmax``; a latent that needs
    several items (a frequent one) is summed with atomics, every other one by a plain store.
    """

    def __init__(self, idx: Tensor, n: int, pmax: int = 256) -> None:
        flat = idx.reshape(-1)
        self.K = idx.shape[1]
        self.n, self.pmax = n, pmax
        self.idx = idx
        if not usable(idx):
            return
        # Sorting 32-bit keys halves the radix passes; counts come from the sorted keys
        # (torch.bincount on CUDA would sync with the host).
        srt, order = torch.sort(flat.to(torch.int32))
        self.order = order.to(torch.int32)
        ar = torch.arange(n + 1, device=idx.device, dtype=torch.int32)
        self.offsets = torch.searchsorted(srt, ar).to(torch.int32)
        items = (self.offsets.diff() + pmax - 1) // pmax
        ends = torch.cumsum(items, 0)
        self.item_first = (ends - items).to(torch.int32)
        bound = n + (flat.numel() + pmax - 1) // pmax  # >= sum(items), no host sync needed
        self.item_latent = torch.searchsorted(
            ends, torch.arange(bound, device=idx.device, dtype=ends.dtype), right=True
        ).to(torch.int32)

    def reduce(self, wts: Tensor, src: Tensor) -> Tensor:
        """out[n] = sum_{idx[b, j] = n} wts[b, j] src[b] -> float32 [N, D]."""
        D = src.shape[1]
        out = torch.zeros(self.n, D, device=src.device, dtype=torch.float32)
        if not usable(src):
            rows = (wts.float()[..., None] * src.float()[:, None, :]).reshape(-1, D)
            return out.index_add_(0, self.idx.reshape(-1), rows)
        BLOCK_D = min(_pow2(D), 256)
        _segment_kernel[(self.item_latent.numel(),)](
            self.order, self.offsets, self.item_latent, self.item_first,
            wts.float().contiguous(), src.contiguous(), out, self.n, D,
            K=self.K, PMAX=self.pmax, P=16, BLOCK_D=BLOCK_D, num_warps=4)
        return out
