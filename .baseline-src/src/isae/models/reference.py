"""The plain-torch maths of the SAE family, and the reference op set built on it.

Pure functions on tensors, no I/O: the code type, the top-k selection, the FVU, the sparse
decode, one iterative-hard-thresholding step, AuxK's selection, the decoder's row
constraint and orthogonal matching pursuit. ``ReferenceOps`` hands them to a SparseCoder
(isae.models.compute.select_ops chooses it on every device but CUDA); the fast op set
(isae.gpu.ops.FastOps) is checked against them, and its kernels fall back to them.

Shapes: B rows, D = d_in, N = d_sae (width), K = k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Codes(NamedTuple):
    """A batch of sparse codes in (values, indices) form."""

    val: Tensor
    """Code values, [B, K] (for relu: [B, N], dense)."""
    idx: Tensor
    """Latent indices, [B, K] int64 (for relu: arange(N) broadcast)."""

    def dense(self, width: int) -> Tensor:
        """[B, N] dense codes."""
        return self.val.new_zeros(self.val.shape[0], width).scatter(1, self.idx, self.val)


class ForwardOutput(NamedTuple):
    """What one forward pass computes, for the trainer and for evaluation."""

    x_hat: Tensor
    """Reconstruction, [B, D], normalised space."""
    codes: Codes
    """The codes that produced it."""
    fvu: Tensor
    """Scalar: sum of squared errors / sum of squared deviations from the batch mean."""
    auxk: Tensor
    """Scalar AuxK loss on dead latents (0 when none are dead or not topk)."""
    l1: Tensor
    """Scalar decoder-norm-weighted L1 of the codes (relu; 0 otherwise)."""
    fvu_amortised: Tensor | None = None
    """Scalar FVU of the amortised TopK codes before the thresholding steps, a loss term of
    its own where the steps are not differentiated (``+sg``); None otherwise."""


def topk_select(pre: Tensor, k: int, signed: bool) -> Codes:
    """TopK with or without signs. (pre: [B, N]) -> Codes [B, K].

    signed: the k largest |pre| keep their sign. unsigned: ReLU, then the k largest.
    """
    if signed:
        idx = pre.abs().topk(k, dim=-1, sorted=False).indices
        return Codes(pre.gather(-1, idx), idx)
    val, idx = F.relu(pre).topk(k, dim=-1, sorted=False)
    return Codes(val, idx)


def fvu_parts(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x - x_hat, ||x - x_hat||^2, ||x - mean_rows(x)||^2) for [B, D] x and x_hat."""
    err = x - x_hat
    return err, err.pow(2).sum(), (x - x.mean(0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(||x - x_hat||^2 / ||x - mean(x)||^2, the residual x - x_hat), also AuxK's loss (the
    FVU of the residual by the dead latents' decode)."""
    err, sse, total_var = fvu_parts(x, x_hat)
    return sse / total_var.clamp_min(1e-12), err


def sparse_decode(codes: Codes, W_dec: Tensor) -> Tensor:
    """sum_j val_j W_dec[idx_j] without a dense [B, N] scatter. -> [B, D]."""
    return F.embedding_bag(codes.idx, W_dec, per_sample_weights=codes.val, mode="sum")


def auxk_select(pre: Tensor, dead: Tensor, k: int, signed: bool) -> Codes:
    """AuxK's codes (Gao et al.): each row's k largest scores among the latents where ``dead``
    [N] is true, scored as in topk_select. (pre: [B, N]) -> Codes [B, k]. Needs k <= dead.sum()."""
    score = pre.abs() if signed else F.relu(pre)
    score = torch.where(dead, score, torch.full_like(score, -1.0))
    idx = score.topk(k, dim=-1, sorted=False).indices
    val = pre.gather(-1, idx)
    if not signed:
        val = F.relu(val)
    return Codes(val, idx)


def fit_to(err: Tensor, e_hat: Tensor) -> Tensor:
    """``e_hat`` scaled row by row by its least-squares fit to ``err``,
    <err, e_hat> / <e_hat, e_hat> (0 where e_hat is 0), the scale without gradient
    (TrainConfig.auxk_fit). AuxK's gradient then turns the dead latents' codes toward the
    residual without pulling their size down where their decode overshoots it, which
    shrank an untied signed coder's dead encoder rows (benchmarks/dead_latents_tied.md).
    (err, e_hat: [..., D]) -> [..., D]."""
    with torch.no_grad():
        c = (err * e_hat).sum(-1, keepdim=True) / e_hat.pow(2).sum(-1, keepdim=True).clamp_min(
            torch.finfo(e_hat.dtype).tiny)
    return e_hat * c


def auxk_weight(alpha: float, norm: str, x: Tensor, x_hat: Tensor, dead: Tensor | None,
                k_aux: int) -> float | Tensor:
    """AuxK's weight in the loss FVU + weight x AuxK, where AuxK is the FVU of the residual
    x - x_hat by the dead latents' decode (auxk_loss).

    ``norm`` residual (Gao et al.): ``alpha``. ``norm`` input (EleutherAI sparsify):
    alpha x ||r - mean(r)||^2 / ||x - mean(x)||^2 x min(n_dead / k_aux, 1), r = x - x_hat,
    so that weight x AuxK is sparsify's loss alpha x min(n_dead / k_aux, 1) x
    ||r - e_hat||^2 / ||x - mean(x)||^2. A tensor then (no host sync: CUDA graphs record
    it), with no gradient. (x, x_hat: [B, D]; dead: [N] bool or None; k_aux: AuxK's k before
    it is clipped to the number of dead latents, d_in / 2.)"""
    if norm == "residual" or dead is None:
        return alpha
    if norm != "input":
        raise ValueError(f"unknown AuxK normalisation {norm!r}")
    with torch.no_grad():
        r = x - x_hat
        ratio = (r - r.mean(0)).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        few = (dead.sum() / k_aux).clamp(max=1.0)
        return alpha * ratio * few


def iht_eta(g_S: Tensor, Dg: Tensor, scale: float) -> Tensor:
    """The step size of an IHT step, [B, 1]: ||g_S||^2 / ||g_S D_S||^2 on the current support
    (Blumensath & Davies 2010), times ``scale``."""
    eta = g_S.pow(2).sum(-1, keepdim=True) / Dg.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
    return eta * scale


def keep_better(x: Tensor, x_hat: Tensor, codes: Codes, new: Codes, x_new: Tensor
                ) -> tuple[Codes, Tensor]:
    """Per row, the ``new`` codes (reconstruction ``x_new``) where they reconstruct x no worse
    than ``codes`` (``x_hat``), else the old ones; with the reconstruction of the codes kept."""
    better = ((x - x_new).pow(2).sum(-1) <= (x - x_hat).pow(2).sum(-1)).unsqueeze(-1)
    kept = Codes(torch.where(better, new.val, codes.val), torch.where(better, new.idx, codes.idx))
    return kept, torch.where(better, x_new, x_hat)


@torch.no_grad()
def steps_without_grad(ops, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int,
                       signed: bool, scale: float, steps: int) -> Codes:
    """``steps`` of ``ops.iht_step`` from ``codes`` (reconstruction ``x_hat``) without
    gradient: the iht_final of an op set whose steps return no reconstruction (the
    reference, single or stacked)."""
    codes, x_hat = Codes(codes.val.detach(), codes.idx), x_hat.detach()
    for _ in range(steps):
        if x_hat is None:
            x_hat = ops.decode(codes, w)
        codes, x_hat = ops.iht_step(x, x_hat, codes, w, k, signed, scale)
    return codes


def project_rows_(G: Tensor, W: Tensor) -> None:
    """G[i] -= <G[i], W[i]> W[i] in place: a gradient step along G then keeps each row's norm
    to first order."""
    G -= (G * W).sum(-1, keepdim=True) * W


def normalize_rows_(W: Tensor) -> None:
    """W[i] /= max(||W[i]||, 1e-12) in place."""
    W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)


#: Adam's betas (eps 1e-8): torch.optim.Adam's defaults, which SAEStepper uses.
ADAM_BETAS = (0.9, 0.999)


def adam_scalars(step: Tensor, lr: Tensor, betas: tuple[float, float] = ADAM_BETAS
                 ) -> tuple[Tensor, Tensor]:
    """Adam's per-model step size lr / (1 - beta1^t) and sqrt(1 - beta2^t), each [M] float32,
    computed in float64 as torch's Adam does (in float32, 1 - 0.999^t loses ~1e-5 of itself
    at small t)."""
    t = step.double()
    b1, b2 = betas
    return (lr.double() / (1 - b1 ** t)).float(), (1 - b2 ** t).sqrt().float()


def adam_rows_(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor,
               bc2_sqrt: Tensor, betas: tuple[float, float] = ADAM_BETAS, eps: float = 1e-8
               ) -> None:
    """One Adam step in place (torch.optim.Adam's formula) on a tensor that stacks M models'
    parameters along its first axis, each model with its own step size and bias correction
    (``adam_scalars``: its own learning rate and step count), each [M]. p, g, exp_avg,
    exp_avg_sq: one shape, contiguous, first axis a multiple of M (each model's rows
    contiguous)."""
    b1, b2 = betas
    M = step_size.shape[0]
    P, G, m, v = (t.view(M, -1) for t in (p, g, exp_avg, exp_avg_sq))
    m.lerp_(G, 1 - b1)
    v.mul_(b2).addcmul_(G, G, value=1 - b2)
    denom = (v.sqrt() / bc2_sqrt[:, None]).add_(eps)
    P.sub_(step_size[:, None] * (m / denom))


# ----------------------------------------------------------------------------- the op set


class Weights(NamedTuple):
    """The parameters one forward pass reads, as its op set hands them out."""

    dec: Tensor
    """[N, D] decoder (the fast path's: a view whose readers pool their gradient in grads)."""
    enc: Tensor
    """[D, N] encoder weight: W_enc, or dec transposed for a tied model."""
    b_dec: Tensor
    """[D]."""
    b_enc: Tensor
    """[N]."""
    tied: bool
    """Whether enc is dec transposed."""
    grads: object = None
    """The fast path's pooled decoder gradient (isae.gpu.ops.DecoderGrads); None here."""


class AuxLatents(NamedTuple):
    """The latents AuxK reads in one step."""

    cols: Tensor | None
    """[C] latent indices (the fast path's fixed-width columns); None: all N latents."""
    dead: Tensor
    """[C] (or [N]) bool: which of them are dead."""
    n: int
    """How many latents AuxK reads: C, or here the number of dead ones."""


class ReferenceOps:
    """The reference op set: the plain-torch maths above, on any device.

    Each method is one operation of SparseCoder's maths that the fast op set
    (isae.gpu.ops.FastOps) computes differently (bfloat16 products, fused kernels,
    hand-written backward passes) but to the same result.
    """

    name = "reference"
    #: Whether the op set replays a training step as a CUDA graph (the fast path only).
    cuda_graphs = False

    def weights(self, W_dec: Tensor, W_enc: Tensor | None, b_dec: Tensor, b_enc: Tensor) -> Weights:
        tied = W_enc is None
        return Weights(W_dec, W_dec.T if tied else W_enc, b_dec, b_enc, tied)

    def aux_latents(self, dead: Tensor, width: int | None) -> AuxLatents | None:
        """The dead latents themselves (``width`` is the fast path's); None when none is dead."""
        n_dead = int(dead.sum())
        return AuxLatents(None, dead, n_dead) if n_dead else None

    def topk_encode(self, x: Tensor, w: Weights, k: int, signed: bool,
                    aux: AuxLatents | None, k_aux: int) -> tuple[Codes, Tensor, Tensor | None]:
        """(codes, pre-activations [B, N], None): this path selects AuxK's codes in auxk_loss."""
        pre = (x - w.b_dec) @ w.enc + w.b_enc
        return topk_select(pre, k, signed), pre, None

    def decode(self, codes: Codes, w: Weights) -> Tensor:
        return sparse_decode(codes, w.dec) + w.b_dec

    def iht_step(self, x: Tensor, x_hat: Tensor, codes: Codes, w: Weights, k: int, signed: bool,
                 scale: float) -> tuple[Codes, Tensor | None]:
        """z <- H_k(z + eta (x - x_hat) W_dec^T), kept per row where it reconstructs no worse.

        Returns no reconstruction: the caller decodes the kept codes afresh, so autograd sees
        one decode of them rather than a choice between two.
        """
        r = x - x_hat
        g = r @ w.dec.T  # [B, N]
        g_S = g.gather(-1, codes.idx)
        Dg = sparse_decode(Codes(g_S, codes.idx), w.dec)
        step = iht_eta(g_S, Dg, scale)
        u = (g * step).scatter_add(-1, codes.idx, codes.val)
        new = topk_select(u, k, signed)
        return keep_better(x, x_hat, codes, new, self.decode(new, w))[0], None

    def iht_final(self, x: Tensor, codes: Codes, x_hat: Tensor, w: Weights, k: int, signed: bool,
                  scale: float, steps: int) -> tuple[Codes, Tensor | None]:
        """``steps`` IHT steps from the amortised ``codes`` (reconstruction ``x_hat``) without
        gradient: the codes of the same steps differentiated, as constants for the decoder
        (SAEConfig.iht_gradient). No reconstruction: the caller decodes the final codes
        with gradient."""
        return steps_without_grad(self, x, codes, x_hat, w, k, signed, scale, steps), None

    def fvu(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
        return fvu(x, x_hat)

    def auxk_loss(self, err: Tensor, pre: Tensor, aux_codes: Tensor | None, aux: AuxLatents,
                  w: Weights, signed: bool, k_aux: int, fit: bool = False) -> Tensor:
        """The FVU of the residual ``err`` by the top ``k_aux`` dead latents' decode (fitted
        to it row by row where ``fit``: fit_to)."""
        e_hat = sparse_decode(auxk_select(pre, aux.dead, k_aux, signed), w.dec)
        if fit:
            e_hat = fit_to(err, e_hat)
        return min(aux.n / k_aux, 1.0) * fvu(err, e_hat)[0]

    def project_rows_(self, G: Tensor, W: Tensor) -> None:
        project_rows_(G, W)

    def normalize_rows_(self, W: Tensor) -> None:
        normalize_rows_(W)

    def step_graphs(self, body, prepare, device) -> None:
        """None: the reference runs every training step eagerly."""
        return None

    def refresh_copies(self, W: Tensor) -> None:
        """Nothing to refresh: the reference keeps no copies of the parameters."""


REFERENCE = ReferenceOps()


@torch.no_grad()
def omp(x: Tensor, D: Tensor, k: int, chunk: int = 2048) -> Codes:
    """Batched orthogonal matching pursuit. (x: [B, D_in]), (D: [N, D_in] unit rows) -> Codes [B, k].

    At each of k steps the atom most correlated with the residual joins the support and the
    coefficients are refit by least squares on the whole support (a Cholesky-free solve of
    the small [t, t] Gram system, regularised by 1e-6 for exactly collinear atoms).
    """
    vals, idxs = [], []
    for i in range(0, x.shape[0], chunk):
        v, j = _omp_chunk(x[i : i + chunk], D, k)
        vals.append(v)
        idxs.append(j)
    return Codes(torch.cat(vals), torch.cat(idxs))


def _omp_chunk(x: Tensor, D: Tensor, k: int) -> tuple[Tensor, Tensor]:
    B = x.shape[0]
    idx = torch.zeros(B, k, dtype=torch.long, device=x.device)
    coef = x.new_zeros(B, 0)
    r = x
    eye = torch.eye(k, device=x.device, dtype=x.dtype) * 1e-6
    for t in range(k):
        c = (r @ D.T).abs()
        if t:
            c.scatter_(1, idx[:, :t], -1.0)
        idx[:, t] = c.argmax(1)
        Ds = D[idx[:, : t + 1]]  # [B, t+1, D_in]
        gram = Ds @ Ds.transpose(1, 2) + eye[: t + 1, : t + 1]
        rhs = (Ds @ x.unsqueeze(-1)).squeeze(-1)
        coef = torch.linalg.solve(gram, rhs)
        r = x - (coef.unsqueeze(1) @ Ds).squeeze(1)
    return coef, idx
