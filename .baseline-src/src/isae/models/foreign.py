"""The forward pass of SAEs trained elsewhere (SAELens, EleutherAI's sparsify), in plain torch.

One module covers what those libraries compute at inference for an autoencoder whose
reconstruction is a sparse code times a dictionary:

    pre = (x - b_dec [if center_input]) W_enc + b_enc            [B, N]
    z   = act(pre)                                               [B, N], library units
    x̂   = z W_dec_lib + b_dec                                    [B, D]

with ``act`` one of

* ``relu``     z = ReLU(pre)                                     (SAELens ``standard``)
* ``topk``     the k largest of ReLU(pre), the rest 0            (SAELens ``topk``, sparsify)
* ``abstopk``  the k largest |pre|, sign kept, the rest 0        (SAELens ``abstopk``)
* ``jumprelu`` z = ReLU(pre) where pre > threshold, else 0       (SAELens ``jumprelu``)

The study's convention is that a code is the coefficient of a *unit-norm* atom, so the
dictionary is stored with unit rows and each latent's decoder norm n_i moves onto its code:
``val_i = z_i * n_i`` (``out_scale``). The reconstruction is unchanged; the codes are the
library's own activations times the decoder norms (equal to them where rows are unit norm).

Shapes: B rows, D = d_in, N = d_sae, K = k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isae.models.config import SAEConfig
from isae.models.reference import Codes, sparse_decode, topk_select

ACTIVATIONS = ("relu", "topk", "abstopk", "jumprelu")


@dataclass
class ForeignConfig:
    """Shape and activation of a foreign SAE."""

    d_in: int
    """Dimension of the activations."""
    d_sae: int
    """Number of latents."""
    activation: str
    """relu | topk | abstopk | jumprelu (see the module docstring)."""
    k: int | None = None
    """Active latents per row (topk, abstopk); None otherwise."""
    center_input: bool = True
    """Subtract b_dec from the input before the encoder (SAELens apply_b_dec_to_input)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        if self.activation in ("topk", "abstopk") and not (self.k and 1 <= self.k <= self.d_sae):
            raise ValueError(f"{self.activation} needs 1 <= k <= d_sae; got k={self.k}")


