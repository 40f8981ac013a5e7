"""The SAE family in one module: TopK baseline, the iSAE switches, the ReLU SAE, and the
classical dictionary-learning reference behind the same interface.

All models work in *normalised* activation space (see ``isae.data.activations.Normalizer``); a checkpoint
stores the constants, so ``checkpoint.load`` gives raw-in/raw-out reconstructions.

Shapes are written as suffixes or ``[batch, d_in]`` in docstrings: B rows, D = d_in,
N = d_sae (width), K = k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isae.gpu import ops as fast
from isae.models.config import SAEConfig
from isae.models.reference import Codes, ForwardOutput, fvu, omp, sparse_decode, topk_select


class _FastWeights(NamedTuple):
    """The weights one fast-path forward reads: W_dec through ``fast.collect`` (so its
    readers' gradients meet in one buffer) and the encoder weight."""

    dec: Tensor
    """[N, D], collect's view of W_dec."""
    enc: Tensor
    """[D, N]: the view transposed for a tied model, else W_enc."""
    grads: fast.DecoderGrads
    tied: bool


class SparseCoder(nn.Module):
    """One sparse coder. ``encode`` / ``decode`` / ``forward`` as in sparsify."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
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

    # ------------------------------------------------------------------ the maps

    def pre_acts(self, x: Tensor) -> Tensor:
        """(x: [B, D]) -> [B, N] encoder pre-activations."""
        return (x - self.b_dec) @ self.encoder_weight + self.b_enc

    def encode(self, x: Tensor) -> Codes:
        """(x: [B, D]) normalised activations -> Codes."""
        return self._encode(x)[0]

    def _encode(self, x: Tensor) -> tuple[Codes, Tensor | None]:
        """Codes and the dense pre-activations when they were computed (for AuxK)."""
        codes, pre, _, _ = self._encode_and_decode(x)
        return codes, pre

    def _fast_weights(self) -> _FastWeights:
        dec, grads = fast.collect(self.W_dec)
        tied = self.W_enc is None
        return _FastWeights(dec, dec.T if tied else self.W_enc, grads, tied)

    def _encode_and_decode(self, x: Tensor, aux: tuple[Tensor, Tensor] | None = None,
                           w: _FastWeights | None = None
                           ) -> tuple[Codes, Tensor | None, Tensor | None, Tensor | None]:
        """Codes, pre-activations, the reconstruction where the encoder made it anyway (the
        GPU's IHT steps carry it along instead of decoding each support twice), and on the
        fast path AuxK's codes on the columns ``aux`` (see fast.topk_encode)."""
        assert x.shape[-1] == self.cfg.d_in, f"expected [B, {self.cfg.d_in}], got {tuple(x.shape)}"
        if self.cfg.kind == "dl":
            return omp(x - self.b_dec, self.W_dec, self.cfg.k), None, None, None
        if self.cfg.kind == "relu":
            z = F.relu(self.pre_acts(x))
            idx = torch.arange(z.shape[1], device=z.device).expand_as(z)
            return Codes(z, idx), None, None, None
        if fast.enabled(x):
            w = w or self._fast_weights()
            val, idx, pre, z_aux = fast.topk_encode(
                x, self.b_dec, w.enc, self.b_enc, self.cfg.k, self.cfg.signed,
                aux, self._k_aux(aux[0].numel()) if aux is not None else 0,
                w.grads if w.tied else None,
            )
            codes = Codes(val, idx)
            x_hat = None
            for _ in range(self.cfg.encoder_steps):
                if x_hat is None:
                    x_hat = self._decode_fast(codes, w)
                codes, x_hat = self._iht_step_fast(x, x_hat, codes, w)
            return codes, pre, x_hat, z_aux
        pre = self.pre_acts(x)
        codes = topk_select(pre, self.cfg.k, self.cfg.signed)
        for _ in range(self.cfg.encoder_steps):
            codes = self.iht_step(x, codes)
        return codes, pre, None, None

    def decode(self, codes: Codes) -> Tensor:
        """Codes -> [B, D] reconstruction (normalised space)."""
        if self.cfg.kind == "relu":
            return codes.val @ self.W_dec + self.b_dec
        if fast.enabled(codes.val):
            return fast.sparse_decode(codes.val, codes.idx, self.W_dec, bias=self.b_dec)
        return sparse_decode(codes, self.W_dec) + self.b_dec

    def _decode_fast(self, codes: Codes, w: _FastWeights) -> Tensor:
        return fast.sparse_decode(codes.val, codes.idx, w.dec, w.grads, self.b_dec)

    def iht_step(self, x: Tensor, codes: Codes) -> Codes:
        """One normalised iterative-hard-thresholding step with the decoder.

        z <- H_k(z + eta (x - x_hat) W_dec^T), eta = ||g_S||^2 / ||g_S D_S||^2 on the current
        support S (Blumensath & Davies 2010), times ``cfg.iht_step``. A row keeps its old code
        where the step would raise its error, so the steps never make reconstruction worse.
        """
        if fast.enabled(x):
            w = self._fast_weights()
            return self._iht_step_fast(x, self._decode_fast(codes, w), codes, w)[0]
        x_hat = self.decode(codes)
        r = x - x_hat
        g = r @ self.W_dec.T  # [B, N]
        g_S = g.gather(-1, codes.idx)
        Dg = sparse_decode(Codes(g_S, codes.idx), self.W_dec)
        step = self._iht_eta(g_S, Dg)
        u = (g * step).scatter_add(-1, codes.idx, codes.val)
        new = topk_select(u, self.cfg.k, self.cfg.signed)
        return self._keep_better(x, x_hat, codes, new)[0]

    def _iht_eta(self, g_S: Tensor, Dg: Tensor) -> Tensor:
        eta = g_S.pow(2).sum(-1, keepdim=True) / Dg.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        return eta * self.cfg.iht_step

    def _iht_step_fast(self, x: Tensor, x_hat: Tensor, codes: Codes, w: _FastWeights
                       ) -> tuple[Codes, Tensor]:
        """The same step on the GPU, taking and returning the reconstruction: the new support
        is chosen from a bfloat16 correlation computed without gradient; only the
        correlations kept are differentiated."""
        r = x - x_hat
        g_S = fast.gather_dot(r, codes.idx, w.dec, w.grads)
        Dg = fast.sparse_decode(g_S, codes.idx, w.dec, w.grads)
        step = self._iht_eta(g_S, Dg)
        with torch.no_grad():
            # (step r) W^T: the step scales the small [B, D] side, not the [B, N] product
            u = (r * step).to(fast.LOW) @ fast.low(w.dec).T  # [B, N] bf16
            u = u.scatter_add_(-1, codes.idx, codes.val.to(u.dtype))
            idx = fast.select_topk(u, self.cfg.k, self.cfg.signed)
        # New value = the old code value (where the atom was already in the support) plus the
        # step along the float32 correlation.
        same = (idx.unsqueeze(-1) == codes.idx.unsqueeze(-2)).to(codes.val.dtype)
        val = (same @ codes.val.unsqueeze(-1)).squeeze(-1) + step * fast.gather_dot(r, idx, w.dec, w.grads)
        if not self.cfg.signed:
            val = F.relu(val)
        return self._keep_better(x, x_hat, codes, Codes(val, idx), w)

    def _keep_better(self, x: Tensor, x_hat: Tensor, codes: Codes, new: Codes,
                     w: _FastWeights | None = None) -> tuple[Codes, Tensor]:
        """Per row, the new codes where they reconstruct no worse, else the old ones; with the
        reconstruction of the codes kept."""
        x_new = self.decode(new) if w is None else self._decode_fast(new, w)
        better = ((x - x_new).pow(2).sum(-1) <= (x - x_hat).pow(2).sum(-1)).unsqueeze(-1)
        kept = Codes(torch.where(better, new.val, codes.val), torch.where(better, new.idx, codes.idx))
        return kept, torch.where(better, x_new, x_hat)

    def forward(self, x: Tensor, dead: Tensor | None = None, aux_width: int | None = None
                ) -> ForwardOutput:
        """(x: [B, D]) -> ForwardOutput. ``dead``: [N] bool mask of dead latents for AuxK.

        aux_width (fast path only): how many latent columns AuxK reads, the dead ones first
        and the rest masked out, so the step's shapes stay fixed (cuda_cuda_graphs.py). It must be at
        least the number of dead latents; None reads exactly those (one host sync).
        """
        use_fast = fast.enabled(x)
        aux_k = self.cfg.kind == "topk" and dead is not None
        aux = w = None
        if use_fast and self.cfg.kind == "topk":
            w = self._fast_weights()
        if aux_k and use_fast:
            if aux_width is None:
                aux_width = int(dead.sum())  # the step's one host sync
            if aux_width:
                aux = fast.aux_columns(dead, aux_width)
        codes, pre, x_hat, z_aux = self._encode_and_decode(x, aux, w)
        if x_hat is None:
            x_hat = self.decode(codes) if w is None else self._decode_fast(codes, w)
        fvu_, err = (fast.fvu if use_fast else fvu)(x, x_hat)
        zero = x.new_zeros(())
        auxk, l1 = zero, zero
        if self.cfg.kind == "relu":
            l1 = (codes.val * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif aux is not None:
            # Reference AuxK's scale min(n_dead / k_aux, 1) is always 1, since k_aux <= n_dead.
            e_hat = fast.aux_decode(z_aux, aux[0], w.dec, w.grads)
            auxk = fast.fvu(err.detach(), e_hat)[0]
        elif aux_k and not use_fast:
            n_dead = int(dead.sum())
            if n_dead:
                auxk = self._auxk_loss(x, err.detach(), dead, n_dead, pre)
        return ForwardOutput(x_hat, codes, fvu_, auxk, l1)

    def _k_aux(self, n_dead: int) -> int:
        return min(max(self.cfg.d_in // 2, 1), n_dead)

    def _auxk_loss(self, x: Tensor, e: Tensor, dead: Tensor, n_dead: int,
                   pre: Tensor | None) -> Tensor:
        """Gao et al.'s AuxK: the top dead latents (mask ``dead``) reconstruct the residual e."""
        k_aux = self._k_aux(n_dead)
        if pre is None:
            pre = self.pre_acts(x)
        score = pre.abs() if self.cfg.signed else F.relu(pre)
        score = torch.where(dead, score, torch.full_like(score, -1.0))
        idx = score.topk(k_aux, dim=-1, sorted=False).indices
        val = pre.gather(-1, idx)
        if not self.cfg.signed:
            val = F.relu(val)
        e_hat = sparse_decode(Codes(val, idx), self.W_dec)
        return min(n_dead / k_aux, 1.0) * fvu(e, e_hat)[0]

    # ------------------------------------------------------------------ the constraint

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.kind != "relu"

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (norm-preserving step)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, G = self.W_dec, self.W_dec.grad
        if fast.enabled(W):
            fast.kernels.project_rows_(G, W)
        else:
            G -= (G * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if not self.unit_norm_decoder:
            return
        if fast.enabled(self.W_dec):
            fast.normalize_rows_(self.W_dec)
        else:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

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
