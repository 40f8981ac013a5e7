"""The SAE family in one module: TopK baseline, the iSAE switches, the ReLU SAE, and the
classical dictionary-learning reference behind the same interface.

The maths reads the same on every device: the operations whose fast GPU versions differ in
code (the encoder's top-k, the sparse decode, an IHT step, the FVU, AuxK, the decoder's row
constraint) come from the model's op set, chosen once by whoever creates the model
(isae.models.compute.select_ops); the default is the plain-torch reference.

All models work in *normalised* activation space (see ``isae.data.activations.Normalizer``);
a checkpoint stores the constants, so ``checkpoint.load`` gives raw-in/raw-out reconstructions.

Shapes are written as suffixes or ``[batch, d_in]`` in docstrings: B rows, D = d_in,
N = d_sae (width), K = k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isae.models.config import SAEConfig
from isae.models.reference import (
    REFERENCE,
    AuxLatents,
    Codes,
    ForwardOutput,
    Weights,
    omp,
    sparse_decode,
    topk_select,
)

if TYPE_CHECKING:
    from isae.models.compute import Ops

__all__ = ["Codes", "ForwardOutput", "SparseCoder", "sparse_decode", "topk_select"]


class _Encoding(NamedTuple):
    """What the encoder computed on the way to the codes."""

    codes: Codes
    pre: Tensor | None
    """[B, N] pre-activations (TopK family), for AuxK."""
    x_hat: Tensor | None
    """The reconstruction of ``codes`` where IHT steps carried it along (the fast path)."""
    aux_codes: Tensor | None
    """AuxK's codes where the encoder selected them (the fast path)."""
    x_hat0: Tensor | None = None
    """The amortised codes' reconstruction, differentiable, where the steps are not (+sg)."""


def auxk_inputs(pre: Tensor, aux_codes: Tensor | None, detach: bool
                ) -> tuple[Tensor, Tensor | None]:
    """AuxK's inputs (the pre-activations and the dead latents' codes), without their
    gradient when ``detach`` (TrainConfig.auxk_detach): AuxK then moves only the dead
    latents' decoder rows."""
    if not detach:
        return pre, aux_codes
    return pre.detach(), None if aux_codes is None else aux_codes.detach()


