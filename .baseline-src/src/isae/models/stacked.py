"""A group of sparse coders of one shape and one architecture as one model: the same maths
as ``SparseCoder``, with a leading model axis.

The runs that share a pass (seeds, learning rates) see the same batches; on a GPU each small
model alone leaves the device waiting on kernel launches. Stacked, M models run one step
as one sequence of kernels on M times the work: one batched encoder matmul, and the sparse
maps (top-k, decode, the weight gradients, AuxK) as the single-model kernels over the
flattened model axis: the decoders stacked as one [M * N, D] table, each model's latents
offset by m * N, each (model, row) pair a row of an [M * B, ...] matrix.

Each model keeps what makes it itself: its initialisation (copied from a ``SparseCoder``
built from its own config, so bitwise the one-by-one start), its learning rate and Adam
state (``adam_rows_``: Adam is per element, so a per-model rate is exact), its dead latents
(its own AuxK mask) and its losses. The group's loss is the sum of the models' losses,
whose gradient in each model's parameters is that model's own.

Codes of a stacked model carry *global* latent indices, m * N + j, [M, B, K]: the flattened
maps read them as they are; ``local`` gives a model's own indices.

Like ``SparseCoder``, the maths comes from an op set: ``StackedReference`` here (plain
torch, float32, any device: what the tests compare with), or the fast path on CUDA
(isae.gpu.stacked_ops.StackedFastOps: bfloat16 products and the Triton kernels), chosen
once by ``select_stacked_ops``.

Shapes: M models, B rows, D = d_in, N = d_sae, K = k; [M * N, D] is the stacked decoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isae.models.compute import _flag, select_ops
from isae.models.reference import (
    AuxLatents,
    Codes,
    Weights,
    adam_rows_,
    adam_scalars,
    fit_to,
    iht_eta,
    keep_better,
    normalize_rows_,
    project_rows_,
    steps_without_grad,
    topk_select,
)
from isae.models.sparse_coder import SparseCoder, auxk_inputs

#: The config fields that must agree for coders to stack (the seed may differ).
STACKED_FIELDS = ("d_in", "d_sae", "k", "kind", "signed", "tied", "bias", "encoder_steps",
                  "iht_step", "iht_gradient")


def stack_key(cfg) -> tuple:
    """What coders must share to stack into one model: shape and switches."""
    return tuple(getattr(cfg, f) for f in STACKED_FIELDS)


def stacks(cfg) -> bool:
    """Whether a coder of this config can join a stacked model: the TopK family, its
    thresholding steps differentiated or not (``+sg``)."""
    return cfg.kind == "topk"


class StackedOutput(NamedTuple):
    """One forward pass of M stacked models."""

    x_hat: Tensor
    """[M, B, D] reconstructions."""
    codes: Codes
    """val [M, B, K], idx [M, B, K] global latent indices (m * N + j)."""
    fvu: Tensor
    """[M] each model's FVU."""
    auxk: Tensor
    """[M] each model's AuxK loss (0 for a model with no dead latent)."""
    fvu_amortised: Tensor | None = None
    """[M] each model's FVU of its amortised TopK codes, a loss term of its own where the
    thresholding steps are not differentiated (+sg; SparseCoder.loss); else None."""


def offsets(M: int, N: int, device) -> Tensor:
    """[M, 1, 1]: m * N, the first global index of model m's latents."""
    return (torch.arange(M, device=device) * N).view(M, 1, 1)


def local(idx: Tensor, N: int) -> Tensor:
    """Global latent indices [M, B, K] -> each model's own, in [0, N)."""
    return idx - offsets(idx.shape[0], N, idx.device)


