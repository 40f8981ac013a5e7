"""Triton kernels for the TopK family's hot loop on the GPU.

Small kernels, each replacing a stock op that dominated the training step on an H200
(benchmarks/RESULTS.md):

* ``topk_rows``: per-row top-k: a lower bound from the maxima of 64-column groups leaves
  only ~k groups to read, and bisection on the scores' float bits picks the k (0.38 ms on a
  [8192, 24576] bf16 matrix, where stock ``topk`` takes 1.8 ms).
* ``topk_rows_hinted``: the same top-k where the rows' previous support is known (an IHT
  step's): its smallest score is the bound, so one pass over the row finds the few columns
  that reach it, with no group maxima and no search over them. Off unless HINT_CAP is set:
  not yet faster than ``topk_rows`` on a GPU.
* ``topk_mask_rows``: the same selection kept as a dense matrix (AuxK on the dead columns).
* ``gather_decode``: sum_j val[b, j] W[idx[b, j]] (the sparse decoder) from a bf16 table.
* ``gather_dot``: <g[b], W[idx[b, j]]> for each selected latent (the decoder's value
  gradient, and IHT's correlations on a support).
* ``Segments``: out[n] = sum over (b, j) with idx[b, j] = n of w[b, j] src[b]: the weight
  gradients of a k-sparse map as one sparse (CSR) x dense product over latents sorted once,
  instead of a dense [B, N] scatter and a B x N x D matmul; ``reduce_into`` accumulates.
* ``iht_eta`` / ``iht_update``: the two halves of an IHT step without gradient (``+sg``),
  each one pass over a row, around the dense correlation and its top-k; where a row's
  [K, D] table tile fits in registers, that tile is loaded once for all of the pass.
  ``iht_update_kept`` also says which rows took the new codes, and ``iht_grad`` is the
  backward of the differentiated step built on them (isae-iter), one pass over a row.
* One-pass elementwise work of a step: ``fvu_parts``, ``scale``, ``sub_cast``,
  ``keep_where``, and the decoder's row constraint (``project_rows_``, ``normalize_rows_``).
* ``adam_rows_``: Adam over M stacked models, each with its own learning rate (a group
  trained as one model, isae.gpu.stacked_ops); ``gather_decode``, ``topk_mask_rows`` and
  ``Segments`` also take such a group's rows: a bias and an AuxK mask per model, source
  rows shared by the models.

The wrappers accept CUDA tensors; with ``TRITON_INTERPRET=1`` set before import (Triton's
own switch) they also run on CPU tensors, which is how tests/test_kernels.py checks them
without a GPU. Where a kernel cannot run (no Triton, or a CPU tensor outside interpret mode)
each wrapper computes the same thing with stock torch ops, the reference maths of
isae.models.reference where there is one, so ops.py's autograd functions stay testable on
any machine (tests/test_fast_cpu.py).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from isae.models import reference

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs: ops.py falls back to stock ops
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
    def _group_maxima(base, gmax, row, N, G, SIGNED: tl.constexpr, S: tl.constexpr,
                      GC: tl.constexpr):
        gs = tl.arange(0, GC)
        ss = tl.arange(0, S)
        for g0 in range(0, G, GC):
            o = (g0 + gs)[:, None] * S + ss[None, :]
            m = tl.max(_scores(base, o, N, SIGNED), axis=1)
            tl.store(gmax + row * G + g0 + gs, m, mask=g0 + gs < G)

    @triton.jit
    def _group_max_kernel(pre, gmax, todo, N, G, stride_row, SIGNED: tl.constexpr,
                          S: tl.constexpr, GC: tl.constexpr, TODO: tl.constexpr):
        # TODO: only the rows where todo[row] is set (the rest were served already)
        row = tl.program_id(0).to(tl.int64)
        if TODO:
            if tl.load(todo + row) != 0:
                _group_maxima(pre + row * stride_row, gmax, row, N, G, SIGNED, S, GC)
        else:
            _group_maxima(pre + row * stride_row, gmax, row, N, G, SIGNED, S, GC)

    @triton.jit
    def _bits(sc, SHIFT: tl.constexpr):
        # Integer keys monotone in a non-negative score: its float bits (a bfloat16 value has
        # only the top 16 of them, SHIFT 16); -1 stays below every real key.
        return tl.where(sc >= 0, sc.to(tl.int32, bitcast=True) >> SHIFT, -1)

    @triton.jit
    def _select_kernel(pre, gmax, out_val, out_idx, gsel_buf, todo, N, G, stride_row, K,
                       SIGNED: tl.constexpr, SHIFT: tl.constexpr, S: tl.constexpr,
                       GP: tl.constexpr, CAPG: tl.constexpr, CHUNK: tl.constexpr,
                       TODO: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if TODO:
            if tl.load(todo + row) != 0:
                _select_row(pre + row * stride_row, gmax, out_val, out_idx, gsel_buf, row, N, G,
                            K, SIGNED, SHIFT, S, GP, CAPG, CHUNK)
        else:
            _select_row(pre + row * stride_row, gmax, out_val, out_idx, gsel_buf, row, N, G, K,
                        SIGNED, SHIFT, S, GP, CAPG, CHUNK)

    @triton.jit
    def _select_row(base, gmax, out_val, out_idx, gsel_buf, row, N, G, K,
                    SIGNED: tl.constexpr, SHIFT: tl.constexpr, S: tl.constexpr,
                    GP: tl.constexpr, CAPG: tl.constexpr, CHUNK: tl.constexpr):
        # 1. The bound: lo = the k-th largest group maximum (as a key), by bisection over the
        #    G maxima, from the smallest of them (all G reach it). k groups reach the bound,
        #    so count(key >= lo) >= k over the row; with fewer than k groups it stays 0,
        #    which every score reaches.
        gs = tl.arange(0, GP)
        gkey = _bits(tl.load(gmax + row * G + gs, mask=gs < G, other=-2.0), SHIFT)
        hi = tl.max(gkey, axis=0) + 1  # count(key >= hi) = 0 < k
        kmin = tl.min(tl.where(gs < G, gkey, 2147483647), axis=0)
        glo = tl.where(G >= K, kmin, 0)
        ghi = hi
        while ghi - glo > 1:
            mid = glo + (ghi - glo) // 2
            big = tl.sum((gkey >= mid).to(tl.int32), axis=0) >= K
            glo = tl.where(big, mid, glo)
            ghi = tl.where(big, ghi, mid)
        lo = glo
        # Only groups whose maximum reaches the bound can hold a winner: k of them, more
        # where maxima tie at the bound. The tile is sized to the count.
        gsel = gkey >= lo
        n_groups = tl.sum(gsel.to(tl.int32), axis=0)
        if n_groups <= CAPG // 2:
            _select_in_groups(base, gs, gsel, n_groups, lo, hi, gsel_buf, out_val, out_idx, row,
                              N, K, SIGNED, SHIFT, S, CAPG, CAPG // 2)
        elif n_groups <= CAPG:
            _select_in_groups(base, gs, gsel, n_groups, lo, hi, gsel_buf, out_val, out_idx, row,
                              N, K, SIGNED, SHIFT, S, CAPG, CAPG)
        else:
            # Many groups reach the bound (many equal scores): the same over the whole row.
            offs = tl.arange(0, CHUNK)
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                cnt = tl.full([], 0, tl.int32)
                for c0 in range(0, N, CHUNK):
                    k2 = _bits(_scores(base, c0 + offs, N, SIGNED), SHIFT)
                    cnt += tl.sum((k2 >= mid).to(tl.int32), axis=0)
                big = cnt >= K
                lo = tl.where(big, mid, lo)
                hi = tl.where(big, hi, mid)
            n_gt = tl.full([], 0, tl.int32)
            for c0 in range(0, N, CHUNK):
                k2 = _bits(_scores(base, c0 + offs, N, SIGNED), SHIFT)
                n_gt += tl.sum((k2 > lo).to(tl.int32), axis=0)
            done_gt = tl.full([], 0, tl.int32)
            done_tie = tl.full([], 0, tl.int32)
            for c0 in range(0, N, CHUNK):
                o2 = c0 + offs
                k2 = _bits(_scores(base, o2, N, SIGNED), SHIFT)
                _write(base, k2, o2, lo, K - n_gt, done_gt, done_tie, out_val, out_idx, row, K,
                       SIGNED)
                done_gt += tl.sum((k2 > lo).to(tl.int32), axis=0)
                done_tie += tl.sum((k2 == lo).to(tl.int32), axis=0)

    @triton.jit
    def _select_in_groups(base, gs, gsel, n_groups, lo, hi, gsel_buf, out_val, out_idx, row,
                          N, K, SIGNED: tl.constexpr, SHIFT: tl.constexpr, S: tl.constexpr,
                          CAPG: tl.constexpr, CAP: tl.constexpr):
        gpos = tl.cumsum(gsel.to(tl.int32), axis=0) - 1
        tl.store(gsel_buf + row * CAPG + gpos, gs, mask=gsel)
        tl.debug_barrier()  # other threads of this program read what these wrote
        cg = tl.arange(0, CAP)
        gid = tl.load(gsel_buf + row * CAPG + cg, mask=cg < n_groups, other=0)
        o = gid[:, None] * S + tl.arange(0, S)[None, :]  # [CAP, S], in index order
        ok = (cg < n_groups)[:, None] & (o < N)
        sc = tl.where(ok, _scores(base, o, N, SIGNED), -1.0)
        key = tl.reshape(_bits(sc, SHIFT), [CAP * S])
        col = tl.reshape(o, [CAP * S])
        _select_among(base, key, col, lo, hi, out_val, out_idx, row, K, SIGNED)

    @triton.jit
    def _select_among(base, key, col, lo, hi, out_val, out_idx, row, K, SIGNED: tl.constexpr):
        # Columns ``col`` in index order, their keys, count(key >= lo) >= K > count(key >= hi).
        # 2. Bisection for t, the k-th largest key, among these columns only. (Three
        #    thresholds a pass, their counts packed in one int64 sum, was no faster on an
        #    H100 here and slower in _topk_mask_kernel: benchmarks/RESULTS.md, fifteenth
        #    session.)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            big = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
            lo = tl.where(big, mid, lo)
            hi = tl.where(big, hi, mid)
        # 3. Everything above t, then the first ties at t, written in index order.
        n_gt = tl.sum((key > lo).to(tl.int32), axis=0)
        _write(base, key, col, lo, K - n_gt, 0, 0, out_val, out_idx, row, K, SIGNED)

    @triton.jit
    def _write(base, key, col, t, need, done_gt, done_tie, out_val, out_idx, row, K,
               SIGNED: tl.constexpr):
        gt = key > t
        tie = key == t
        # one scan for both counts: ties in the high half, > t in the low half
        both = tl.cumsum(gt.to(tl.int32) + (tie.to(tl.int32) << 16), axis=0)
        c_gt = done_gt + (both & 65535)
        c_tie = done_tie + (both >> 16)
        sel = gt | (tie & (c_tie <= need))
        pos = c_gt + tl.minimum(c_tie, need) - 1
        v = tl.load(base + col, mask=sel, other=0.0).to(tl.float32)
        if not SIGNED:
            v = tl.maximum(v, 0.0)
        tl.store(out_val + row * K + pos, v, mask=sel)
        tl.store(out_idx + row * K + pos, col.to(tl.int64), mask=sel)

    @triton.jit
    def _select_hinted_kernel(pre, hint, out_val, out_idx, cand_buf, todo, tally, N, stride_row,
                              K, SIGNED: tl.constexpr, SHIFT: tl.constexpr, CHUNK: tl.constexpr,
                              KP: tl.constexpr, CAPC: tl.constexpr, TALLY: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = pre + row * stride_row
        # 1. The bound from the hint: the smallest score of K columns. Where they are K
        #    distinct columns (a previous support), count(key >= lo) >= K; the count below
        #    checks it, so any hint is safe.
        kk = tl.arange(0, KP)
        h = tl.load(hint + row * K + kk, mask=kk < K, other=0)
        hkey = _bits(_scores(base, h, N, SIGNED), SHIFT)
        lo = tl.min(tl.where(kk < K, hkey, 2147483647), axis=0)
        # 2. One pass over the row: the columns that reach the bound, in index order.
        offs = tl.arange(0, CHUNK)
        cs = tl.arange(0, CAPC)
        n_cand = tl.full([], 0, tl.int32)
        for c0 in range(0, N, CHUNK):
            o = c0 + offs
            key = _bits(_scores(base, o, N, SIGNED), SHIFT)
            reach = key >= lo
            n_here = tl.sum(reach.to(tl.int32), axis=0)
            if n_here > 0:  # most chunks hold none: no scan for them (the scan is the cost)
                pos = n_cand + tl.cumsum(reach.to(tl.int32), axis=0) - 1
                tl.store(cand_buf + row * CAPC + pos, o, mask=reach & (pos < CAPC))
            n_cand += n_here
        tl.debug_barrier()  # other threads of this program read what these wrote
        served = (n_cand >= K) & (n_cand <= CAPC)
        # Rows the bound did not serve (too many candidates, or no bound) are left to
        # topk_rows's kernels, launched after this one for those rows only: kept out of
        # this kernel, their larger tiles would cost it registers on every row.
        tl.store(todo + row, tl.where(served, 0, 1).to(tl.int32))
        if TALLY:
            tl.atomic_add(tally, tl.full([], 1, tl.int64))
            tl.atomic_add(tally + 1, tl.where(served, 0, 1).to(tl.int64))
        if served:
            # 3. The k among the candidates only, as the unhinted kernel picks them among
            #    its groups' columns: the same result.
            ok = cs < n_cand
            col = tl.load(cand_buf + row * CAPC + cs, mask=ok, other=0)
            key = tl.where(ok, _bits(_scores(base, col, N, SIGNED), SHIFT), -1)
            hi = tl.max(key, axis=0) + 1  # the row's largest key reaches the bound: it is here
            _select_among(base, key, col, lo, hi, out_val, out_idx, row, K, SIGNED)

    @triton.jit
    def _gather_decode_kernel(val, idx, W, out, bias, D, RPB, K: tl.constexpr, KP: tl.constexpr,
                              BLOCK_D: tl.constexpr, BIAS: tl.constexpr):
        # RPB: rows per bias row (a stacked group's rows use their own model's bias)
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, KP)
        km = kk < K
        j = tl.load(idx + row * K + kk, mask=km, other=0)
        v = tl.load(val + row * K + kk, mask=km, other=0.0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            acc = tl.sum(w.to(tl.float32) * v[:, None], axis=0)
            if BIAS:
                acc += tl.load(bias + (row // RPB) * D + d, mask=dm, other=0.0)
            tl.store(out + row * D + d, acc, mask=dm)

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

#: Group size of the pre-filter; above MAX_K the stock topk serves.
GROUP, MAX_K = 64, 128
#: topk_rows_hinted: up to HINT_CAP x k candidate columns, the columns its pass reads at a
#: time, its warps a row. HINT_CAP 0 (the default) turns the hint off: topk_rows itself. The
#: kernel's first version took 273 us where topk_rows takes 120 (an H100, width 12 288,
#: benchmarks/RESULTS.md, sixteenth session); this one is checked in the interpreter only,
#: and benchmarks/hint_bench.py measures its settings against topk_rows in one GPU call.
HINT_CAP, HINT_CHUNK, HINT_WARPS = 0, 512, 2


def topk_rows(pre: Tensor, k: int, signed: bool) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``pre`` [B, N] -> (val float32 [B, k], idx int64 [B, k]).

    signed: by |pre|, keeping the sign; unsigned: of ReLU(pre) (values clipped at 0). Exact.
    The kernel gives equal scores to the lower index and writes each row in index order; the
    stock fallback (CPU, k > MAX_K) makes no promise about either.

    The GPU path filters first: tau, the k-th largest of the maxima of groups of 64 columns,
    is a lower bound of the k-th largest score (k groups reach it), so only scores >= tau can
    win, and only in the ~k groups whose maximum reaches tau. The select kernel reads just
    those groups and finds the k-th score by bisection on their float bits, ties going to the
    lower index. A row with more than 2k such groups (many equal scores) is bisected over all
    its columns instead: same result, slower. k above MAX_K takes the stock ``topk``.
    """
    B, N = pre.shape
    if not 0 < k <= N:
        raise ValueError(f"k={k} outside 1..{N} columns")
    if not usable(pre) or k > MAX_K:
        codes = reference.topk_select(pre, k, signed)
        return codes.val.float(), codes.idx
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    val = torch.empty(B, k, device=pre.device, dtype=torch.float32)
    idx = torch.empty(B, k, device=pre.device, dtype=torch.int64)
    if B:
        _select_rows(pre, k, signed, val, idx)
    return val, idx