class SparseCoder(nn.Module):
    """One sparse coder. ``encode`` / ``decode`` / ``forward`` as in sparsify.

    ``ops``: the op set its maths runs on (isae.models.compute.select_ops); the reference
    by default.
    """

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu",
                 ops: Ops = REFERENCE) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        D, N = cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        W = torch.randn(N, D, generator=gen, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        if cfg.kind == "relu":
            # Anthropic's April 2024 recipe: small decoder rows, encoder = decoder^T.
            W *= 0.1
        self.W_dec = nn.Parameter(W.to(device))
        if cfg.tied or cfg.kind == "dl":
            self.W_enc = None
        else:
            # [D, N] stored latent-major (the clone keeps the transpose's strides): each
            # latent's encoder column is contiguous, like its decoder row, so the fast
            # path's [N, D] weight gradient is already in the parameter's layout.
            self.W_enc = nn.Parameter(W.T.clone().to(device))
        zeros_d = torch.zeros(D, device=device)
        zeros_n = torch.zeros(N, device=device)
        if cfg.bias == "learned" and cfg.kind != "dl":
            self.b_dec = nn.Parameter(zeros_d)
            self.b_enc = nn.Parameter(zeros_n)
        else:
            self.register_buffer("b_dec", zeros_d)
            self.register_buffer("b_enc", zeros_n)

    # ------------------------------------------------------------------ parameters

    @property
    def encoder_weight(self) -> Tensor:
        """[D, N]."""
        return self.W_dec.T if self.W_enc is None else self.W_enc

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def _weights(self) -> Weights:
        return self.ops.weights(self.W_dec, self.W_enc, self.b_dec, self.b_enc)

    # ------------------------------------------------------------------ the maps

    def pre_acts(self, x: Tensor) -> Tensor:
        """(x: [B, D]) -> [B, N] encoder pre-activations."""
        return (x - self.b_dec) @ self.encoder_weight + self.b_enc

    def encode(self, x: Tensor) -> Codes:
        """(x: [B, D]) normalised activations -> Codes."""
        return self._encode(x, self._weights()).codes

    def decode(self, codes: Codes) -> Tensor:
        """Codes -> [B, D] reconstruction (normalised space)."""
        return self._decode(codes, self._weights())

    def _decode(self, codes: Codes, w: Weights) -> Tensor:
        if self.cfg.kind == "relu":
            return codes.val @ self.W_dec + self.b_dec
        return self.ops.decode(codes, w)

    def _encode(self, x: Tensor, w: Weights, aux: AuxLatents | None = None) -> _Encoding:
        """The codes: OMP (dl), ReLU (relu), or TopK then ``encoder_steps`` IHT steps
        (differentiated through, or for ``iht_gradient`` final not: ``ops.iht_final``)."""
        assert x.shape[-1] == self.cfg.d_in, f"expected [B, {self.cfg.d_in}], got {tuple(x.shape)}"
        if self.cfg.kind == "dl":
            return _Encoding(omp(x - self.b_dec, self.W_dec, self.cfg.k), None, None, None)
        if self.cfg.kind == "relu":
            z = F.relu(self.pre_acts(x))
            idx = torch.arange(z.shape[1], device=z.device).expand_as(z)
            return _Encoding(Codes(z, idx), None, None, None)
        k_aux = self._k_aux(aux.n) if aux is not None else 0
        codes, pre, aux_codes = self.ops.topk_encode(x, w, self.cfg.k, self.cfg.signed, aux, k_aux)
        if self.cfg.encoder_steps and self.cfg.iht_gradient == "final":
            # +sg: the same steps, not differentiated; the amortised codes keep a loss of
            # their own (see SAEConfig.iht_gradient)
            x_hat0 = self._decode(codes, w)
            final, x_hat = self.ops.iht_final(x, codes, x_hat0, w, self.cfg.k, self.cfg.signed,
                                              self.cfg.iht_step, self.cfg.encoder_steps)
            return _Encoding(final, pre, x_hat, aux_codes, x_hat0)
        x_hat = None
        for _ in range(self.cfg.encoder_steps):
            if x_hat is None:
                x_hat = self._decode(codes, w)
            codes, x_hat = self.ops.iht_step(x, x_hat, codes, w, self.cfg.k, self.cfg.signed,
                                             self.cfg.iht_step)
        return _Encoding(codes, pre, x_hat, aux_codes)

    def iht_step(self, x: Tensor, codes: Codes) -> Codes:
        """One normalised iterative-hard-thresholding step with the decoder.

        z <- H_k(z + eta (x - x_hat) W_dec^T), eta = ||g_S||^2 / ||g_S D_S||^2 on the current
        support S (Blumensath & Davies 2010), times ``cfg.iht_step``. A row keeps its old code
        where the step would raise its error, so the steps never make reconstruction worse.
        """
        w = self._weights()
        return self.ops.iht_step(x, self._decode(codes, w), codes, w, self.cfg.k,
                                 self.cfg.signed, self.cfg.iht_step)[0]

    def forward(self, x: Tensor, dead: Tensor | None = None, aux_width: int | None = None,
                aux_detach: bool = False, aux_fit: bool = False) -> ForwardOutput:
        """(x: [B, D]) -> ForwardOutput. ``dead``: [N] bool mask of dead latents for AuxK.

        aux_width (fast path only): how many latent columns AuxK reads, the dead ones first
        and the rest masked out, so the step's shapes stay fixed (isae.gpu.cuda_graphs). It
        must be at least the number of dead latents; None reads exactly those (one host sync).
        aux_detach: AuxK's codes carry no gradient, so AuxK moves only the dead latents'
        decoder rows (TrainConfig.auxk_detach).
        aux_fit: AuxK's decode is scaled row by row by its least-squares fit to the residual,
        the scale without gradient (TrainConfig.auxk_fit, reference.fit_to).
        """
        w = self._weights()
        aux = None
        if self.cfg.kind == "topk" and dead is not None:
            aux = self.ops.aux_latents(dead, aux_width)
        enc = self._encode(x, w, aux)
        codes = enc.codes
        x_hat = enc.x_hat if enc.x_hat is not None else self._decode(codes, w)
        fvu_, err = self.ops.fvu(x, x_hat)
        zero = x.new_zeros(())
        auxk, l1 = zero, zero
        if self.cfg.kind == "relu":
            l1 = (codes.val * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif aux is not None:
            pre, aux_codes = auxk_inputs(enc.pre, enc.aux_codes, aux_detach)
            auxk = self.ops.auxk_loss(err.detach(), pre, aux_codes, aux, w, self.cfg.signed,
                                      self._k_aux(aux.n), fit=aux_fit)
        fvu0 = self.ops.fvu(x, enc.x_hat0)[0] if enc.x_hat0 is not None else None
        return ForwardOutput(x_hat, codes, fvu_, auxk, l1, fvu0)

    def loss(self, x: Tensor, out: ForwardOutput, auxk_alpha: float) -> Tensor:
        """The training loss of ``out = self(x)``, scalar. TopK family: FVU + auxk_alpha x AuxK
        (+ the amortised codes' FVU where the steps are not differentiated, +sg).
        ReLU (Anthropic's April 2024 recipe): the squared error per row and dimension plus
        l1_coeff x the decoder-norm-weighted L1 of the codes."""
        if self.cfg.kind == "relu":
            mse = (x - out.x_hat).pow(2).sum(-1).mean() / x.shape[1]
            return mse + self.cfg.l1_coeff * out.l1
        loss = out.fvu + auxk_alpha * out.auxk
        return loss if out.fvu_amortised is None else loss + out.fvu_amortised

    @torch.no_grad()
    def fired(self, codes: Codes) -> Tensor:
        """[N] int64: in how many rows of ``codes`` each latent is non-zero. No boolean
        indexing, which would wait for the GPU."""
        if self.cfg.kind == "relu":  # dense codes
            return (codes.val != 0).sum(0)
        fires = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=codes.val.device)
        return fires.scatter_add_(0, codes.idx.reshape(-1), (codes.val != 0).reshape(-1).long())

    @property
    def by_gradient(self) -> bool:
        """Whether training optimises this model by gradient steps on ``loss``; dictionary
        learning updates its atoms in closed form instead (isae.models.dictionary_learning)."""
        return self.cfg.kind != "dl"

    @property
    def replays_steps(self) -> bool:
        """Whether training may replay this model's step as a recording when its op set offers
        one (``Ops.step_graphs``): the TopK family, whose AuxK reads a fixed number of columns
        so that a step's shapes stay fixed. A ReLU step always runs eagerly."""
        return self.cfg.kind == "topk"

    def _k_aux(self, n: int) -> int:
        """AuxK's k: d_in / 2 (Gao et al.), at most the n latents it reads."""
        return min(max(self.cfg.d_in // 2, 1), n)

    # ------------------------------------------------------------------ the constraint

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.kind != "relu"

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (norm-preserving step)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        self.ops.project_rows_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if not self.unit_norm_decoder:
            return
        self.ops.normalize_rows_(self.W_dec)

    # ------------------------------------------------------------------ the SAELens layout

    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """W_enc [D, N], W_dec [N, D] with unit rows, b_enc [N], b_dec [D], float32, on CPU.

        A relu SAE folds its decoder row norms into the encoder so the codes (and the
        reconstruction) stay the same while the rows become unit norm.
        """
        W_dec = self.W_dec.detach().float()
        W_enc = self.encoder_weight.detach().float()
        b_enc = self.b_enc.detach().float()
        if self.cfg.kind == "relu":
            norms = W_dec.norm(dim=1).clamp_min(1e-12)
            W_dec = W_dec / norms[:, None]
            W_enc = W_enc * norms[None, :]
            b_enc = b_enc * norms
        return {
            "W_enc": W_enc.contiguous().cpu(),
            "W_dec": W_dec.contiguous().cpu(),
            "b_enc": b_enc.contiguous().cpu(),
            "b_dec": self.b_dec.detach().float().contiguous().cpu(),
        }

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of export_tensors (relu loads with unit rows: same function)."""
        self.W_dec.copy_(tensors["W_dec"])
        if self.W_enc is not None:
            self.W_enc.copy_(tensors["W_enc"])
        self.b_dec.copy_(tensors["b_dec"])
        self.b_enc.copy_(tensors["b_enc"])
