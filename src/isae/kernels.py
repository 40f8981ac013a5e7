"""Triton kernels for the TopK family's hot loop on the GPU.

Four small kernels, each replacing a stock op that dominated the training step on an H200
(benchmarks/RESULTS.md):

* ``topk_rows``: per-row top-k: a lower bound from group maxima filters the row to a few
  candidates, bisection on their (score, index) keys picks the k. Stock ``topk`` spends ~1.6 ms on a
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
    def _scores(base, o, N, SIGNED: tl.constexpr):
        # |x| (signed) or max(x, 0) (TopK after ReLU); padding gets -1, below every score.
        m = o < N
        x = tl.load(base + o, mask=m, other=0.0).to(tl.float32)
        a = tl.abs(x) if SIGNED else tl.maximum(x, 0.0)
        return tl.where(m, a, -1.0)

    @triton.jit
    def _group_max_kernel(pre, gmax, N, G, stride_row, SIGNED: tl.constexpr,
                          S: tl.constexpr, GC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = pre + row * stride_row
        gs = tl.arange(0, GC)
        ss = tl.arange(0, S)
        for g0 in range(0, G, GC):
            o = (g0 + gs)[:, None] * S + ss[None, :]
            m = tl.max(_scores(base, o, N, SIGNED), axis=1)
            tl.store(gmax + row * G + g0 + gs, m, mask=g0 + gs < G)

    @triton.jit
    def _select_kernel(pre, tau, scratch, out_val, out_idx, N, stride_row, K,
                       SIGNED: tl.constexpr, CHUNK: tl.constexpr, CAP: tl.constexpr):
        # Keys pack the score's float bits above the complemented column index (unique keys,
        # ties to the lower index): 32 bits for bfloat16 rows of <= 65536 columns, else 64.
        row = tl.program_id(0).to(tl.int64)
        base = pre + row * stride_row
        t_lo = tl.load(tau + row)
        offs = tl.arange(0, CHUNK)
        # 1. Compact the candidates (score >= tau, a lower bound of the k-th score) in index
        #    order into this row's scratch; there are usually only a few more than k.
        n_cand = tl.full([], 0, tl.int32)
        for c0 in range(0, N, CHUNK):
            o = c0 + offs
            sc = _scores(base, o, N, SIGNED)
            cand = (sc >= t_lo) & (o < N)
            pos = n_cand + tl.cumsum(cand.to(tl.int32), axis=0) - 1
            key = (sc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - o).to(tl.int64)
            tl.store(scratch + row * CAP + pos, key, mask=cand & (pos < CAP))
            n_cand += tl.sum(cand.to(tl.int32), axis=0)
        if n_cand <= CAP:
            cs = tl.arange(0, CAP)
            key = tl.load(scratch + row * CAP + cs, mask=cs < n_cand, other=-1)
            # 2. Bisection for the k-th largest key among the candidates (keys are unique,
            #    so exactly k are >= it), then one scan writes them in index order.
            t = tl.full([], 0, tl.int64)
            for bit in tl.static_range(62, -1, -1):
                cand_t = t | (1 << bit)
                t = tl.where(tl.sum((key >= cand_t).to(tl.int32), axis=0) >= K, cand_t, t)
            sel = key >= t
            pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
            idx = 2147483647 - (key & 2147483647)
            v = tl.load(base + idx, mask=sel, other=0.0).to(tl.float32)
            if not SIGNED:
                v = tl.maximum(v, 0.0)
            tl.store(out_val + row * K + pos, v, mask=sel)
            tl.store(out_idx + row * K + pos, idx, mask=sel)
        else:
            # Too many candidates: the same bisection over the whole row, re-read per pass.
            t = tl.full([], 0, tl.int64)
            for bit in tl.static_range(62, -1, -1):
                cand_t = t | (1 << bit)
                cnt = tl.full([], 0, tl.int32)
                for c0 in range(0, N, CHUNK):
                    o = c0 + offs
                    sc = _scores(base, o, N, SIGNED)
                    key = (sc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - o).to(tl.int64)
                    cnt += tl.sum((key >= cand_t).to(tl.int32), axis=0)
                t = tl.where(cnt >= K, cand_t, t)
            done = tl.full([], 0, tl.int32)
            for c0 in range(0, N, CHUNK):
                o = c0 + offs
                sc = _scores(base, o, N, SIGNED)
                key = (sc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - o).to(tl.int64)
                sel = key >= t
                pos = done + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                v = tl.load(base + o, mask=sel, other=0.0).to(tl.float32)
                if not SIGNED:
                    v = tl.maximum(v, 0.0)
                tl.store(out_val + row * K + pos, v, mask=sel)
                tl.store(out_idx + row * K + pos, o.to(tl.int64), mask=sel)
                done += tl.sum(sel.to(tl.int32), axis=0)

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


#: Group size of the pre-filter and the candidate capacity per row of the select kernel.
GROUP, CAP = 64, 2048


def topk_rows(pre: Tensor, k: int, signed: bool) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``pre`` [B, N] -> (val float32 [B, k], idx int64 [B, k]).

    signed: by |pre|, keeping the sign; unsigned: of ReLU(pre) (values clipped at 0). Exact;
    equal scores go to the lower index; within a row the k come out in index order.

    The GPU path filters first: tau, the k-th largest of the maxima of groups of 64 columns,
    is a lower bound of the k-th largest score (k groups reach it), so only scores >= tau can
    win — typically a few more than k. They are compacted per row and the k-th is found by
    bisection on (score, index) keys. Where a row has more than CAP candidates (only with
    large k, or many equal group maxima) the stock ``topk`` serves instead.
    """
    B, N = pre.shape
    if not 0 < k <= N:
        raise ValueError(f"k={k} outside 1..{N} columns")
    if not usable(pre) or k * 4 > CAP:
        score = pre.float().abs() if signed else pre.float().relu()
        idx = score.topk(k, dim=-1).indices.sort(dim=-1).values
        val = pre.float().gather(1, idx)
        return (val if signed else val.relu()), idx
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    G = triton.cdiv(N, GROUP)
    gmax = torch.empty(B, G, device=pre.device, dtype=torch.float32)
    val = torch.zeros(B, k, device=pre.device, dtype=torch.float32)
    idx = torch.zeros(B, k, device=pre.device, dtype=torch.int64)
    if not B:
        return val, idx
    _group_max_kernel[(B,)](pre, gmax, N, G, pre.stride(0), SIGNED=signed, S=GROUP, GC=64,
                            num_warps=4)
    if G >= k:
        tau = gmax.topk(k, dim=1, sorted=False).values.amin(dim=1).contiguous()
    else:  # fewer groups than k: no bound, every column is a candidate
        tau = torch.zeros(B, device=pre.device, dtype=torch.float32)
    scratch = torch.empty(B, CAP, device=pre.device, dtype=torch.int64)
    _select_kernel[(B,)](pre, tau, scratch, val, idx, N, pre.stride(0), k, SIGNED=signed,
                         CHUNK=2048, CAP=CAP, num_warps=8)
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


#: How ``Segments.reduce`` runs on the GPU: "kernel" (the Triton segmented sum), "csr"
#: (cuSPARSE SpMM on the same sorted layout) or "dense" (scatter + bfloat16 matmul); the
#: benchmark measures all three.
METHOD = "kernel"


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
        if usable(src) and METHOD == "dense":
            B = src.shape[0]
            Z = torch.zeros(B, self.n, dtype=torch.bfloat16, device=src.device)
            Z.scatter_(1, self.idx, wts.to(torch.bfloat16))
            return (Z.T @ src.to(torch.bfloat16)).float()
        if usable(src) and METHOD == "csr":
            vals = wts.reshape(-1).float()[self.order.long()]
            A = torch.sparse_csr_tensor(self.offsets.long(), (self.order // self.K).long(), vals,
                                        size=(self.n, src.shape[0]), check_invariants=False)
            return A @ src.float()
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
