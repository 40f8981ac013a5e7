"""The fast op set of a stacked group (``StackedFastOps``): isae.gpu.ops.FastOps with a
leading model axis, for isae.models.stacked.StackedCoder on CUDA.

Only the dense products are batched (``torch.bmm`` over the models: the encoder, AuxK's
columns, IHT's correlations). Everything sparse runs as the single-model kernels over the
flattened model axis: model m's latents are rows m*N .. m*N+N-1 of one [M * N, D] decoder
table and its codes carry those global indices, so the top-k over an [M * B, N] view, the
gathered decode and dots, the segmented weight gradients (one sort of M * B * K indices)
and the decoder's row constraint are the kernels of kernels.py on bigger shapes. Each
model's AuxK reads its own dead columns (a fixed number for all, the dead ones first), with
its own mask. Biases are per model ([M, D], [M, N]); a model without learned biases reads
the batch as it is, so its encoder input and the weight gradient's source rows are the
batch itself, shared by all models (Segments reads src[b % B]). ``+sg``'s undifferentiated
thresholding steps (``iht_final``) run FastOps.iht_forward's two row kernels over the
flattened models, each block of rows with its own bias; the differentiated steps
(``iht_step``) run FastOps's fused step (ops.iht_step_grad) over the same rows.

On CPU tensors the kernels fall back to stock torch (tests/test_group.py checks this op
set against StackedReference and against single models there; tests/test_kernels.py runs
the kernels in Triton's interpreter; tests/test_fast_gpu.py on CUDA).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd import Function

from isae.gpu import cuda_graphs, kernels
from isae.gpu.ops import (
    LOW,
    DecoderGrads,
    _buffer,
    _decoder_grad,
    _holder,
    _segments,
    collect,
    gather_dot,
    iht_step_grad,
    low,
    normalize_rows_,
    select_topk,
)
from isae.models.reference import (
    AuxLatents,
    Codes,
    Weights,
    adam_scalars,
    fit_to,
    iht_eta,
    keep_better,
)

_OFFSETS: dict[tuple, Tensor] = {}


def _offsets(M: int, N: int, device) -> Tensor:
    """[M, 1, 1]: m * N, model m's first global latent index. Kept once made outside a
    CUDA-graph recording (a tensor made inside one holds its values only in replays)."""
    key = (M, N, str(device))
    t = _OFFSETS.get(key)
    if t is None:
        t = (torch.arange(M, device=device) * N).view(M, 1, 1)
        if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            _OFFSETS[key] = t
    return t


def bmm32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b (batched) for bfloat16 a, b as float32: a bfloat16 product on the GPU, float32
    on the CPU (as ops.mm32)."""
    if a.is_cuda:
        return torch.bmm(a, b).float()
    return torch.bmm(a.float(), b.float())


def _globalize(lidx: Tensor, M: int, N: int) -> Tensor:
    """Local indices [M * B, K] -> global [M, B, K]. Clamped first: a model whose scores are
    NaN (diverging) gets arbitrary but in-range indices, never another model's latents."""
    lidx = lidx.clamp_(0, N - 1)
    return lidx.view(M, -1, lidx.shape[-1]) + _offsets(M, N, lidx.device)