class ForeignCoder(nn.Module):
    """A foreign SAE's forward pass, with the same ``encode`` / ``decode`` as SparseCoder."""

    def __init__(
        self,
        cfg: ForeignConfig,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor | None = None,
    ) -> None:
        """(W_enc: [D, N]), (b_enc: [N]), (W_dec: [N, D], any row norms), (b_dec: [D]),
        (threshold: [N], jumprelu only). Tensors are copied to float32."""
        super().__init__()
        D, N = cfg.d_in, cfg.d_sae
        shapes = {"W_enc": (W_enc, (D, N)), "b_enc": (b_enc, (N,)), "W_dec": (W_dec, (N, D)),
                  "b_dec": (b_dec, (D,))}
        if cfg.activation == "jumprelu":
            if threshold is None:
                raise ValueError("jumprelu needs a threshold")
            shapes["threshold"] = (threshold, (N,))
        for name, (t, shape) in shapes.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        self.cfg = cfg
        W_dec = W_dec.detach().float()
        norms = W_dec.norm(dim=1)
        self.register_buffer("W_enc", W_enc.detach().float().clone())
        self.register_buffer("b_enc", b_enc.detach().float().clone())
        self.register_buffer("W_dec", (W_dec / norms.clamp_min(1e-12)[:, None]).contiguous())
        self.register_buffer("out_scale", norms.contiguous())
        self.register_buffer("b_dec", b_dec.detach().float().clone())
        self.register_buffer(
            "threshold", threshold.detach().float().clone() if threshold is not None else None
        )

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def unit_rows(self) -> bool:
        """Whether the library's decoder rows are unit norm (to 1e-5), so that its codes are
        the study's codes unchanged."""
        return bool(torch.allclose(self.out_scale, torch.ones_like(self.out_scale), rtol=0, atol=1e-5))

    @property
    def equal_rows(self) -> bool:
        """Whether the library's decoder rows all have one norm s (to a relative 1e-5), as
        in an isae export, whose unit rows are scaled by the activation set's scale: a TopK
        on pre-activations then picks what a TopK on s * pre-activations picks."""
        n = self.out_scale
        return bool(n.numel() and n.min() > 0 and (n.max() - n.min()) <= 1e-5 * n.max())

    def pre_acts(self, x: Tensor) -> Tensor:
        """(x: [B, D]) -> [B, N] encoder pre-activations."""
        if self.cfg.center_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Codes:
        """(x: [B, D]) raw activations -> Codes on the unit-norm atoms.

        topk and abstopk give K = k columns; relu and jumprelu give as many columns as the
        largest number of active latents in the batch (inactive slots hold value 0).
        """
        assert x.shape[-1] == self.cfg.d_in, f"expected [B, {self.cfg.d_in}], got {tuple(x.shape)}"
        pre = self.pre_acts(x)
        act = self.cfg.activation
        if act in ("topk", "abstopk"):
            codes = topk_select(pre, self.cfg.k, signed=act == "abstopk")
        else:
            z = F.relu(pre)
            if act == "jumprelu":
                z = torch.where(pre > self.threshold, z, torch.zeros_like(z))
            width = max(int((z != 0).sum(-1).max()) if z.numel() else 0, 1)
            val, idx = z.topk(width, dim=-1, sorted=False)
            codes = Codes(val, idx)
        return Codes(codes.val * self.out_scale[codes.idx], codes.idx)

    def decode(self, codes: Codes) -> Tensor:
        """Codes -> [B, D] reconstruction (raw activations)."""
        return sparse_decode(codes, self.W_dec) + self.b_dec

    def library_tensors(self) -> dict[str, Tensor]:
        """W_enc [D, N], b_enc [N], W_dec [N, D] with the library's row norms, b_dec [D]."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc,
                "W_dec": self.W_dec * self.out_scale[:, None], "b_dec": self.b_dec}


def as_sparse_coder(coder: ForeignCoder) -> tuple[SAEConfig, dict[str, Tensor]]:
    """The isae SparseCoder that computes exactly what ``coder`` computes: (config, tensors in
    ``SparseCoder.export_tensors`` layout). ValueError with the reason when there is none.

    topk -> ``topk``, abstopk -> ``topk+signed``, relu -> ``relu`` (its decoder norms fold
    into the encoder, since ReLU commutes with a positive scale). A TopK coder whose
    library decoder rows all have one norm s (every isae export: unit rows times the set's
    scale) folds them the same way, since scaling every pre-activation by s changes no
    selection; one whose rows have different norms selects on pre-activations not scaled
    by them, which no isae checkpoint (unit rows by contract) reproduces. jumprelu has no
    isae architecture.
    """
    c = coder.cfg
    t = {k: v.detach().float().cpu().clone() for k, v in coder.library_tensors().items()}
    W_enc, b_enc, b_dec = t["W_enc"], t["b_enc"], t["b_dec"]
    if not c.center_input:
        # x W + b = (x - b_dec) W + (b + b_dec W): the isae encoder always centres.
        b_enc = b_enc + b_dec @ W_enc
    n = coder.out_scale.detach().float().cpu()
    W_dec = coder.W_dec.detach().float().cpu().clone()
    if c.activation == "jumprelu":
        raise ValueError("isae has no JumpReLU architecture")
    if c.activation == "relu":
        W_enc, b_enc = W_enc * n[None, :], b_enc * n
        arch, k = "relu", 1  # a ReLU SAE has no k; 1 is only a label
    else:
        if not coder.unit_rows and coder.equal_rows:
            # n_i = s (to 1e-5): TopK(s * pre) selects what TopK(pre) does, and its values
            # are the codes on the unit atoms; folding each n_i keeps x̂ exactly.
            W_enc, b_enc = W_enc * n[None, :], b_enc * n
        elif not coder.unit_rows:
            raise ValueError(
                f"its decoder rows are not unit norm (norms {float(n.min()):.4g} to "
                f"{float(n.max()):.4g}, not one common norm) and its TopK selects on "
                "pre-activations not scaled by them; an isae checkpoint has unit rows, so it "
                "cannot compute the same codes"
            )
        arch, k = ("topk+signed" if c.activation == "abstopk" else "topk"), c.k
    if not 1 <= k < c.d_sae:
        raise ValueError(f"isae needs 1 <= k < width; this SAE has k={k}, width={c.d_sae}")
    cfg = SAEConfig.from_arch(arch, d_in=c.d_in, d_sae=c.d_sae, k=k)
    return cfg, {"W_enc": W_enc.contiguous(), "W_dec": W_dec, "b_enc": b_enc.contiguous(),
                 "b_dec": b_dec.contiguous()}
