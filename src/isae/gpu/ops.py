"""The fast op set (``FastOps``): the TopK family's hot loop for CUDA tensors, computing what
the reference op set (isae.models.reference.ReferenceOps) computes.

isae.models.compute.select_ops hands it to models on CUDA. The reference lets autograd
differentiate ``topk`` + ``gather`` and ``embedding_bag``; on a GPU that costs a dense
[B, N] float32 gradient, an ``index_add_`` for the encoder weight and a float32 matmul.
Here the sparse maps get their own backward, built on the Triton kernels of kernels.py:

* encoder: pre = (x - b_dec) W_enc + b_enc in bfloat16 (float32 accumulation), then a
  Triton top-k. Backward: dW_enc is a segmented reduction of the k code gradients over the
  latents (each latent sums its rows of x - b_dec), db_enc a k-sparse index_add, and
  db_dec = -db_enc W_enc^T needs no [B, D] gradient at all.
* decoder: x_hat = sum_j val_j W_dec[idx_j] + b_dec from a bfloat16 copy of W_dec, float32
  accumulation. Backward: d val by gathered dot products, dW_dec by the same segmented
  reduction (the latents are sorted once and shared with the encoder's backward).
* Every reader of W_dec in a step (decoder, AuxK's decode, a tied encoder, each IHT step)
  adds its weight gradient into one [N, D] buffer (``collect``), which autograd receives
  once.
* AuxK computes the dead latents' pre-activations by its own small matmul (a fixed number
  of columns, so a step's shapes do not depend on how many are dead), keeps each row's top
  k_aux with a Triton kernel, and its encoder gradient goes into the main [N, D] buffer.
* The FVU (loss and AuxK's) is one pass over x and x_hat.
* IHT (isae-iter) selects each new support from a dense bfloat16 correlation computed
  without gradient, and differentiates only what the step keeps: the new values, their
  decode and the step size, as one autograd function (``iht_step_grad``) whose forward is
  the two row kernels below and whose backward is one row kernel (kernels.iht_grad) and
  the decoder's segmented reductions. With ``+sg`` the steps are not differentiated at all:
  two row kernels per step
  (kernels.iht_eta, kernels.iht_update) around the correlation and its top-k, the
  decoder sees the final codes as constants, and the amortised codes' decode (the steps'
  starting point) is differentiated for their own loss term.

Parameters, optimiser state, the loss and the reconstruction stay float32. On CPU tensors
the kernels fall back to stock torch, so the same functions run anywhere. The checks that
these paths match the float32 reference are tests/test_fast_cpu.py (the op set on stock
ops), tests/test_kernels.py (Triton in interpret mode), tests/test_fast_gpu.py (GPU only)
and benchmarks/gpu_bench.py.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from isae.gpu import kernels
from isae.gpu.cuda_graphs import StepGraphs
from isae.models.reference import AuxLatents, Codes, Weights, fit_to, iht_eta, keep_better

LOW = torch.bfloat16


def low(W: Tensor) -> Tensor:
    """A bfloat16 copy of a parameter, made once per version of it (a step casts W_dec for
    the encoder of a tied model, the decoder, its backward and every IHT step; the
    optimiser's in-place update bumps the version and so invalidates the copy).

    A view of the parameter (``collect``'s, or its transpose) gets the same view of the
    parameter's copy. The copy keeps its buffer: it is refreshed in place, so a recorded
    CUDA graph that reads it (cuda_graphs.py) always finds the current one there.
    """
    owner = W if W._base is None else W._base
    cached = getattr(owner, "_isae_low", None)
    if not (cached is not None and cached[0] == owner._version and cached[1].shape == owner.shape):
        buf = _low_buffer(owner)
        buf.copy_(owner.detach())
        owner._isae_low = (owner._version, buf)
        cached = owner._isae_low
    buf = cached[1]
    if owner is W:
        return buf
    if buf.stride() != owner.stride():  # a parameter not dense in memory: no shared view
        return W.detach().to(LOW)
    return buf.as_strided(W.shape, W.stride(), W.storage_offset() - owner.storage_offset())


def _low_buffer(W: Tensor) -> Tensor:
    """The buffer that holds W's bfloat16 copy: the cached one when its shape still fits; a
    new one keeps W's strides (W_enc is stored latent-major)."""
    cached = getattr(W, "_isae_low", None)
    if cached is not None and cached[1].shape == W.shape:
        return cached[1]
    return torch.empty_like(W, dtype=LOW)


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
        err, sse, total_var = kernels.fvu_parts(x, x_hat)
        total_var = total_var.clamp_min(1e-12)
        ctx.save_for_backward(err, total_var)
        ctx.mark_non_differentiable(err)
        ctx.set_materialize_grads(False)  # no [B, D] zeros for the residual's gradient
        return sse / total_var, err

    @staticmethod
    def backward(ctx, g: Tensor, _g_err):
        if g is None:
            return None, None
        err, total_var = ctx.saved_tensors
        return None, kernels.scale(err, g, total_var, -2.0)


def fvu(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(FVU = ||x - x_hat||^2 / ||x - mean(x)||^2, the residual x - x_hat without gradient).

    Differentiable in x_hat only (x is data). One pass over x and x_hat (kernels.fvu_parts)
    and one elementwise backward, where autograd on the stock expression launches about a
    dozen [B, D] kernels.
    """
    return _FVU.apply(x, x_hat)


def _segments(ctx, idx: Tensor, n: int, holder: dict | None = None) -> kernels.Segments:
    """The sorted latents of ``idx``, built once and shared by the functions that saw it
    (``holder``: ``_holder(idx)``, by default the one a function kept as ``ctx.holder``)."""
    holder = ctx.holder if holder is None else holder
    if "seg" not in holder:
        holder["seg"] = kernels.Segments(idx, n)
    return holder["seg"]


def _holder(idx: Tensor) -> dict:
    # On the tensor that owns the memory: the views of one index tensor (a stacked group
    # flattens its [M, B, K] codes) share one sort.
    owner = idx if idx._base is None else idx._base
    h = getattr(owner, "_isae_holder", None)
    if h is None:
        h = {}
        owner._isae_holder = h
    return h


def mm32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for bfloat16 a, b as float32: on the GPU a bfloat16 product, then a cast (the
    kernels the benchmarks measured); on the CPU in float32."""
    if a.is_cuda:
        return (a @ b).float()
    return a.float() @ b.float()


class DecoderGrads:
    """Where the fast functions that read the decoder in one step put its [N, D] gradient.

    A step reads W_dec in several places (the decoder, AuxK's decode, the encoder of a tied
    model, every IHT step's decode and correlations). Left to autograd, each would hand back
    its own [N, D] float32 gradient and autograd would add them up: a 225 MB pass each.
    Here the first sparse product writes the buffer and the rest accumulate into it in place;
    ``collect``'s backward hands the sum to autograd once.
    """

    def __init__(self, n: int, d: int) -> None:
        self.n, self.d = n, d
        self.acc: Tensor | None = None

    def add_segments(self, seg: kernels.Segments, wts: Tensor, src: Tensor) -> None:
        """+= sum over (b, j) with idx[b, j] = n of wts[b, j] src[b] (seg from idx)."""
        if self.acc is None:
            self.acc = seg.reduce(wts, src)
        else:
            seg.reduce_into(self.acc, wts, src)

    def add_rows(self, rows: Tensor, vals: Tensor) -> None:
        """+= vals [C, D] on the rows ``rows`` [C] (distinct)."""
        if self.acc is None:
            self.acc = torch.zeros(self.n, self.d, device=vals.device, dtype=torch.float32)
        self.acc.index_add_(0, rows, vals)

    def take(self) -> Tensor | None:
        acc, self.acc = self.acc, None
        return acc


class _Collect(Function):
    @staticmethod
    def forward(ctx, W: Tensor, grads: DecoderGrads):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return W.view_as(W)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        # Runs after every function that read the view: they all feed this node.
        acc = ctx.grads.take()
        if acc is None:
            return g, None
        if g is not None:  # stock ops read the view too
            acc += g
        return acc, None


def collect(W: Tensor) -> tuple[Tensor, DecoderGrads]:
    """(a view of the decoder weight W [N, D], the buffer its fast readers add to).

    The fast functions given this view and buffer return no gradient for it themselves; the
    view's backward returns their sum (and whatever stock ops added) as W's gradient.
    """
    grads = DecoderGrads(*W.shape)
    return _Collect.apply(W, grads), grads


def aux_columns(dead: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``width`` latent columns for AuxK, the dead ones first (in index order), and which of
    them are dead. A fixed width gives every step the same shapes whatever the number of
    dead latents, and needs no host sync (CUDA graphs, cuda_graphs.py)."""
    cols = torch.argsort(dead.logical_not().to(torch.uint8), stable=True)[:width]
    return cols, dead.index_select(0, cols)


class _TopKEncode(Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, signed: bool, aux_cols, aux_valid,
                k_aux: int, grads: DecoderGrads | None):
        xc = kernels.sub_cast(x, b_dec, LOW)
        # [D, N]. A tied model's is the decoder's cached copy, transposed (normalize_rows_
        # rewrites it after each step, also inside a CUDA graph); W_enc itself changes every
        # step and nothing in a recorded step would refresh a cached copy of it.
        W_low = low(W_enc) if grads is not None else W_enc.detach().to(LOW)
        pre = torch.addmm(b_enc.to(LOW), xc, W_low)  # [B, N] bf16
        val, idx = kernels.topk_rows(pre, k, signed)
        if aux_cols is None:
            z = val.new_zeros(x.shape[0], 0, dtype=LOW)
        else:
            # AuxK's columns by their own small matmul (a column gather from `pre` reads all
            # of it), then its top-k_aux among the dead ones, as a dense bf16 matrix.
            sub = torch.addmm(b_enc.index_select(0, aux_cols).to(LOW), xc,
                              W_low.index_select(1, aux_cols))
            z = kernels.topk_mask_rows(sub, k_aux, signed, aux_valid)
        ctx.save_for_backward(xc, W_enc, idx, val, aux_cols, z)
        ctx.signed = signed
        ctx.grads = grads
        ctx.holder = _holder(idx)
        ctx.mark_non_differentiable(idx, pre)
        ctx.set_materialize_grads(False)  # no [B, N] zeros for `pre`'s gradient
        return val, idx, pre, z

    @staticmethod
    def backward(ctx, g_val: Tensor | None, _g_idx, _g_pre, g_z: Tensor | None):
        xc, W_enc, idx, val, cols, z = ctx.saved_tensors
        # No g_val: the codes were not differentiated (AuxK alone, or +sg's steps replaced
        # them), and their share of the gradients is zero: no sort, no sparse product.
        if g_val is not None and not ctx.signed:
            g_val = g_val * (val > 0)
        N = W_enc.shape[1]
        db_enc = torch.zeros(N, device=xc.device, dtype=torch.float32)
        if g_val is not None:
            db_enc.index_add_(0, idx.reshape(-1), g_val.reshape(-1).float())
        g_aux = None
        if cols is not None and g_z is not None:
            g_aux = kernels.keep_where(g_z.to(LOW), z)  # [B, C]: the kept codes only
            db_enc.index_add_(0, cols, g_aux.sum(0, dtype=torch.float32))
        dW = None
        if ctx.needs_input_grad[2]:
            # A tied model's share goes into the decoder's one buffer; an untied encoder's
            # into its own. AuxK's rows first: the sparse product then accumulates onto
            # them (no rescaling pass).
            grads = _buffer(ctx, N, xc.shape[1])
            if g_aux is not None:
                grads.add_rows(cols, mm32(g_aux.T, xc))  # [C, D]
            if g_val is not None:
                grads.add_segments(_segments(ctx, idx, N), g_val, xc)
            if ctx.grads is None:
                # [D, N] as a view: W_enc is stored latent-major (sparse_coder.py), so this is its
                # own layout and autograd takes it without a copy.
                acc = grads.take()
                dW = None if acc is None else acc.T
        db_dec = -(db_enc @ W_enc.T) if ctx.needs_input_grad[1] else None
        return (None, db_dec, dW, db_enc if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None)


def topk_encode(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, signed: bool,
                aux: tuple[Tensor, Tensor] | None = None, k_aux: int = 0,
                grads: DecoderGrads | None = None):
    """-> (val [B, K] float32, idx [B, K], pre [B, N] bfloat16 no grad, z [B, C] bfloat16).

    aux = (cols [C], valid [C]) from ``aux_columns``: z holds AuxK's codes on those columns,
    the k_aux largest of each row kept, zero elsewhere and on columns not valid. Without aux
    z is [B, 0]. grads: for a tied model, W_enc is ``collect``'s view transposed and its
    weight gradient goes there.
    """
    cols, valid = aux if aux is not None else (None, None)
    return _TopKEncode.apply(x, b_dec, W_enc, b_enc, k, signed, cols, valid, k_aux, grads)


class _AuxDecode(Function):
    @staticmethod
    def forward(ctx, z: Tensor, cols: Tensor, W_dec: Tensor, grads: DecoderGrads | None):
        W_rows = low(W_dec).index_select(0, cols)  # [C, D]
        ctx.save_for_backward(z, cols, W_rows)
        ctx.grads, ctx.n = grads, W_dec.shape[0]
        return mm32(z, W_rows)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, cols, W_rows = ctx.saved_tensors
        g_low = g.to(LOW)
        g_z = g_low @ W_rows.T if ctx.needs_input_grad[0] else None
        dW = None
        if ctx.needs_input_grad[2]:
            grads = _buffer(ctx, ctx.n, g.shape[1])
            grads.add_rows(cols, mm32(z.T, g_low))
            dW = grads.take() if ctx.grads is None else None
        return g_z, None, dW, None


def aux_decode(z: Tensor, cols: Tensor, W_dec: Tensor, grads: DecoderGrads | None = None) -> Tensor:
    """AuxK's reconstruction z [B, C] @ W_dec[cols] -> float32 [B, D] (bf16 products)."""
    return _AuxDecode.apply(z, cols, W_dec, grads)


def _buffer(ctx, n: int, d: int) -> DecoderGrads:
    """The step's decoder-gradient buffer, or a fresh one for this function's own gradient."""
    return ctx.grads if ctx.grads is not None else DecoderGrads(n, d)


def _decoder_grad(ctx, idx: Tensor, wts: Tensor, src: Tensor) -> Tensor | None:
    """W_dec's gradient from a k-sparse reader: sum over (b, j) of wts[b, j] src[b] on row
    idx[b, j]. Into the step's buffer when there is one (then None for autograd)."""
    grads = _buffer(ctx, ctx.n, src.shape[1])
    grads.add_segments(_segments(ctx, idx, ctx.n), wts, src)
    return grads.take() if ctx.grads is None else None


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, val: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None,
                bias: Tensor | None):
        W_low = low(W_dec)
        ctx.save_for_backward(val, idx, W_low)
        ctx.n, ctx.grads = W_dec.shape[0], grads
        ctx.holder = _holder(idx)
        return kernels.gather_decode(val, idx, W_low, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        val, idx, W_low = ctx.saved_tensors
        g_val = kernels.gather_dot(g, idx, W_low) if ctx.needs_input_grad[0] else None
        dW = _decoder_grad(ctx, idx, val, g) if ctx.needs_input_grad[2] else None
        db = g.sum(0) if ctx.needs_input_grad[4] else None
        return g_val, None, dW, None, db


def sparse_decode(val: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None = None,
                  bias: Tensor | None = None) -> Tensor:
    """sum_j val_j W_dec[idx_j] (+ bias), float32 [B, D], with a segmented-reduction
    backward (into ``grads`` when W_dec is ``collect``'s view)."""
    return _SparseDecode.apply(val, idx, W_dec, grads, bias)


class _GatherDot(Function):
    @staticmethod
    def forward(ctx, r: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None):
        W_low = low(W_dec)
        ctx.save_for_backward(r, idx, W_low)
        ctx.n, ctx.grads = W_dec.shape[0], grads
        ctx.holder = _holder(idx)
        return kernels.gather_dot(r, idx, W_low)

    @staticmethod
    def backward(ctx, g: Tensor):
        r, idx, W_low = ctx.saved_tensors
        dr = kernels.gather_decode(g, idx, W_low) if ctx.needs_input_grad[0] else None
        dW = _decoder_grad(ctx, idx, g, r) if ctx.needs_input_grad[2] else None
        return dr, None, dW, None


def gather_dot(r: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None = None) -> Tensor:
    """<r[b], W_dec[idx[b, j]]>, float32 [B, K], differentiable in r and W_dec."""
    return _GatherDot.apply(r, idx, W_dec, grads)


def select_topk(score_src: Tensor, k: int, signed: bool, hint: Tensor | None = None) -> Tensor:
    """Indices [B, k] of the top-k of a (bfloat16) matrix, no gradient. ``hint`` [B, k]: the
    rows' previous support (an IHT step's), which bounds the search (kernels.topk_rows_hinted;
    the same indices; while kernels.HINT_CAP is 0, the default, the hint is not used)."""
    if hint is not None and kernels.HINT_CAP:
        return kernels.topk_rows_hinted(score_src, k, signed, hint)[1]
    return kernels.topk_rows(score_src, k, signed)[1]


class _IHTStep(Function):
    @staticmethod
    def forward(ctx, x_hat: Tensor, val: Tensor, W_dec: Tensor, bias: Tensor | None, x: Tensor,
                idx: Tensor, new_idx: Tensor, step: Tensor, grads: DecoderGrads | None,
                scale: float, signed: bool):
        W_low = low(W_dec)
        b = None if bias is None else bias.detach()
        val_k, idx_k, xh_k, took = kernels.iht_update_kept(x, x_hat, val, idx, new_idx, step,
                                                           W_low, b, signed)
        ctx.save_for_backward(x, x_hat, val, idx, new_idx, step, took, W_low)
        ctx.grads, ctx.n, ctx.scale, ctx.signed = grads, W_dec.shape[0], scale, signed
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.old, ctx.new = _holder(idx), _holder(new_idx)
        ctx.mark_non_differentiable(idx_k)
        ctx.set_materialize_grads(False)
        return val_k, idx_k, xh_k

    @staticmethod
    def backward(ctx, g_val: Tensor | None, _g_idx, g_xh: Tensor | None):
        x, x_hat, val, idx, new_idx, step, took, W_low = ctx.saved_tensors
        g_old, g_xhat, wnx, wnr, wod, wor, gdg, r = kernels.iht_grad(
            x, x_hat, val, idx, new_idx, step, took, W_low, ctx.scale, ctx.signed, g_val, g_xh)
        dW = db = None
        if ctx.needs_input_grad[2]:
            grads = _buffer(ctx, ctx.n, x.shape[1])
            new = _segments(ctx, new_idx, ctx.n, ctx.new)
            old = _segments(ctx, idx, ctx.n, ctx.old)
            if g_xh is not None:
                grads.add_segments(new, wnx, g_xh)
            grads.add_segments(new, wnr, r)
            grads.add_segments(old, wod, gdg)
            grads.add_segments(old, wor, r)
            dW = grads.take() if ctx.grads is None else None
        if ctx.bias_shape is not None and ctx.needs_input_grad[3] and g_xh is not None:
            # x_new's bias ([D], or [G, D]: one per block of rows): the rows that took the
            # new codes
            groups = ctx.bias_shape[0] if len(ctx.bias_shape) == 2 else 1
            db = (g_xh * took.unsqueeze(-1)).view(groups, -1, g_xh.shape[1]).sum(1)
            db = db.view(ctx.bias_shape)
        return (g_xhat, g_old, dW, db, None, None, None, None, None, None, None)


def iht_step_grad(x: Tensor, x_hat: Tensor, val: Tensor, idx: Tensor, new_idx: Tensor,
                  step: Tensor, W_dec: Tensor, grads: DecoderGrads | None, bias: Tensor | None,
                  scale: float, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The second half of a differentiated IHT step on rows [R, D] (a stacked group's
    flattened, with global indices): the new codes on ``new_idx`` (chosen without gradient
    from the correlation scaled by ``step``, kernels.iht_eta's), their decode (+ bias: [D],
    or [G, D] for G equal blocks of rows) and per row the better of new and old, as
    kernels.iht_update; differentiable in x_hat, val, W_dec (into ``grads``) and the bias,
    with the step size differentiated as a function of x_hat and W_dec.

    One row kernel forward and one backward (kernels.iht_grad), where the step written
    in stock ops and the gathered products took some forty kernels on the GPU.
    -> (val [R, K], idx [R, K], reconstruction [R, D])."""
    return _IHTStep.apply(x_hat, val, W_dec, bias, x, idx, new_idx, step, grads, scale, signed)


def iht_step_fused(x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                   scale: float) -> tuple[Codes, Tensor]:
    """FastOps.iht_step as kernels.iht_eta, the correlation and its top-k, then
    ``iht_step_grad``: about ten kernels forward and backward."""
    with torch.no_grad():
        W_low = low(w.dec)
        step, rs = kernels.iht_eta(x, x_hat.detach(), codes.idx, W_low, scale)
        # (step r) W^T: the step scales the small [B, D] side, not the [B, N] product
        u = rs @ W_low.T  # [B, N] bf16
        u = u.scatter_add_(-1, codes.idx, codes.val.detach().to(u.dtype))
        idx = select_topk(u, k, signed, hint=codes.idx)
    # New value = the old code value (where the atom was already in the support) plus the
    # step along the float32 correlation; the row keeps the better of old and new.
    val, idx, x_new = iht_step_grad(x, x_hat, codes.val, codes.idx, idx, step, w.dec, w.grads,
                                    w.b_dec, scale, signed)
    return Codes(val, idx), x_new


def iht_step_unfused(ops, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int,
                     signed: bool, scale: float) -> tuple[Codes, Tensor]:
    """FastOps.iht_step from the gathered products, autograd differentiating the step size
    and the kept correlations (about forty kernels on the GPU; ``ops.decode`` decodes)."""
    r = x - x_hat
    g_S = gather_dot(r, codes.idx, w.dec, w.grads)
    step = iht_eta(g_S, sparse_decode(g_S, codes.idx, w.dec, w.grads), scale)
    with torch.no_grad():
        # (step r) W^T: the step scales the small [B, D] side, not the [B, N] product
        u = (r * step).to(LOW) @ low(w.dec).T  # [B, N] bf16
        u = u.scatter_add_(-1, codes.idx, codes.val.to(u.dtype))
        idx = select_topk(u, k, signed, hint=codes.idx)
    same = (idx.unsqueeze(-1) == codes.idx.unsqueeze(-2)).to(codes.val.dtype)
    val = (same @ codes.val.unsqueeze(-1)).squeeze(-1) + step * gather_dot(r, idx, w.dec, w.grads)
    if not signed:
        val = torch.relu(val)
    new = Codes(val, idx)
    return keep_better(x, x_hat, codes, new, ops.decode(new, w))


class _KnownDecode(Function):
    @staticmethod
    def forward(ctx, val: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None,
                bias: Tensor | None, out: Tensor):
        ctx.save_for_backward(val, idx, low(W_dec))
        ctx.n, ctx.grads = W_dec.shape[0], grads
        ctx.holder = _holder(idx)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: Tensor):
        return (*_SparseDecode.backward(ctx, g), None)


def known_decode(val: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None,
                 bias: Tensor | None, out: Tensor) -> Tensor:
    """``sparse_decode`` whose result ``out`` [B, D] was computed already (without gradient):
    the same backward, no second gathered decode."""
    return _KnownDecode.apply(val, idx, W_dec, grads, bias, out)


class FastOps:
    """The fast op set (see the module docstring); the same methods as
    isae.models.reference.ReferenceOps.

    cuda_graphs: whether the trainer replays a step as a CUDA graph (CUDA tensors only).
    """

    name = "fast"

    def __init__(self, cuda_graphs: bool = True) -> None:
        self.cuda_graphs = cuda_graphs

    def __repr__(self) -> str:
        return f"FastOps(cuda_graphs={self.cuda_graphs})"

    def weights(self, W_dec: Tensor, W_enc: Tensor | None, b_dec: Tensor, b_enc: Tensor) -> Weights:
        """W_dec through ``collect``, so that its readers' gradients meet in one buffer."""
        dec, grads = collect(W_dec)
        tied = W_enc is None
        return Weights(dec, dec.T if tied else W_enc, b_dec, b_enc, tied, grads)

    def aux_latents(self, dead: Tensor, width: int | None) -> AuxLatents | None:
        """``width`` columns, the dead ones first; None reads exactly the dead ones (one host
        sync). None when the width is 0."""
        if width is None:
            width = int(dead.sum())  # the step's one host sync
        if not width:
            return None
        cols, valid = aux_columns(dead, width)
        return AuxLatents(cols, valid, cols.numel())

    def topk_encode(self, x: Tensor, w: Weights, k: int, signed: bool,
                    aux: AuxLatents | None, k_aux: int) -> tuple[Codes, Tensor, Tensor | None]:
        """(codes, bfloat16 pre-activations, AuxK's dense bfloat16 codes on aux.cols)."""
        val, idx, pre, z_aux = topk_encode(
            x, w.b_dec, w.enc, w.b_enc, k, signed,
            (aux.cols, aux.dead) if aux is not None else None, k_aux,
            w.grads if w.tied else None,
        )
        return Codes(val, idx), pre, z_aux

    def decode(self, codes: Codes, w: Weights) -> Tensor:
        return sparse_decode(codes.val, codes.idx, w.dec, w.grads, w.b_dec)

    def iht_step(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                 scale: float) -> tuple[Codes, Tensor]:
        """The reference's step, taking and returning the reconstruction: the new support is
        chosen from a bfloat16 correlation computed without gradient; only the correlations
        kept are differentiated. Fused (``iht_step_grad``) where the row kernels hold a
        row's [K, D] table tile; wider rows take ``iht_step_unfused`` (at d 768, k 32 the
        fused step's chunked kernels were 8 % slower: benchmarks/RESULTS.md)."""
        if not kernels.iht_row_fits(x.shape[-1], codes.idx.shape[-1]):
            return iht_step_unfused(self, x, x_hat, codes, w, k, signed, scale)
        return iht_step_fused(x, x_hat, codes, w, k, signed, scale)

    @torch.no_grad()
    def iht_forward(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int,
                    signed: bool, scale: float, steps: int) -> tuple[Codes, Tensor]:
        """``steps`` of ``iht_step``'s forward from ``codes`` and their reconstruction
        ``x_hat``, without gradient: per step the step size with the bfloat16 scaled residual
        (kernels.iht_eta), the dense correlation, its top-k, and the new values, their decode
        and the keep-the-better choice (kernels.iht_update), one pass each where iht_step
        launches some thirty kernels. -> (codes, their reconstruction)."""
        W_low = low(w.dec)
        val, idx, x_hat = codes.val.detach(), codes.idx, x_hat.detach()
        for _ in range(steps):
            step, rs = kernels.iht_eta(x, x_hat, idx, W_low, scale)
            u = rs @ W_low.T  # [B, N] bf16, as in iht_step
            u = u.scatter_add_(-1, idx, val.to(u.dtype))
            new = select_topk(u, k, signed, hint=idx)
            val, idx, x_hat = kernels.iht_update(x, x_hat, val, idx, new, step, W_low, w.b_dec,
                                                 signed)
        return Codes(val, idx), x_hat

    def iht_final(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int, signed: bool,
                  scale: float, steps: int) -> tuple[Codes, Tensor]:
        """The reference's iht_final by ``iht_forward``, with the final reconstruction
        differentiable in the decoder (``known_decode``: no second decode)."""
        final, x_fin = self.iht_forward(x, codes, x_hat, w, k, signed, scale, steps)
        return final, known_decode(final.val, final.idx, w.dec, w.grads, w.b_dec, x_fin)

    def fvu(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
        return fvu(x, x_hat)

    def auxk_loss(self, err: Tensor, pre: Tensor, aux_codes: Tensor | None, aux: AuxLatents,
                  w: Weights, signed: bool, k_aux: int, fit: bool = False) -> Tensor:
        """The FVU of the residual by the decode of the AuxK codes the encoder selected
        (fitted to it where ``fit``, reference.fit_to). (The reference's scale
        min(n_dead / k_aux, 1) is always 1, since k_aux <= n_dead.)"""
        e_hat = aux_decode(aux_codes, aux.cols, w.dec, w.grads)
        if fit:
            e_hat = fit_to(err, e_hat)
        return fvu(err, e_hat)[0]

    def project_rows_(self, G: Tensor, W: Tensor) -> None:
        kernels.project_rows_(G, W)

    def normalize_rows_(self, W: Tensor) -> None:
        normalize_rows_(W)

    def step_graphs(self, body, prepare, device: torch.device) -> StepGraphs | None:
        """The replayer of a training step ``body(x, dead, width)`` as one CUDA graph per AuxK
        width (cuda_graphs.py), on CUDA when graph replay is on; else None (eager steps)."""
        if not self.cuda_graphs or torch.device(device).type != "cuda":
            return None
        return StepGraphs(body, prepare)

    def refresh_copies(self, W: Tensor) -> None:
        """W's bfloat16 copy (``low``) made current: a recorded step reads it as it is, and
        each replay's normalisation rewrites it (``normalize_rows_``)."""
        low(W)