class _StackedTopKEncode(Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, signed: bool, cols, valid, k_aux: int,
                grads: DecoderGrads | None, biased: bool):
        M, D, N = W_enc.shape
        B = x.shape[0]
        # Without learned biases (zero buffers) every model reads x itself.
        ctx.shared = shared = not biased
        if shared:
            xc = x.to(LOW)  # [B, D]
            xc3 = xc.expand(M, B, D)
        else:
            xc3 = (x[None] - b_dec[:, None, :]).to(LOW)  # [M, B, D]
            xc = xc3.reshape(M * B, D)
        # A tied model's weight is the decoder's cached bfloat16 copy (ops._TopKEncode).
        W_low = low(W_enc) if grads is not None else W_enc.detach().to(LOW)  # [M, D, N]
        if biased:
            pre = torch.baddbmm(b_enc[:, None, :].to(LOW), xc3, W_low)
        else:
            pre = torch.bmm(xc3, W_low)
        val, lidx = kernels.topk_rows(pre.view(M * B, N), k, signed)
        idx = _globalize(lidx, M, N)  # [M, B, K]
        if cols is None:
            z = val.new_zeros(M * B, 0, dtype=LOW)
        else:
            C = cols.shape[1]
            W_rows = torch.gather(W_low.transpose(1, 2), 1, cols[..., None].expand(M, C, D))
            if biased:  # [M, B, C]
                sub = torch.baddbmm(b_enc.gather(1, cols)[:, None, :].to(LOW), xc3,
                                    W_rows.transpose(1, 2))
            else:
                sub = torch.bmm(xc3, W_rows.transpose(1, 2))
            z = kernels.topk_mask_rows(sub.view(M * B, C), k_aux, signed, valid)
        ctx.save_for_backward(xc, W_enc, idx, val, cols, z)
        ctx.signed, ctx.grads, ctx.M = signed, grads, M
        ctx.holder = _holder(idx)
        ctx.mark_non_differentiable(idx, pre)
        ctx.set_materialize_grads(False)
        return val.view(M, B, k), idx, pre, z

    @staticmethod
    def backward(ctx, g_val: Tensor | None, _g_idx, _g_pre, g_z: Tensor | None):
        xc, W_enc, idx, val, cols, z = ctx.saved_tensors
        M, D, N = W_enc.shape
        B = idx.shape[1]
        K = idx.shape[2]
        gidx = idx.view(M * B, K)
        g_val = torch.zeros_like(val) if g_val is None else g_val.reshape(M * B, K)
        if not ctx.signed:
            g_val = g_val * (val > 0)
        db_enc = torch.zeros(M * N, device=xc.device, dtype=torch.float32)
        db_enc.index_add_(0, gidx.reshape(-1), g_val.reshape(-1).float())
        g_aux = gcols = None
        if cols is not None and g_z is not None:
            C = cols.shape[1]
            g_aux = kernels.keep_where(g_z.to(LOW).contiguous(), z)  # [M * B, C]
            gcols = (cols + _offsets(M, N, cols.device).view(M, 1)).reshape(-1)
            db_enc.index_add_(0, gcols, g_aux.view(M, B, C).sum(1, dtype=torch.float32).reshape(-1))
        dW = None
        if ctx.needs_input_grad[2]:
            grads = _buffer(ctx, M * N, D)
            if g_aux is not None:
                xc3 = xc.expand(M, B, D) if ctx.shared else xc.view(M, B, D)
                grads.add_rows(gcols, bmm32(g_aux.view(M, B, -1).transpose(1, 2), xc3).reshape(-1, D))
            grads.add_segments(_segments(ctx, gidx, M * N), g_val, xc)
            if ctx.grads is None:
                # [M, D, N] as a view of the latent-major [M * N, D] buffer: W_enc's layout
                dW = grads.take().view(M, N, D).transpose(1, 2)
        db_dec = None
        if ctx.needs_input_grad[1]:
            db_dec = -torch.bmm(db_enc.view(M, 1, N), W_enc.transpose(1, 2)).view(M, D)
        return (None, db_dec, dW, db_enc.view(M, N) if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


class _StackedDecode(Function):
    @staticmethod
    def forward(ctx, val: Tensor, idx: Tensor, W_dec: Tensor, grads: DecoderGrads | None,
                bias: Tensor | None):
        M, B, K = idx.shape
        W_low = low(W_dec)
        gidx = idx.view(M * B, K)
        ctx.save_for_backward(val, idx, W_low)
        ctx.n, ctx.grads = W_dec.shape[0], grads
        ctx.holder = _holder(idx)
        return kernels.gather_decode(val.reshape(M * B, K), gidx, W_low, bias).view(M, B, -1)

    @staticmethod
    def backward(ctx, g: Tensor):
        val, idx, W_low = ctx.saved_tensors
        M, B, K = idx.shape
        gidx = idx.view(M * B, K)
        g2 = g.reshape(M * B, -1)
        g_val = (kernels.gather_dot(g2, gidx, W_low).view(M, B, K)
                 if ctx.needs_input_grad[0] else None)
        dW = _decoder_grad(ctx, gidx, val.reshape(M * B, K), g2) if ctx.needs_input_grad[2] else None
        db = g.sum(1) if ctx.needs_input_grad[4] else None
        return g_val, None, dW, None, db


class _StackedAuxDecode(Function):
    @staticmethod
    def forward(ctx, z: Tensor, gcols: Tensor, W_dec: Tensor, grads: DecoderGrads | None, M: int):
        C = gcols.numel() // M
        W_rows = low(W_dec).index_select(0, gcols).view(M, C, -1)  # [M, C, D]
        ctx.save_for_backward(z, gcols, W_rows)
        ctx.grads, ctx.n, ctx.M = grads, W_dec.shape[0], M
        return bmm32(z.view(M, -1, C), W_rows)  # [M, B, D]

    @staticmethod
    def backward(ctx, g: Tensor):
        z, gcols, W_rows = ctx.saved_tensors
        M = ctx.M
        C = W_rows.shape[1]
        g_low = g.to(LOW)
        g_z = torch.bmm(g_low, W_rows.transpose(1, 2)).view(-1, C) if ctx.needs_input_grad[0] else None
        dW = None
        if ctx.needs_input_grad[2]:
            grads = _buffer(ctx, ctx.n, g.shape[-1])
            grads.add_rows(gcols, bmm32(z.view(M, -1, C).transpose(1, 2), g_low).reshape(M * C, -1))
            dW = grads.take() if ctx.grads is None else None
        return g_z, None, dW, None, None


class _StackedFVU(Function):
    @staticmethod
    def forward(ctx, x: Tensor, x_hat: Tensor, total_var: Tensor):
        err = x - x_hat  # [M, B, D]
        tv = total_var.clamp_min(1e-12)
        ctx.save_for_backward(err, tv)
        ctx.mark_non_differentiable(err)
        ctx.set_materialize_grads(False)
        return err.pow(2).sum((1, 2)) / tv, err

    @staticmethod
    def backward(ctx, g: Tensor | None, _g_err):
        if g is None:
            return None, None, None
        err, tv = ctx.saved_tensors
        scale = (-2.0 * g / tv).view(-1, 1, 1)
        return None, err * scale, None


def stacked_fvu(x: Tensor, x_hat: Tensor, total_var: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(each model's FVU [M], residuals [M, B, D] without gradient); x [B, D] or [M, B, D]."""
    if total_var is None:
        total_var = (x - x.mean(-2, keepdim=True)).pow(2).sum((-2, -1))
    return _StackedFVU.apply(x, x_hat, total_var)


class _SerialBranches:
    """The parts of a group step one after another on the current stream."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, i: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def join(self) -> None:
        pass


class _StreamBranches:
    """Each part of a group step on its own CUDA stream, forked from and joined back to
    the current one: inside a recording, parallel branches of one CUDA graph, so that the
    parts' small kernels overlap instead of queueing."""

    def __init__(self, n: int, device) -> None:
        self.n = n
        self.streams = [torch.cuda.Stream(device=device) for _ in range(n)]

    @contextlib.contextmanager
    def __call__(self, i: int):
        s = self.streams[i]
        s.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(s):
            yield

    def join(self) -> None:
        for s in self.streams:
            torch.cuda.current_stream(s.device).wait_stream(s)


class StackedFastOps:
    """The fast op set of a stacked group (see the module docstring); the same methods as
    isae.models.stacked.StackedReference.

    cuda_graphs: whether the group's step is replayed as a CUDA graph; streams: whether the
    parts of a group (one stacked model per switch set) run as parallel branches (CUDA,
    with graphs only).
    """

    name = "fast"

    def __init__(self, cuda_graphs: bool = True, streams: bool = True) -> None:
        self.cuda_graphs = cuda_graphs
        self.streams = streams

    def __repr__(self) -> str:
        return f"StackedFastOps(cuda_graphs={self.cuda_graphs}, streams={self.streams})"

    def weights(self, W_dec: Tensor, W_enc: Tensor | None, b_dec: Tensor, b_enc: Tensor) -> Weights:
        M, N = b_enc.shape
        dec, grads = collect(W_dec)
        tied = W_enc is None
        src = dec if tied else W_enc
        return Weights(dec, src.view(M, N, -1).transpose(1, 2), b_dec, b_enc, tied, grads)

    def aux_latents(self, dead: Tensor, width: int | None) -> AuxLatents | None:
        """``width`` columns per model, its dead ones first ([M, C] local indices and which
        are dead); None reads the most any model has (a host sync); None when 0."""
        if width is None:
            width = int(dead.sum(1).max())
        if not width:
            return None
        M, N = dead.shape
        # One flat stable sort by (model, live), as ops.aux_columns sorts one model's: model
        # m's latents stay in its row of N, its dead ones first.
        key = dead.logical_not().to(torch.int32) + 2 * torch.arange(M, device=dead.device,
                                                                    dtype=torch.int32)[:, None]
        order = torch.argsort(key.reshape(-1), stable=True).view(M, N)[:, :width]
        cols = order - _offsets(M, N, dead.device).view(M, 1)
        return AuxLatents(cols, dead.gather(1, cols), width)

    def topk_encode(self, x: Tensor, w: Weights, k: int, signed: bool, aux: AuxLatents | None,
                    k_aux: int) -> tuple[Codes, Tensor, Tensor | None]:
        """(codes with global indices, bfloat16 pre-activations [M, B, N], AuxK's dense
        bfloat16 codes [M * B, C] on aux.cols)."""
        cols, valid = (aux.cols, aux.dead) if aux is not None else (None, None)
        val, idx, pre, z = _StackedTopKEncode.apply(
            x, w.b_dec, w.enc, w.b_enc, k, signed, cols, valid, k_aux,
            w.grads if w.tied else None, w.b_dec.requires_grad)
        return Codes(val, idx), pre, z

    def decode(self, codes: Codes, w: Weights) -> Tensor:
        bias = w.b_dec if w.b_dec.requires_grad else None  # zero buffers: nothing to add
        return _StackedDecode.apply(codes.val, codes.idx, w.dec, w.grads, bias)

    def iht_step(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                 scale: float) -> tuple[Codes, Tensor]:
        """FastOps.iht_step for each model: the new support from each model's bfloat16
        correlation without gradient (one batched product), then the fused step
        (ops.iht_step_grad) over the flattened models' rows; rows too wide for the row
        kernels take ``_iht_step_unfused``, as FastOps.iht_step does."""
        M, N = w.b_enc.shape
        _, B, K = codes.idx.shape
        D = x.shape[-1]
        if not kernels.iht_row_fits(D, K):
            return self._iht_step_unfused(x, x_hat, codes, w, k, signed, scale)
        xs = x.expand(M, B, D).reshape(M * B, D)  # the shared batch, one row per model's row
        idx = codes.idx.reshape(M * B, K)
        with torch.no_grad():
            W_low = low(w.dec)
            step, rs = kernels.iht_eta(xs, x_hat.detach().reshape(M * B, D), idx, W_low, scale)
            u = torch.bmm(rs.view(M, B, D), W_low.view(M, N, D).transpose(1, 2)).view(M * B, N)
            lidx = (codes.idx - _offsets(M, N, codes.idx.device)).view(M * B, K)
            u.scatter_add_(-1, lidx, codes.val.detach().reshape(M * B, K).to(u.dtype))
            new = _globalize(select_topk(u, k, signed, hint=lidx), M, N).view(M * B, K)
        bias = w.b_dec if w.b_dec.requires_grad else None  # zero buffers: nothing to add
        val, idx, x_new = iht_step_grad(xs, x_hat.reshape(M * B, D), codes.val.reshape(M * B, K),
                                        idx, new, step, w.dec, w.grads, bias, scale, signed)
        return Codes(val.view(M, B, K), idx.view(M, B, K)), x_new.view(M, B, D)

    def _iht_step_unfused(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int,
                          signed: bool, scale: float) -> tuple[Codes, Tensor]:
        """ops.iht_step_unfused for each model."""
        M, N = w.b_enc.shape
        _, B, K = codes.idx.shape
        r = x - x_hat  # [M, B, D]
        r2 = r.view(M * B, -1)
        g_S = gather_dot(r2, codes.idx.view(M * B, K), w.dec, w.grads)  # [M * B, K]
        Dg = _StackedDecode.apply(g_S.view(M, B, K), codes.idx, w.dec, w.grads, None)
        step = iht_eta(g_S.view(M, B, K), Dg, scale)  # [M, B, 1]
        with torch.no_grad():
            u = torch.bmm((r * step).to(LOW), low(w.dec).view(M, N, -1).transpose(1, 2))
            u = u.view(M * B, N)
            lidx = (codes.idx - _offsets(M, N, codes.idx.device)).view(M * B, K)
            u.scatter_add_(-1, lidx, codes.val.reshape(M * B, K).to(u.dtype))
            idx = _globalize(select_topk(u, k, signed, hint=lidx), M, N)  # [M, B, K]
        same = (idx.unsqueeze(-1) == codes.idx.unsqueeze(-2)).to(codes.val.dtype)
        corr = gather_dot(r2, idx.view(M * B, K), w.dec, w.grads).view(M, B, K)
        val = (same @ codes.val.unsqueeze(-1)).squeeze(-1) + step * corr
        if not signed:
            val = torch.relu(val)
        new = Codes(val, idx)
        return keep_better(x, x_hat, codes, new, self.decode(new, w))

    @torch.no_grad()
    def iht_final(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int,
                  signed: bool, scale: float, steps: int) -> Codes:
        """FastOps.iht_forward for each model (``+sg``): per step the two row kernels
        (kernels.iht_eta, kernels.iht_update) over the flattened models, around each
        model's bfloat16 correlation (one batched product) and its top-k. The caller decodes
        the final codes with gradient."""
        M, N = w.b_enc.shape
        _, B, K = codes.idx.shape
        D = x.shape[-1]
        W_low = low(w.dec)
        bias = w.b_dec.detach() if w.b_dec.requires_grad else None  # zero buffers: none
        xs = x.expand(M, B, D).reshape(M * B, D)  # the shared batch, one row per model's row
        val = codes.val.detach().reshape(M * B, K)
        idx = codes.idx.reshape(M * B, K)
        xh = x_hat.detach().reshape(M * B, D)
        off = _offsets(M, N, idx.device)
        for _ in range(steps):
            step, rs = kernels.iht_eta(xs, xh, idx, W_low, scale)
            u = torch.bmm(rs.view(M, B, D), W_low.view(M, N, D).transpose(1, 2)).view(M * B, N)
            lidx = (idx.view(M, B, K) - off).view(M * B, K)
            u.scatter_add_(-1, lidx, val.to(u.dtype))
            new = _globalize(select_topk(u, k, signed, hint=lidx), M, N).view(M * B, K)
            val, idx, xh = kernels.iht_update(xs, xh, val, idx, new, step, W_low, bias, signed)
        return Codes(val.view(M, B, K), idx.view(M, B, K))

    def total_var(self, x: Tensor) -> Tensor:
        return kernels.fvu_parts(x, x)[2]

    def fvu(self, x: Tensor, x_hat: Tensor, total_var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return stacked_fvu(x, x_hat, total_var)

    def auxk_loss(self, err: Tensor, pre: Tensor, aux_codes: Tensor | None, aux: AuxLatents,
                  w: Weights, signed: bool, k_aux: int, fit: bool = False) -> Tensor:
        """Each model's FVU of its residual by the decode of its AuxK codes (fitted to the
        residual where ``fit``); 0 for a model with no dead latent."""
        M = err.shape[0]
        gcols = (aux.cols + _offsets(M, w.b_enc.shape[1], aux.cols.device).view(M, 1)).reshape(-1)
        e_hat = _StackedAuxDecode.apply(aux_codes, gcols, w.dec, w.grads, M)
        if fit:
            e_hat = fit_to(err, e_hat)
        return torch.where(aux.dead.any(1), stacked_fvu(err, e_hat)[0], 0.0)

    def project_rows_(self, G: Tensor, W: Tensor) -> None:
        kernels.project_rows_(G, W)

    def normalize_rows_(self, W: Tensor) -> None:
        normalize_rows_(W)

    def adam_(self, tensors, step: Tensor, lr: Tensor) -> None:
        scalars = adam_scalars(step, lr)
        for p, g, m, v in tensors:
            kernels.adam_rows_(p, g, m, v, *scalars)

    def aux_width(self, n_dead: int, n: int) -> int | None:
        return cuda_graphs.aux_bucket(n_dead, n)

    def step_graphs(self, body, prepare, device) -> cuda_graphs.StepGraphs | None:
        """The group step ``body(x, dead, width)`` replayed as one CUDA graph per AuxK width
        (called with the width), on CUDA when graph replay is on; else None."""
        if not self.cuda_graphs or torch.device(device).type != "cuda":
            return None
        return cuda_graphs.StepGraphs(body, prepare)

    def refresh_copies(self, W_dec: Tensor) -> None:
        low(W_dec)  # the recorded forward reads the bfloat16 copy as it is (FastOps)

    def branches(self, n: int, device):
        if self.streams and self.cuda_graphs and n > 1 and torch.device(device).type == "cuda":
            return _StreamBranches(n, device)
        return _SerialBranches(n)