class StackedOps(Protocol):
    """What StackedCoder asks of an op set (StackedReference says what each computes)."""

    name: str
    cuda_graphs: bool

    def weights(self, W_dec: Tensor, W_enc: Tensor | None, b_dec: Tensor, b_enc: Tensor
                ) -> Weights: ...

    def aux_latents(self, dead: Tensor, width: int | None) -> AuxLatents | None: ...

    def topk_encode(self, x: Tensor, w: Weights, k: int, signed: bool, aux: AuxLatents | None,
                    k_aux: int) -> tuple[Codes, Tensor, Tensor | None]: ...

    def decode(self, codes: Codes, w: Weights) -> Tensor: ...

    def iht_step(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                 scale: float) -> tuple[Codes, Tensor | None]: ...

    def iht_final(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int,
                  signed: bool, scale: float, steps: int) -> Codes: ...

    def total_var(self, x: Tensor) -> Tensor: ...

    def fvu(self, x: Tensor, x_hat: Tensor, total_var: Tensor | None = None
            ) -> tuple[Tensor, Tensor]: ...

    def auxk_loss(self, err: Tensor, pre: Tensor, aux_codes: Tensor | None, aux: AuxLatents,
                  w: Weights, signed: bool, k_aux: int, fit: bool = False) -> Tensor: ...

    def project_rows_(self, G: Tensor, W: Tensor) -> None: ...

    def normalize_rows_(self, W: Tensor) -> None: ...

    def adam_(self, tensors: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], step: Tensor,
              lr: Tensor) -> None: ...

    def aux_width(self, n_dead: int, n: int) -> int | None: ...

    def step_graphs(self, body: Callable, prepare: Callable[[], None], device
                    ) -> Callable | None: ...

    def refresh_copies(self, W_dec: Tensor) -> None: ...

    def branches(self, n: int, device) -> Branches: ...