def _select_rows(pre: Tensor, k: int, signed: bool, val: Tensor, idx: Tensor,
                 todo: Tensor | None = None) -> None:
    """topk_rows's two kernels into ``val`` and ``idx``; with ``todo`` (int32 [B]) only on
    the rows where it is set."""
    B, N = pre.shape
    G = triton.cdiv(N, GROUP)
    gmax = torch.empty(B, G, device=pre.device, dtype=torch.float32)
    flags = todo if todo is not None else gmax  # a pointer the kernels leave unread
    _group_max_kernel[(B,)](pre, gmax, flags, N, G, pre.stride(0), SIGNED=signed, S=GROUP,
                            GC=64, TODO=todo is not None, num_warps=4)
    capg = _pow2(max(2 * k, 16))
    gsel_buf = torch.empty(B, capg, device=pre.device, dtype=torch.int32)
    _select_kernel[(B,)](pre, gmax, val, idx, gsel_buf, flags, N, G, pre.stride(0), k,
                         SIGNED=signed, SHIFT=16 if pre.dtype == torch.bfloat16 else 0, S=GROUP,
                         GP=_pow2(G), CAPG=capg, CHUNK=4096, TODO=todo is not None,
                         num_warps=4 if capg * GROUP <= 4096 else 8)


def topk_rows_hinted(pre: Tensor, k: int, signed: bool, hint: Tensor,
                     tally: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``topk_rows(pre, k, signed)``, exactly, with a hint: ``hint`` [B, k] int64 holds k
    columns of each row, typically the support that the row's previous top-k chose (an IHT
    step's). Their smallest score bounds the k-th largest from below, so one pass over the
    row collects the few columns that reach it and the k are found among those alone: no
    pass for the group maxima, no search over them. A row where more than ``HINT_CAP`` x k
    columns reach the bound, or where the hint's columns are not distinct enough to bound
    it, is left to topk_rows's kernels, launched after for those rows only. Off the kernels,
    or with HINT_CAP 0 (the default, see there): topk_rows.

    ``tally``: an int64 [2] on the device to which the kernel adds (rows, rows that took the
    unhinted way), for a benchmark to see how often the hint served (no host sync, so it
    also counts inside a replayed CUDA graph; kernel_trace.hint_tally)."""
    B, N = pre.shape
    if hint.shape != (B, k) or hint.dtype != torch.int64:
        raise ValueError(f"hint must be int64 [{B}, {k}], got {hint.dtype} {tuple(hint.shape)}")
    if not usable(pre) or k > MAX_K or not 0 < k <= N or not HINT_CAP:
        return topk_rows(pre, k, signed)
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    hint = hint.contiguous()
    val = torch.empty(B, k, device=pre.device, dtype=torch.float32)
    idx = torch.empty(B, k, device=pre.device, dtype=torch.int64)
    if not B:
        return val, idx
    capc = _pow2(HINT_CAP * k)
    cand_buf = torch.empty(B, capc, device=pre.device, dtype=torch.int32)
    todo = torch.empty(B, device=pre.device, dtype=torch.int32)
    _select_hinted_kernel[(B,)](pre, hint, val, idx, cand_buf, todo,
                                tally if tally is not None else todo, N, pre.stride(0), k,
                                SIGNED=signed, SHIFT=16 if pre.dtype == torch.bfloat16 else 0,
                                CHUNK=min(_pow2(N), HINT_CHUNK), KP=_pow2(k), CAPC=capc,
                                TALLY=tally is not None, num_warps=HINT_WARPS)
    _select_rows(pre, k, signed, val, idx, todo)  # the rows the bound did not serve
    return val, idx


def gather_decode(val: Tensor, idx: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
    """sum_j val[b, j] W[idx[b, j]] (+ bias) -> float32 [B, D] (W [N, D], any float dtype).

    bias: [D], or [G, D] for G equal blocks of rows (a stacked group of models, each with
    its own bias: row b takes bias[b // (B / G)])."""
    B, K = idx.shape
    D = W.shape[1]
    groups = 1 if bias is None or bias.dim() == 1 else bias.shape[0]
    if bias is not None and B % groups:
        raise ValueError(f"{B} rows do not split into {groups} blocks")
    if not usable(W):
        out = reference.sparse_decode(reference.Codes(val.float(), idx), W.float())
        if bias is None:
            return out
        return (out.view(groups, -1, D) + bias.view(groups, 1, D)).view(B, D)
    out = torch.empty(B, D, device=W.device, dtype=torch.float32)
    # A whole row of up to 1024 columns per pass, over 8 warps: at D 768 on an H200 that
    # took 0.18 ms against 0.27 ms for 256-column passes over 4 warps (gpu_bench kernels).
    BLOCK_D = min(_pow2(D), 1024)
    if B:
        _gather_decode_kernel[(B,)](
            val.float().contiguous(), idx.contiguous(), W.contiguous(), out,
            out if bias is None else bias.float().contiguous(), D, max(B // groups, 1),
            K=K, KP=_pow2(K), BLOCK_D=BLOCK_D, BIAS=bias is not None,
            num_warps=8 if BLOCK_D >= 1024 else 4)
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


if AVAILABLE:

    @triton.jit
    def _project_rows_kernel(G, W, D, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        o = tl.arange(0, BLOCK)
        m = o < D
        g = tl.load(G + r * D + o, mask=m, other=0.0)
        w = tl.load(W + r * D + o, mask=m, other=0.0)
        tl.store(G + r * D + o, g - tl.sum(g * w, axis=0) * w, mask=m)

    @triton.jit
    def _normalize_rows_kernel(W, LOW, D, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        o = tl.arange(0, BLOCK)
        m = o < D
        w = tl.load(W + r * D + o, mask=m, other=0.0)
        w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), 1e-12)
        tl.store(W + r * D + o, w, mask=m)
        tl.store(LOW + r * D + o, w.to(LOW.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)


def _rowwise(*ts: Tensor) -> bool:
    return all(usable(t) and t.is_contiguous() and t.dtype == torch.float32 for t in ts)


def project_rows_(G: Tensor, W: Tensor) -> None:
    """G[i] -= <G[i], W[i]> W[i] in place, for [N, D] float32 (one read of each, one write)."""
    if not _rowwise(G, W) or not G.shape[0]:
        reference.project_rows_(G, W)
        return
    _project_rows_kernel[(G.shape[0],)](G, W, G.shape[1], BLOCK=_pow2(G.shape[1]), num_warps=4)


def normalize_rows_(W: Tensor, low: Tensor) -> None:
    """W[i] /= max(||W[i]||, 1e-12) in place, and the result cast into ``low`` (same shape):
    one pass where the stock ops take four."""
    if not _rowwise(W) or not (usable(low) and low.is_contiguous()) or not W.shape[0]:
        reference.normalize_rows_(W)
        low.copy_(W)
        return
    _normalize_rows_kernel[(W.shape[0],)](W, low, W.shape[1], BLOCK=_pow2(W.shape[1]),
                                          num_warps=4)


if AVAILABLE:

    @triton.jit
    def _mask_keys(src, valid, o, C, SIGNED: tl.constexpr, SHIFT: tl.constexpr):
        m = o < C
        ok = m & (tl.load(valid + o, mask=m, other=0) != 0)
        x = tl.load(src + o, mask=m, other=0.0).to(tl.float32)
        sc = tl.where(ok, tl.abs(x) if SIGNED else tl.maximum(x, 0.0), -1.0)
        return x, _bits(sc, SHIFT)

    @triton.jit
    def _topk_mask_kernel(src, valid_all, out, C, stride_row, K, RPV, SIGNED: tl.constexpr,
                          SHIFT: tl.constexpr, BLOCK: tl.constexpr, ONE: tl.constexpr):
        # Bisection on the keys as in _select_kernel (invariant: count(key >= lo) >= K >
        # count(key >= hi)), then everything above the k-th key and the first ties at it.
        # RPV: rows per row of the valid mask (a stacked group: each model its own mask).
        row = tl.program_id(0).to(tl.int64)
        base = src + row * stride_row
        valid = valid_all + (row // RPV) * C
        dst = out + row * C
        offs = tl.arange(0, BLOCK)
        lo = tl.full([], 0, tl.int32)
        if ONE:  # the whole row in one block: loaded once
            x, key = _mask_keys(base, valid, offs, C, SIGNED, SHIFT)
            hi = tl.max(key, axis=0) + 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                big = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
                lo = tl.where(big, mid, lo)
                hi = tl.where(big, hi, mid)
            tie = key == lo
            need = K - tl.sum((key > lo).to(tl.int32), axis=0)
            sel = (key > lo) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
            v = x if SIGNED else tl.maximum(x, 0.0)
            tl.store(dst + offs, tl.where(sel, v, 0.0).to(out.dtype.element_ty), mask=offs < C)
        else:  # long rows: every pass reads the row again, in chunks
            hi = tl.full([], 0, tl.int32)
            for c0 in range(0, C, BLOCK):
                hi = tl.maximum(hi, tl.max(_mask_keys(base, valid, c0 + offs, C, SIGNED, SHIFT)[1], axis=0))
            hi += 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                cnt = tl.full([], 0, tl.int32)
                for c0 in range(0, C, BLOCK):
                    key = _mask_keys(base, valid, c0 + offs, C, SIGNED, SHIFT)[1]
                    cnt += tl.sum((key >= mid).to(tl.int32), axis=0)
                big = cnt >= K
                lo = tl.where(big, mid, lo)
                hi = tl.where(big, hi, mid)
            n_gt = tl.full([], 0, tl.int32)
            for c0 in range(0, C, BLOCK):
                key = _mask_keys(base, valid, c0 + offs, C, SIGNED, SHIFT)[1]
                n_gt += tl.sum((key > lo).to(tl.int32), axis=0)
            need = K - n_gt
            done_tie = tl.full([], 0, tl.int32)
            for c0 in range(0, C, BLOCK):
                x, key = _mask_keys(base, valid, c0 + offs, C, SIGNED, SHIFT)
                tie = key == lo
                sel = (key > lo) | (tie & (done_tie + tl.cumsum(tie.to(tl.int32), axis=0) <= need))
                v = x if SIGNED else tl.maximum(x, 0.0)
                tl.store(dst + c0 + offs, tl.where(sel, v, 0.0).to(out.dtype.element_ty),
                         mask=c0 + offs < C)
                done_tie += tl.sum(tie.to(tl.int32), axis=0)

    @triton.jit
    def _fvu_kernel(x, x_hat, err, part_sq, part_s1, part_s2, B, D, ROWS: tl.constexpr,
                    TR: tl.constexpr, BLOCK_D: tl.constexpr):
        # ROWS rows, TR at a time: err = x - x_hat, its sum of squares, and column sums of
        # x - x[0] and of its square (shifting by a sample keeps the variance from cancelling).
        p = tl.program_id(0)
        tr = tl.arange(0, TR)
        sq = tl.zeros([TR, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            shift = tl.load(x + d, mask=dm, other=0.0)
            s1 = tl.zeros([TR, BLOCK_D], dtype=tl.float32)
            s2 = tl.zeros([TR, BLOCK_D], dtype=tl.float32)
            for i0 in range(0, ROWS, TR):
                r = (p * ROWS + i0 + tr).to(tl.int64)
                m = (r < B)[:, None] & dm[None, :]
                o = r[:, None] * D + d[None, :]
                a = tl.load(x + o, mask=m, other=0.0)
                e = a - tl.load(x_hat + o, mask=m, other=0.0)
                tl.store(err + o, e, mask=m)
                sq += e * e
                c = tl.where(m, a - shift[None, :], 0.0)
                s1 += c
                s2 += c * c
            tl.store(part_s1 + p * D + d, tl.sum(s1, axis=0), mask=dm)
            tl.store(part_s2 + p * D + d, tl.sum(s2, axis=0), mask=dm)
        tl.store(part_sq + p, tl.sum(tl.sum(sq, axis=1), axis=0))


if AVAILABLE:

    @triton.jit
    def _scale_kernel(src, out, num, den, factor, n, BLOCK: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        s = factor * tl.load(num) / tl.load(den)
        tl.store(out + o, tl.load(src + o, mask=m, other=0.0) * s, mask=m)


def scale(src: Tensor, num: Tensor, den: Tensor, factor: float) -> Tensor:
    """src * (factor * num / den) for scalar tensors num, den: one vectorised pass (a
    0-dim CUDA operand keeps torch's elementwise kernels from vectorising)."""
    if not (usable(src) and src.is_contiguous() and src.dtype == torch.float32):
        return src * (factor * num / den)
    out = torch.empty_like(src)
    n = src.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, 4096),)](src, out, num.float(), den.float(), factor, n,
                                               BLOCK=4096, num_warps=8)
    return out


if AVAILABLE:

    @triton.jit
    def _sub_cast_kernel(x, b, out, n, D, BLOCK: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        v = tl.load(x + o, mask=m, other=0.0) - tl.load(b + o % D, mask=m, other=0.0)
        tl.store(out + o, v.to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)

    @triton.jit
    def _keep_where_kernel(g, z, out, n, BLOCK: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        keep = tl.load(z + o, mask=m, other=0.0) != 0
        tl.store(out + o, tl.where(keep, tl.load(g + o, mask=m, other=0.0), 0.0), mask=m)


def sub_cast(x: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """(x - b).to(dtype) for [B, D] float32 x and [D] b, in one pass."""
    if not (usable(x) and x.is_contiguous() and x.dtype == b.dtype == torch.float32):
        return (x - b).to(dtype)
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    n = x.numel()
    if n:
        _sub_cast_kernel[(triton.cdiv(n, 4096),)](x, b.contiguous(), out, n, x.shape[-1],
                                                  BLOCK=4096, num_warps=8)
    return out


def keep_where(g: Tensor, z: Tensor) -> Tensor:
    """g where z != 0, else 0 (same shapes; g's dtype): a gradient through a mask that the
    forward left in its output."""
    if not (usable(g) and g.is_contiguous() and z.is_contiguous() and g.shape == z.shape):
        return torch.where(z != 0, g, 0).to(g.dtype)
    out = torch.empty_like(g)
    n = g.numel()
    if n:
        _keep_where_kernel[(triton.cdiv(n, 4096),)](g, z, out, n, BLOCK=4096, num_warps=8)
    return out


def topk_mask_rows(src: Tensor, k: int, signed: bool, valid: Tensor) -> Tensor:
    """Each row of ``src`` [B, C] with only its top-k kept, zeros elsewhere (same dtype).

    Scores as in ``topk_rows`` (|x| signed, ReLU unsigned), over the columns where ``valid``
    [C] is true; ties go to the lower index. AuxK's selection among the dead latents, as a
    dense matrix that its decode multiplies directly. With fewer than k valid columns, all
    of them are kept. ``valid`` may be [G, C] for G equal blocks of rows (a stacked group of
    models, each with its own dead latents): row b reads valid[b // (B / G)].
    """
    B, C = src.shape
    groups = 1 if valid.dim() == 1 else valid.shape[0]
    if B % groups:
        raise ValueError(f"{B} rows do not split into {groups} blocks")
    if not usable(src):
        if groups > 1:
            valid = valid.repeat_interleave(B // groups, dim=0)
        kept = reference.auxk_select(src.float(), valid, k, signed).dense(C)
        # with fewer than k valid columns the selection reaches invalid ones: drop them
        return torch.where(valid, kept, 0.0).to(src.dtype)
    if src.stride(1) != 1:
        src = src.contiguous()
    out = torch.empty(B, C, device=src.device, dtype=src.dtype)
    if B and C:
        block = min(_pow2(C), 4096)
        _topk_mask_kernel[(B,)](src, valid.to(torch.uint8).contiguous(), out, C, src.stride(0),
                                k, max(B // groups, 1), SIGNED=signed, SHIFT=16 if src.dtype == torch.bfloat16 else 0,
                                BLOCK=block, ONE=C <= block, num_warps=8 if block >= 2048 else 4)
    return out


if AVAILABLE:

    @triton.jit
    def _iht_eta_kernel(x, xh, idx, W, step, rs, D, scale, K: tl.constexpr, KP: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        # One row: r = x - x_hat; g = <r, W_j> on the support; eta = scale ||g||^2 / ||g W||^2;
        # then r * eta in bfloat16 (the correlation's left side).
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, KP)
        km = kk < K
        j = tl.load(idx + row * K + kk, mask=km, other=0)
        g = tl.zeros([KP], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            r = (tl.load(x + row * D + d, mask=dm, other=0.0)
                 - tl.load(xh + row * D + d, mask=dm, other=0.0))
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            g += tl.sum(w.to(tl.float32) * r[None, :], axis=1)
        sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            dg = tl.sum(w.to(tl.float32) * g[:, None], axis=0)
            sq += dg * dg
        eta = tl.sum(g * g, axis=0) / tl.maximum(tl.sum(sq, axis=0), 1e-12) * scale
        tl.store(step + row, eta)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            r = (tl.load(x + row * D + d, mask=dm, other=0.0)
                 - tl.load(xh + row * D + d, mask=dm, other=0.0))
            tl.store(rs + row * D + d, (r * eta).to(rs.dtype.element_ty, fp_downcast_rounding="rtne"),
                     mask=dm)

    @triton.jit
    def _iht_update_inputs(idx, val, nidx, step, row, K, KP: tl.constexpr):
        # A row's old support and values (padding: -1, matching no latent), its new support
        # and its step size.
        kk = tl.arange(0, KP)
        km = kk < K
        j_old = tl.load(idx + row * K + kk, mask=km, other=-1)
        v_old = tl.load(val + row * K + kk, mask=km, other=0.0)
        j = tl.load(nidx + row * K + kk, mask=km, other=0)
        return kk, km, j_old, v_old, j, tl.load(step + row)

    @triton.jit
    def _iht_update_kernel(x, xh, val, idx, nidx, step, W, bias, out_val, out_idx, out_xh,
                           out_better, D, RPB, K: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
                           SIGNED: tl.constexpr, BIAS: tl.constexpr):
        # One row: the new support's values (old value where the latent was there already,
        # plus eta <r, W_j>), their decode, and whichever of new and old reconstructs x better.
        row = tl.program_id(0).to(tl.int64)
        kk, km, j_old, v_old, j, eta = _iht_update_inputs(idx, val, nidx, step, row, K, KP)
        c = tl.zeros([KP], dtype=tl.float32)
        e_old = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            r = (tl.load(x + row * D + d, mask=dm, other=0.0)
                 - tl.load(xh + row * D + d, mask=dm, other=0.0))
            e_old += r * r
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            c += tl.sum(w.to(tl.float32) * r[None, :], axis=1)
        same = (j[:, None] == j_old[None, :]) & km[:, None]  # padding (-1) matches nothing
        v = tl.sum(tl.where(same, v_old[None, :], 0.0), axis=1) + eta * c
        if not SIGNED:
            v = tl.maximum(v, 0.0)
        v = tl.where(km, v, 0.0)
        e_new = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            xn = tl.sum(w.to(tl.float32) * v[:, None], axis=0)
            if BIAS:  # RPB: rows per bias row (a stacked group: each model its own)
                xn += tl.load(bias + (row // RPB) * D + d, mask=dm, other=0.0)
            e = tl.load(x + row * D + d, mask=dm, other=0.0) - xn
            e_new += tl.where(dm, e * e, 0.0)
            tl.store(out_xh + row * D + d, xn, mask=dm)
        keep_new = tl.sum(e_new, axis=0) <= tl.sum(e_old, axis=0)
        tl.store(out_better + row, keep_new.to(tl.int8))
        if keep_new:
            tl.store(out_val + row * K + kk, v, mask=km)
            tl.store(out_idx + row * K + kk, j, mask=km)
        else:
            tl.store(out_val + row * K + kk, v_old, mask=km)
            tl.store(out_idx + row * K + kk, j_old, mask=km)
            tl.debug_barrier()  # the new decode's stores above come first
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                tl.store(out_xh + row * D + d, tl.load(xh + row * D + d, mask=dm, other=0.0),
                         mask=dm)


    # Whole-row versions for rows whose [K, D] table tile fits in registers (the study's
    # shapes): the support's rows of the table, the residual and the reconstruction are
    # each loaded once and reused by every phase, where the chunked kernels above reload
    # them per phase (on an H100 at d 384, k 16 those took 88-98 us per 4 096 rows, three
    # times a gathered decode's 27 us).

    @triton.jit
    def _iht_eta_row_kernel(x, xh, idx, W, step, rs, D, scale, K: tl.constexpr,
                            KP: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, KP)
        km = kk < K
        j = tl.load(idx + row * K + kk, mask=km, other=0)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        r = (tl.load(x + row * D + d, mask=dm, other=0.0)
             - tl.load(xh + row * D + d, mask=dm, other=0.0))
        w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        g = tl.sum(w * r[None, :], axis=1)
        dg = tl.sum(w * g[:, None], axis=0)
        eta = tl.sum(g * g, axis=0) / tl.maximum(tl.sum(dg * dg, axis=0), 1e-12) * scale
        tl.store(step + row, eta)
        tl.store(rs + row * D + d, (r * eta).to(rs.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=dm)

    @triton.jit
    def _iht_update_row_kernel(x, xh, val, idx, nidx, step, W, bias, out_val, out_idx, out_xh,
                               out_better, D, RPB, K: tl.constexpr, KP: tl.constexpr,
                               BLOCK_D: tl.constexpr, SIGNED: tl.constexpr,
                               BIAS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kk, km, j_old, v_old, j, eta = _iht_update_inputs(idx, val, nidx, step, row, K, KP)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        xr = tl.load(x + row * D + d, mask=dm, other=0.0)
        xo = tl.load(xh + row * D + d, mask=dm, other=0.0)
        r = xr - xo
        w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        c = tl.sum(w * r[None, :], axis=1)
        same = (j[:, None] == j_old[None, :]) & km[:, None]  # padding (-1) matches nothing
        v = tl.sum(tl.where(same, v_old[None, :], 0.0), axis=1) + eta * c
        if not SIGNED:
            v = tl.maximum(v, 0.0)
        v = tl.where(km, v, 0.0)
        xn = tl.sum(w * v[:, None], axis=0)
        if BIAS:
            xn += tl.load(bias + (row // RPB) * D + d, mask=dm, other=0.0)
        e = tl.where(dm, xr - xn, 0.0)
        better = tl.sum(e * e, axis=0) <= tl.sum(r * r, axis=0)
        tl.store(out_better + row, better.to(tl.int8))
        tl.store(out_val + row * K + kk, tl.where(better, v, v_old), mask=km)
        tl.store(out_idx + row * K + kk, tl.where(better, j, j_old), mask=km)
        tl.store(out_xh + row * D + d, tl.where(better, xn, xo), mask=dm)

#: The most table elements ([K, D], padded to powers of two) a whole-row IHT kernel holds.
ROW_TILE = 16384


def iht_row_fits(D: int, K: int) -> bool:
    """Whether the whole-row IHT kernels serve rows of width D with K latents."""
    return _pow2(D) * _pow2(K) <= ROW_TILE


def _iht_warps(D: int, K: int) -> int:
    return 8 if _pow2(D) * _pow2(K) > 8192 else 4


def _iht_grad_warps(D: int, K: int) -> int:
    # Half the forward row kernels' warps: on an H100 at d 384, k 16 (a [16, 512] tile) the
    # backward took 0.11 ms per 4 096 rows over 2 warps, 0.15 over 4 and 0.36 over 8; the
    # forward kernels were fastest over 4 (benchmarks/iht_rows_bench.py, RESULTS.md).
    return max(1, _iht_warps(D, K) // 2)


def _iht_block(D: int, K: int) -> int:
    """Columns per pass of the IHT row kernels: [K, BLOCK_D] of the table in registers."""
    return max(16, min(_pow2(D), 4096 // _pow2(K), 256))


def iht_eta(x: Tensor, x_hat: Tensor, idx: Tensor, W: Tensor, scale: float
            ) -> tuple[Tensor, Tensor]:
    """The first half of an IHT step without gradient, for [B, D] float32 x and x_hat, the
    support idx [B, K] and the bfloat16 table W [N, D]: (eta [B, 1] float32, the bfloat16
    scaled residual (x - x_hat) eta [B, D]), eta = scale ||g||^2 / ||g W_S||^2 for
    g = (x - x_hat) W_S^T (reference.iht_eta). One pass over each row where the stock ops
    take seven kernels."""
    B, K = idx.shape
    D = W.shape[1]
    if not (usable(W) and x.dtype == x_hat.dtype == torch.float32):
        r = x - x_hat
        g_S = gather_dot(r, idx, W)
        step = reference.iht_eta(g_S, gather_decode(g_S, idx, W), scale)
        return step, (r * step).to(W.dtype)
    step = torch.empty(B, 1, device=W.device, dtype=torch.float32)
    rs = torch.empty(B, D, device=W.device, dtype=W.dtype)
    if B:
        args = (x.contiguous(), x_hat.contiguous(), idx.contiguous(), W.contiguous(), step, rs,
                D, float(scale))
        if iht_row_fits(D, K):
            _iht_eta_row_kernel[(B,)](*args, K=K, KP=_pow2(K), BLOCK_D=_pow2(D),
                                      num_warps=_iht_warps(D, K))
        else:
            _iht_eta_kernel[(B,)](*args, K=K, KP=_pow2(K), BLOCK_D=_iht_block(D, K), num_warps=4)
    return step, rs


def iht_update(x: Tensor, x_hat: Tensor, val: Tensor, idx: Tensor, new_idx: Tensor, step: Tensor,
               W: Tensor, bias: Tensor | None, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The second half of an IHT step without gradient: on the new support ``new_idx`` [B, K]
    the values old + step <x - x_hat, W_j> (the old value where j was in ``idx`` already,
    ReLU unless signed), their decode (+ bias), and per row the new codes where they
    reconstruct x no worse than the old ones (reference.keep_better). bias: [D], or [G, D]
    for G equal blocks of rows (as gather_decode's).
    -> (val [B, K] float32, idx [B, K], reconstruction [B, D] float32)."""
    return _iht_update(x, x_hat, val, idx, new_idx, step, W, bias, signed)[:3]


def iht_update_kept(x: Tensor, x_hat: Tensor, val: Tensor, idx: Tensor, new_idx: Tensor,
                    step: Tensor, W: Tensor, bias: Tensor | None, signed: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``iht_update``'s three results and which rows took the new codes (bool [B]): the
    differentiated step's backward (``iht_grad``) follows that choice."""
    return _iht_update(x, x_hat, val, idx, new_idx, step, W, bias, signed)


def _iht_update(x, x_hat, val, idx, new_idx, step, W, bias, signed):
    B, K = idx.shape
    D = W.shape[1]
    groups = 1 if bias is None or bias.dim() == 1 else bias.shape[0]
    if B % groups:
        raise ValueError(f"{B} rows do not split into {groups} blocks")
    if not (usable(W) and x.dtype == x_hat.dtype == val.dtype == torch.float32):
        same = (new_idx.unsqueeze(-1) == idx.unsqueeze(-2)).to(val.dtype)
        v = (same @ val.unsqueeze(-1)).squeeze(-1) + step * gather_dot(x - x_hat, new_idx, W)
        if not signed:
            v = torch.relu(v)
        x_new = gather_decode(v, new_idx, W, bias)
        kept, x_kept = reference.keep_better(x, x_hat, reference.Codes(val, idx),
                                             reference.Codes(v, new_idx), x_new)
        better = (x - x_new).pow(2).sum(-1) <= (x - x_hat).pow(2).sum(-1)
        return kept.val, kept.idx, x_kept, better
    out_val = torch.empty(B, K, device=W.device, dtype=torch.float32)
    out_idx = torch.empty(B, K, device=W.device, dtype=idx.dtype)
    out_xh = torch.empty(B, D, device=W.device, dtype=torch.float32)
    better = torch.empty(B, device=W.device, dtype=torch.int8)
    if B:
        args = (x.contiguous(), x_hat.contiguous(), val.contiguous(), idx.contiguous(),
                new_idx.contiguous(), step.contiguous(), W.contiguous(),
                out_xh if bias is None else bias.float().contiguous(), out_val, out_idx, out_xh,
                better, D, max(B // groups, 1))
        if iht_row_fits(D, K):
            _iht_update_row_kernel[(B,)](*args, K=K, KP=_pow2(K), BLOCK_D=_pow2(D),
                                         SIGNED=signed, BIAS=bias is not None,
                                         num_warps=_iht_warps(D, K))
        else:
            _iht_update_kernel[(B,)](*args, K=K, KP=_pow2(K), BLOCK_D=_iht_block(D, K),
                                     SIGNED=signed, BIAS=bias is not None, num_warps=4)
    return out_val, out_idx, out_xh, better.bool()


if AVAILABLE:

    @triton.jit
    def _iht_grad_row_kernel(x, xh, val, idx, nidx, step, took, W, g_val, g_xh,
                             o_gval, o_gxh, o_wnx, o_wnr, o_wod, o_wor, o_gdg, o_r, D, scale,
                             K: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
                             SIGNED: tl.constexpr, HAS_GV: tl.constexpr, HAS_GX: tl.constexpr):
        # One row of iht_grad (its docstring has the maths): the new support's tile first
        # (the step size's gradient needs its correlations), then the old one's.
        row = tl.program_id(0).to(tl.int64)
        kk, km, j_old, v_old, j, eta = _iht_update_inputs(idx, val, nidx, step, row, K, KP)
        b = tl.load(took + row) != 0
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        r = (tl.load(x + row * D + d, mask=dm, other=0.0)
             - tl.load(xh + row * D + d, mask=dm, other=0.0))
        tl.store(o_r + row * D + d, r, mask=dm)
        gx = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_GX:
            gx = tl.load(g_xh + row * D + d, mask=dm, other=0.0)
        gvk = tl.zeros([KP], dtype=tl.float32)
        if HAS_GV:
            gvk = tl.load(g_val + row * K + kk, mask=km, other=0.0)
        w = tl.load(W + j[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        c = tl.sum(w * r[None, :], axis=1)
        same = (j[:, None] == j_old[None, :]) & km[:, None]
        v = tl.sum(tl.where(same, v_old[None, :], 0.0), axis=1) + eta * c
        gv = tl.sum(w * gx[None, :], axis=1) + gvk
        if not SIGNED:
            gv = tl.where(v > 0, gv, 0.0)
            v = tl.maximum(v, 0.0)
        gv = tl.where(km & b, gv, 0.0)
        g_step = tl.sum(gv * c, axis=0)
        g_c = eta * gv
        g_r = tl.sum(w * g_c[:, None], axis=0)
        tl.store(o_wnx + row * K + kk, tl.where(b, v, 0.0), mask=km)
        tl.store(o_wnr + row * K + kk, g_c, mask=km)
        wo = tl.load(W + j_old[:, None] * D + d[None, :], mask=km[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)
        gs = tl.sum(wo * r[None, :], axis=1)
        dg = tl.sum(wo * gs[:, None], axis=0)
        G = tl.sum(gs * gs, axis=0)
        Q = tl.sum(dg * dg, axis=0)
        Qc = tl.maximum(Q, 1e-12)
        g_G = g_step * scale / Qc
        g_Q = tl.where(Q >= 1e-12, -g_step * scale * G / (Qc * Qc), 0.0)
        g_dg = 2.0 * g_Q * dg
        g_gs = tl.where(km, 2.0 * g_G * gs + tl.sum(wo * g_dg[None, :], axis=1), 0.0)
        g_r += tl.sum(wo * g_gs[:, None], axis=0)
        tl.store(o_wod + row * K + kk, tl.where(b, gs, 0.0), mask=km)
        tl.store(o_wor + row * K + kk, g_gs, mask=km)
        tl.store(o_gdg + row * D + d, g_dg, mask=dm)
        g_old = tl.sum(tl.where(same, gv[:, None], 0.0), axis=0)  # over the old latents
        tl.store(o_gval + row * K + kk, tl.where(b, g_old, gvk), mask=km)
        tl.store(o_gxh + row * D + d, tl.where(b, -g_r, gx), mask=dm)


def iht_grad(x: Tensor, x_hat: Tensor, val: Tensor, idx: Tensor, new_idx: Tensor, step: Tensor,
             took: Tensor, W: Tensor, scale: float, signed: bool, g_val: Tensor | None,
             g_xh: Tensor | None) -> tuple[Tensor, ...]:
    """The backward of one differentiated IHT step (``iht_update_kept`` after ``iht_eta``,
    its support ``new_idx`` chosen without gradient), one pass over each row.

    The step, per row that took the new codes (``took``): r = x - x_hat; on the old support
    g_S = W_S r, Dg = g_S W_S, step = scale ||g_S||^2 / max(||Dg||^2, 1e-12); on the new one
    c = W_new r, v = ReLU(same @ val + step c) (no ReLU when signed), x_new = v W_new (+ bias).
    A row that kept its old codes passes the gradients g_val [B, K] and g_xh [B, D] (either
    None: zero) of the step's outputs straight through.

    -> (d val [B, K], d x_hat [B, D], and the decoder's gradient in four k-sparse parts: the
    weights of g_xh and of r on the new support, of dDg and of r on the old one
    ([B, K] each), then dDg [B, D] and r [B, D]; the caller reduces each weight with its
    source over the latents, kernels.Segments). The bias's gradient is g_xh on the rows in
    ``took``. Computed in x's dtype."""
    B, K = idx.shape
    D = W.shape[1]
    if not (usable(W) and x.dtype == x_hat.dtype == val.dtype == torch.float32
            and iht_row_fits(D, K) and (g_xh is None or g_xh.dtype == torch.float32)
            and (g_val is None or g_val.dtype == torch.float32)):
        return _iht_grad_stock(x, x_hat, val, idx, new_idx, step, took, W, scale, signed,
                               g_val, g_xh)
    f32 = dict(device=W.device, dtype=torch.float32)
    gval, wnx, wnr, wod, wor = (torch.empty(B, K, **f32) for _ in range(5))
    gxh, gdg, r = (torch.empty(B, D, **f32) for _ in range(3))
    if B:
        _iht_grad_row_kernel[(B,)](
            x.contiguous(), x_hat.contiguous(), val.contiguous(), idx.contiguous(),
            new_idx.contiguous(), step.contiguous(), took.to(torch.int8).contiguous(),
            W.contiguous(), r if g_val is None else g_val.contiguous(),
            r if g_xh is None else g_xh.contiguous(), gval, gxh, wnx, wnr, wod, wor, gdg, r,
            D, float(scale), K=K, KP=_pow2(K), BLOCK_D=_pow2(D), SIGNED=signed,
            HAS_GV=g_val is not None, HAS_GX=g_xh is not None, num_warps=_iht_grad_warps(D, K))
    return gval, gxh, wnx, wnr, wod, wor, gdg, r


def _iht_grad_stock(x, x_hat, val, idx, new_idx, step, took, W, scale, signed, g_val, g_xh):
    """iht_grad in stock torch ops, in x's dtype (the tests' float64), the supports' table
    rows gathered into [B, K, D] tensors: CPU tensors, and rows too wide for the row kernel
    (where the op sets take the unfused step instead: ops.iht_step_unfused)."""
    Wf = W.to(x.dtype)

    def dot(g, j):
        return torch.einsum("bkd,bd->bk", Wf[j], g)

    def dec(v, j):
        return torch.einsum("bk,bkd->bd", v, Wf[j])
    r = x - x_hat
    b = took.bool().unsqueeze(-1)
    gx = torch.zeros_like(x) if g_xh is None else g_xh.to(x.dtype)
    gvk = torch.zeros_like(val) if g_val is None else g_val.to(val.dtype)
    c = dot(r, new_idx)
    same = (new_idx.unsqueeze(-1) == idx.unsqueeze(-2)).to(val.dtype)  # [B, K new, K old]
    v = (same @ val.unsqueeze(-1)).squeeze(-1) + step * c
    gv = dot(gx, new_idx) + gvk
    if not signed:
        gv = gv * (v > 0)
        v = v.clamp_min(0)
    gv = gv * b
    g_step = (gv * c).sum(-1, keepdim=True)
    g_c = step * gv
    gs = dot(r, idx)
    dg = dec(gs, idx)
    G, Q = gs.pow(2).sum(-1, keepdim=True), dg.pow(2).sum(-1, keepdim=True)
    Qc = Q.clamp_min(1e-12)
    g_G = g_step * scale / Qc
    g_Q = torch.where(Q >= 1e-12, -g_step * scale * G / (Qc * Qc), 0.0)
    g_dg = 2.0 * g_Q * dg
    g_gs = 2.0 * g_G * gs + dot(g_dg, idx)
    g_r = dec(g_c, new_idx) + dec(g_gs, idx)
    g_old = (same.transpose(1, 2) @ gv.unsqueeze(-1)).squeeze(-1)
    return (torch.where(b, g_old, gvk), torch.where(b, -g_r, gx), v * b, g_c, gs * b, g_gs,
            g_dg, r)


def fvu_parts(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x - x_hat, ||x - x_hat||^2, ||x - mean_rows(x)||^2) for [B, D] float32, in one pass
    over both (where torch's column variance alone took 65 us at B 8192, D 768 on an H200)."""
    B, D = x.shape
    if not (usable(x) and x.dtype == x_hat.dtype == torch.float32 and B):
        return reference.fvu_parts(x, x_hat)
    x, x_hat = x.contiguous(), x_hat.contiguous()
    rows = 32
    P = triton.cdiv(B, rows)  # 256 programs at B 8192
    err = torch.empty_like(x)
    sq = torch.empty(P, device=x.device, dtype=torch.float32)
    s1 = torch.empty(P, D, device=x.device, dtype=torch.float32)
    s2 = torch.empty(P, D, device=x.device, dtype=torch.float32)
    bd = min(_pow2(D), 1024)
    _fvu_kernel[(P,)](x, x_hat, err, sq, s1, s2, B, D, ROWS=rows, TR=4, BLOCK_D=bd,
                      num_warps=8)
    c1 = s1.sum(0)
    return err, sq.sum(), (s2.sum(0) - c1 * c1 / B).sum()


class Segments:
    """The latents of a batch's codes sorted once: the sparse matrix G^T in CSR form
    (rows = latents, columns = batch rows), for the weight gradients of a k-sparse map.

    ``reduce`` multiplies it with a dense [B, D] matrix (cuSPARSE SpMM): on an H200 at
    B 8192, k 32, N 24 576, D 768 that took 0.30 ms against 0.52 ms for a bfloat16 scatter +
    dense matmul, 0.86 ms for a hand-written Triton segmented sum and 2.0 ms for index_add_.
    """

    def __init__(self, idx: Tensor, n: int) -> None:
        self.idx, self.n, self.K = idx, n, idx.shape[1]
        self._cols: dict[int, Tensor] = {}
        if not usable(idx):
            return
        # Narrow keys take fewer radix passes: 16 bits wherever the latents (and n + 1, the
        # binary search's last bound) fit, 32 otherwise (an H100 sorted 65 536 keys in 45-57
        # µs as int16 against 64-67 µs as int32, benchmarks/RESULTS.md). Stable, so the
        # order, and the sums in it, is the same for either width. Row offsets come from the
        # sorted keys by binary search (torch.bincount on CUDA would wait for the host).
        kdt = torch.int16 if n < 2**15 - 1 else torch.int32
        srt, order = torch.sort(idx.reshape(-1).to(kdt), stable=True)
        self.order = order
        self.crow = torch.searchsorted(srt, torch.arange(n + 1, device=idx.device, dtype=kdt))
        self.col = order // self.K

    def reduce(self, wts: Tensor, src: Tensor) -> Tensor:
        """out[n] = sum_{idx[b, j] = n} wts[b, j] src[b] -> float32 [N, D].

        src may have fewer rows R than idx, R dividing them: row b of the codes then reads
        src[b % R] (a stacked group of models encoding the same batch)."""
        if not usable(src):
            return torch.zeros(self.n, src.shape[1], dtype=torch.float32,
                               device=src.device).index_add_(0, self.idx.reshape(-1),
                                                             self._rows(wts, src))
        return self._csr(wts, src) @ src.float()

    def reduce_into(self, out: Tensor, wts: Tensor, src: Tensor) -> None:
        """out += the same, in place (the sparse product accumulates: no [N, D] temporary)."""
        if not usable(src):
            out.index_add_(0, self.idx.reshape(-1), self._rows(wts, src))
            return
        out.addmm_(self._csr(wts, src), src.float())

    def _rows(self, wts: Tensor, src: Tensor) -> Tensor:
        rows = self.idx.shape[0]
        if src.shape[0] != rows:
            src = src.repeat(self._repeats(src), 1)
        return (wts.float()[..., None] * src.float()[:, None, :]).reshape(-1, src.shape[1])

    def _repeats(self, src: Tensor) -> int:
        rows, R = self.idx.shape[0], src.shape[0]
        if not R or rows % R:
            raise ValueError(f"{R} source rows for {rows} rows of codes")
        return rows // R

    def _csr(self, wts: Tensor, src: Tensor) -> Tensor:
        vals = wts.reshape(-1).float()[self.order]
        R = src.shape[0]
        col = self.col
        if R != self.idx.shape[0]:
            self._repeats(src)
            if R not in self._cols:
                self._cols[R] = self.col % R
            col = self._cols[R]
        with warnings.catch_warnings():  # "CSR support is in beta": SpMM is all we use
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow.long(), col, vals,
                                           size=(self.n, R), check_invariants=False)


#: Correctly rounded sqrt and division in Triton (torch's ops round so); a Triton without
#: them takes the fast forms (a few ulp).
_PRECISE = AVAILABLE and hasattr(tl, "sqrt_rn") and hasattr(tl, "div_rn")

if AVAILABLE:

    @triton.jit
    def _adam_rows_kernel(p, g, m, v, step_size, bc2_sqrt, n, per, one_m_beta1, beta2,
                          one_m_beta2, eps, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = o < n
        model = o // per
        a = tl.load(step_size + model, mask=msk, other=0.0)
        c2 = tl.load(bc2_sqrt + model, mask=msk, other=1.0)
        gv = tl.load(g + o, mask=msk, other=0.0)
        mv = tl.load(m + o, mask=msk, other=0.0)
        vv = tl.load(v + o, mask=msk, other=0.0)
        pv = tl.load(p + o, mask=msk, other=0.0)
        # 1 - beta comes from the host in float64: in float32, 1 - 0.999 is off by 1.3e-5
        # of itself (an H100 saw that as the fused step's error against torch's Adam).
        mv = mv + one_m_beta1 * (gv - mv)  # lerp, as torch.optim.Adam
        vv = vv * beta2 + one_m_beta2 * gv * gv
        if PRECISE:
            denom = tl.div_rn(tl.sqrt_rn(vv), c2) + eps
            step = tl.div_rn(mv, denom)
        else:
            denom = tl.sqrt(vv) / c2 + eps
            step = mv / denom
        tl.store(m + o, mv, mask=msk)
        tl.store(v + o, vv, mask=msk)
        tl.store(p + o, pv - a * step, mask=msk)


def adam_rows_(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor,
               bc2_sqrt: Tensor, betas: tuple[float, float] = reference.ADAM_BETAS,
               eps: float = 1e-8) -> None:
    """reference.adam_rows_ (Adam on M stacked models, each its own step size and bias
    correction [M]) in one pass over the four tensors, where stock ops take about ten."""
    ts = (p, g, exp_avg, exp_avg_sq)
    if not all(usable(t) and t.is_contiguous() and t.dtype == torch.float32 for t in ts):
        reference.adam_rows_(p, g, exp_avg, exp_avg_sq, step_size, bc2_sqrt, betas, eps)
        return
    n = p.numel()
    M = step_size.numel()
    if n % M:
        raise ValueError(f"{n} elements do not split into {M} models")
    if n:
        _adam_rows_kernel[(triton.cdiv(n, 4096),)](
            p, g, exp_avg, exp_avg_sq, step_size, bc2_sqrt, n, n // M, 1 - betas[0], betas[1],
            1 - betas[1], eps, BLOCK=4096, PRECISE=_PRECISE, num_warps=8)
