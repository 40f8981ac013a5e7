"""The plain-torch maths of the SAE family: the code type, the top-k selection, the FVU, the
sparse decode and orthogonal matching pursuit.

These are the reference operations: every faster implementation (isae.gpu.ops) is checked
against them, and the CPU trains with them. Pure functions on tensors; no I/O.

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


def topk_select(pre: Tensor, k: int, signed: bool) -> Codes:
    """TopK with or without signs. (pre: [B, N]) -> Codes [B, K].

    signed: the k largest |pre| keep their sign. unsigned: ReLU, then the k largest.
    """
    if signed:
        idx = pre.abs().topk(k, dim=-1, sorted=False).indices
        return Codes(pre.gather(-1, idx), idx)
    val, idx = F.relu(pre).topk(k, dim=-1, sorted=False)
    return Codes(val, idx)


def fvu(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(||x - x_hat||^2 / ||x - mean(x)||^2, the residual x - x_hat): the reference of
    fast.fvu, also AuxK's loss (the FVU of the residual by the dead latents' decode)."""
    err = x - x_hat
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return err.pow(2).sum() / total_var, err


def sparse_decode(codes: Codes, W_dec: Tensor) -> Tensor:
    """sum_j val_j W_dec[idx_j] without a dense [B, N] scatter. -> [B, D]."""
    return F.embedding_bag(codes.idx, W_dec, per_sample_weights=codes.val, mode="sum")


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