class Branches:
    """Where the parts of a group step run: here one after another on the current stream;
    the fast op set's version forks them onto CUDA streams (parallel branches of the step's
    CUDA graph)."""

    def __init__(self, n: int = 1) -> None:
        self.n = n

    def __call__(self, i: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def join(self) -> None:
        pass


def _sparse_decode(codes: Codes, dec: Tensor) -> Tensor:
    """sum_j val_j dec[idx_j] over global indices: [M, B, K] codes -> [M, B, D]."""
    M, B, K = codes.idx.shape
    out = F.embedding_bag(codes.idx.reshape(M * B, K), dec, per_sample_weights=codes.val.reshape(M * B, K),
                          mode="sum")
    return out.view(M, B, -1)


def stacked_fvu(x: Tensor, x_hat: Tensor, total_var: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(each model's FVU [M], the residuals x - x_hat [M, B, D]). x: [B, D] shared or
    [M, B, D]; total_var: its ||x - mean_rows(x)||^2 (a scalar or [M]) when known."""
    err = x - x_hat
    if total_var is None:
        total_var = (x - x.mean(-2, keepdim=True)).pow(2).sum((-2, -1))
    return err.pow(2).sum((1, 2)) / total_var.clamp_min(1e-12), err


class StackedReference:
    """The reference op set of a stacked group: SparseCoder's reference maths (isae.models.
    reference.ReferenceOps) with a leading model axis, plain torch, float32, any device."""

    name = "reference"
    cuda_graphs = False

    def weights(self, W_dec: Tensor, W_enc: Tensor | None, b_dec: Tensor, b_enc: Tensor) -> Weights:
        """dec [M * N, D]; enc [M, D, N] (a tied model's: its decoder, transposed)."""
        M, N = b_enc.shape
        src = W_dec if W_enc is None else W_enc
        return Weights(W_dec, src.view(M, N, -1).transpose(1, 2), b_dec, b_enc, W_enc is None)

    def aux_latents(self, dead: Tensor, width: int | None) -> AuxLatents | None:
        """Every latent with the mask ``dead`` [M, N]; n = the most dead latents of any model
        (AuxK's k is at most that); None when no model has one."""
        n = int(dead.sum(1).max())
        return AuxLatents(None, dead, n) if n else None

    def topk_encode(self, x: Tensor, w: Weights, k: int, signed: bool, aux: AuxLatents | None,
                    k_aux: int) -> tuple[Codes, Tensor, Tensor | None]:
        """(codes with global indices, pre-activations [M, B, N], None)."""
        M, N = w.b_enc.shape
        pre = torch.baddbmm(w.b_enc[:, None, :], x - w.b_dec[:, None, :], w.enc)
        codes = topk_select(pre, k, signed)
        return Codes(codes.val, codes.idx + offsets(M, N, x.device)), pre, None

    def decode(self, codes: Codes, w: Weights) -> Tensor:
        return _sparse_decode(codes, w.dec) + w.b_dec[:, None, :]

    def iht_step(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                 scale: float) -> tuple[Codes, Tensor | None]:
        """ReferenceOps.iht_step for each model."""
        M, N = w.b_enc.shape
        r = x - x_hat
        g = torch.bmm(r, w.dec.view(M, N, -1).transpose(1, 2))  # [M, B, N]
        lidx = local(codes.idx, N)
        g_S = g.gather(-1, lidx)
        Dg = _sparse_decode(Codes(g_S, codes.idx), w.dec)
        step = iht_eta(g_S, Dg, scale)
        u = (g * step).scatter_add(-1, lidx, codes.val)
        new = topk_select(u, k, signed)
        new = Codes(new.val, new.idx + offsets(M, N, x.device))
        return keep_better(x, x_hat, codes, new, self.decode(new, w))[0], None

    def iht_final(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int,
                  signed: bool, scale: float, steps: int) -> Codes:
        """``steps`` of ``iht_step`` from the amortised ``codes`` (reconstruction ``x_hat``)
        without gradient: ReferenceOps.iht_final for each model. The caller decodes the
        final codes with gradient."""
        return steps_without_grad(self, x, codes, x_hat, w, k, signed, scale, steps)

    def total_var(self, x: Tensor) -> Tensor:
        """||x - mean_rows(x)||^2 of a shared batch [B, D] (every model's FVU denominator)."""
        return (x - x.mean(0)).pow(2).sum()

    def fvu(self, x: Tensor, x_hat: Tensor, total_var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return stacked_fvu(x, x_hat, total_var)

    def auxk_loss(self, err: Tensor, pre: Tensor, aux_codes: Tensor | None, aux: AuxLatents,
                  w: Weights, signed: bool, k_aux: int, fit: bool = False) -> Tensor:
        """Each model's FVU of its residual by its top k_aux dead latents' decode (all of
        them where it has fewer; fitted to the residual where ``fit``); 0 for a model with
        none (ReferenceOps.auxk_loss)."""
        M, N = w.b_enc.shape
        dead = aux.dead[:, None, :].expand_as(pre)
        score = pre.abs() if signed else F.relu(pre)
        score = torch.where(dead, score, torch.full_like(score, -1.0))
        idx = score.topk(k_aux, dim=-1, sorted=False).indices
        val = pre.gather(-1, idx)
        if not signed:
            val = F.relu(val)
        val = val * dead.gather(-1, idx)  # a model with fewer dead latents than k_aux
        e_hat = _sparse_decode(Codes(val, idx + offsets(M, N, pre.device)), w.dec)
        if fit:
            e_hat = fit_to(err, e_hat)
        return torch.where(aux.dead.any(1), stacked_fvu(err, e_hat)[0], 0.0)

    def project_rows_(self, G: Tensor, W: Tensor) -> None:
        project_rows_(G, W)

    def normalize_rows_(self, W: Tensor) -> None:
        normalize_rows_(W)

    def adam_(self, tensors: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], step: Tensor,
              lr: Tensor) -> None:
        """One Adam step on each (parameter, gradient, exp_avg, exp_avg_sq) of stacked
        models, model m at rate lr[m] and step count step[m] (this step counted)."""
        scalars = adam_scalars(step, lr)
        for p, g, m, v in tensors:
            adam_rows_(p, g, m, v, *scalars)

    def aux_width(self, n_dead: int, n: int) -> int | None:
        """None: this op set reads exactly the dead latents."""
        return None

    def step_graphs(self, body: Callable, prepare: Callable[[], None], device) -> Callable | None:
        """None: the reference runs every step eagerly."""
        return None

    def refresh_copies(self, W_dec: Tensor) -> None:
        """Nothing to refresh: the reference keeps no copies of the parameters."""

    def branches(self, n: int, device) -> Branches:
        return Branches(n)


STACKED_REFERENCE = StackedReference()


#: ``ISAE_GROUP_STREAMS=0``: a group's parts one after another inside its CUDA graph,
#: instead of as parallel branches (each on its own stream).
STREAMS_ENV = "ISAE_GROUP_STREAMS"


def select_stacked_ops(device: str | torch.device) -> StackedOps:
    """The stacked op set matching ``select_ops(device)``: the fast one where single models
    get the fast path (CUDA, unless ISAE_REFERENCE_OPS=1), the reference elsewhere."""
    ops = select_ops(device)
    if ops.name != "fast":
        return STACKED_REFERENCE
    from isae.gpu.stacked_ops import StackedFastOps

    return StackedFastOps(cuda_graphs=ops.cuda_graphs, streams=_flag(STREAMS_ENV, "1"))


class StackedCoder(nn.Module):
    """M TopK-family coders of one shape and one switch set as one model.

    Parameters (float32): ``W_dec`` [M * N, D] (model m's decoder is rows m*N .. m*N+N-1),
    ``W_enc`` [M * N, D] latent-major like SparseCoder's (None when tied), ``b_dec`` [M, D],
    ``b_enc`` [M, N] (zero buffers without learned biases). ``bind`` makes the coders it was
    built from views of these, so they always hold the current weights (a checkpoint is
    written from them as from any coder).
    """

    def __init__(self, coders: Sequence[SparseCoder], ops: StackedOps = STACKED_REFERENCE) -> None:
        super().__init__()
        if not coders:
            raise ValueError("no coders to stack")
        cfg = coders[0].cfg
        if not stacks(cfg):
            raise ValueError(f"{cfg.arch} does not stack (see stacks)")
        for c in coders[1:]:
            if stack_key(c.cfg) != stack_key(cfg):
                raise ValueError(f"cannot stack {c.cfg.arch} with {cfg.arch}: other shape or switches")
        self.cfg = cfg  # the shared shape and switches (each model's seed is in cfgs)
        self.cfgs = [c.cfg for c in coders]
        self.ops = ops
        self.M = M = len(coders)
        with torch.no_grad():
            self.W_dec = nn.Parameter(torch.cat([c.W_dec.detach() for c in coders]).contiguous())
            self.W_enc = (None if cfg.tied else
                          nn.Parameter(torch.cat([c.W_enc.detach().T for c in coders]).contiguous()))
            b_dec = torch.stack([c.b_dec.detach() for c in coders])
            b_enc = torch.stack([c.b_enc.detach() for c in coders])
        if cfg.bias == "learned":
            self.b_dec = nn.Parameter(b_dec)
            self.b_enc = nn.Parameter(b_enc)
        else:
            self.register_buffer("b_dec", b_dec)
            self.register_buffer("b_enc", b_enc)
        assert self.W_dec.shape == (M * cfg.d_sae, cfg.d_in)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def bind(self, coders: Sequence[SparseCoder]) -> None:
        """Make each coder's parameters views of this model's: coder m then reads (and a
        checkpoint writes) model m's current weights without a copy."""
        N = self.cfg.d_sae
        for m, c in enumerate(coders):
            rows = slice(m * N, (m + 1) * N)
            c.W_dec = nn.Parameter(self.W_dec.data[rows])
            if self.W_enc is not None:
                c.W_enc = nn.Parameter(self.W_enc.data[rows].T)
            if self.cfg.bias == "learned":
                c.b_dec = nn.Parameter(self.b_dec.data[m])
                c.b_enc = nn.Parameter(self.b_enc.data[m])

    def member_params(self) -> dict[str, tuple[Tensor, Callable[[Tensor, int], Tensor]]]:
        """name -> (stacked parameter, (a tensor of its shape, m) -> model m's slice of it,
        shaped as SparseCoder's parameter), in SparseCoder's parameter order."""
        N = self.cfg.d_sae
        out = {"W_dec": (self.W_dec, lambda t, m: t[m * N:(m + 1) * N])}
        if self.W_enc is not None:
            out["W_enc"] = (self.W_enc, lambda t, m: t[m * N:(m + 1) * N].T)
        if self.cfg.bias == "learned":
            out["b_dec"] = (self.b_dec, lambda t, m: t[m])
            out["b_enc"] = (self.b_enc, lambda t, m: t[m])
        return out

    def forward(self, x: Tensor, dead: Tensor | None = None, aux_width: int | None = None,
                total_var: Tensor | None = None, aux_detach: bool = False,
                aux_fit: bool = False) -> StackedOutput:
        """(x: [B, D], the batch every model reads) -> StackedOutput. ``dead``: [M, N] bool,
        each model's dead latents for AuxK; aux_width as in SparseCoder.forward (the fast
        path's fixed number of AuxK columns, at least any model's dead count); total_var:
        ||x - mean(x)||^2 when the caller has it (StackedOps.total_var); aux_detach: AuxK's
        codes carry no gradient, and aux_fit: AuxK's decode is fitted to the residual, as in
        SparseCoder.forward (every model of a stack shares its switches, so the choice is the
        stack's)."""
        assert x.dim() == 2 and x.shape[1] == self.cfg.d_in, (
            f"expected [B, {self.cfg.d_in}], got {tuple(x.shape)}")
        cfg, ops = self.cfg, self.ops
        w = ops.weights(self.W_dec, self.W_enc, self.b_dec, self.b_enc)
        aux = ops.aux_latents(dead, aux_width) if dead is not None else None
        k_aux = min(max(cfg.d_in // 2, 1), aux.n) if aux is not None else 0
        codes, pre, aux_codes = ops.topk_encode(x, w, cfg.k, cfg.signed, aux, k_aux)
        x_hat = fvu0 = None
        if cfg.encoder_steps and cfg.iht_gradient == "final":
            # +sg, as SparseCoder: the steps' codes as constants, the amortised codes' FVU a
            # loss term of its own
            x_hat0 = ops.decode(codes, w)
            codes = ops.iht_final(x, codes, x_hat0, w, cfg.k, cfg.signed, cfg.iht_step,
                                  cfg.encoder_steps)
            fvu0 = ops.fvu(x, x_hat0, total_var)[0]
        else:
            for _ in range(cfg.encoder_steps):
                if x_hat is None:
                    x_hat = ops.decode(codes, w)
                codes, x_hat = ops.iht_step(x, x_hat, codes, w, cfg.k, cfg.signed,
                                            cfg.iht_step)
        if x_hat is None:
            x_hat = ops.decode(codes, w)
        fvu, err = ops.fvu(x, x_hat, total_var)
        if aux is None:
            auxk = fvu.new_zeros(self.M)
        else:
            pre, aux_codes = auxk_inputs(pre, aux_codes, aux_detach)
            auxk = ops.auxk_loss(err.detach(), pre, aux_codes, aux, w, cfg.signed, k_aux,
                                 fit=aux_fit)
        return StackedOutput(x_hat, codes, fvu, auxk, fvu0)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        if self.W_dec.grad is not None:
            self.ops.project_rows_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.ops.normalize_rows_(self.W_dec)
