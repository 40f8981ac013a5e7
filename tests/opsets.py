"""The op sets under test, and the check each must pass: a model's forward pass and its
gradients against the same weights in float64 on the reference maths.

Used on the CPU (tests/test_fast_cpu.py: the fast op set on stock-op kernels), in Triton's
interpreter (tests/test_kernels.py) and on CUDA (tests/test_fast_gpu.py).
"""

from __future__ import annotations

import torch

from isae.gpu.ops import FastOps
from isae.models.config import SAEConfig
from isae.models.reference import REFERENCE
from isae.models.sparse_coder import SparseCoder

#: name -> a fresh op set (FastOps without graph replay: these checks run eager steps).
OP_SETS = {"reference": lambda: REFERENCE, "fast": lambda: FastOps(cuda_graphs=False)}

#: How far each op set may be from float64: (FVU, AuxK) relative, and the floor of the
#: cosine between gradients (without and with IHT steps). The reference is float32 maths
#: (measured on the CPU: 1e-7 relative, 1 - cos 1e-14); the fast path encodes in bfloat16, so near-ties may
#: pick another latent in a few rows; IHT re-selects supports from bfloat16 scores, where
#: near-ties flip more often and each flip moves whole rows of the decoder gradient.
TOLERANCE = {"reference": (1e-5, 1e-5, 0.99999, 0.99999), "fast": (0.02, 0.03, 0.98, 0.9)}


def model(arch: str, d: int, n: int, k: int, ops, seed: int = 1, device: str = "cpu") -> SparseCoder:
    """A coder on ``ops``; learned biases drawn from the global generator (not zero, so that
    their gradients are checked too)."""
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=seed), device=device, ops=ops)
    if m.cfg.bias == "learned":
        with torch.no_grad():
            m.b_dec.normal_(0, 0.1)
            m.b_enc.normal_(0, 0.1)
    return m


def step(m: SparseCoder, x: torch.Tensor, dead: torch.Tensor | None, aux_width: int | None = None):
    """One forward (FVU + AuxK / 32, + the amortised FVU of +sg) and backward: (output,
    {name: gradient})."""
    m.zero_grad(set_to_none=True)
    out = m(x, dead, aux_width=aux_width)
    loss = out.fvu + out.auxk / 32
    if out.fvu_amortised is not None:  # +sg's second term (SparseCoder.loss)
        loss = loss + out.fvu_amortised
    loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


def float64_twin(m: SparseCoder) -> SparseCoder:
    """The same weights in float64, on the reference op set."""
    twin = SparseCoder(m.cfg, device=m.device)
    twin.load_state_dict(m.state_dict())
    return twin.double()


def check_against_float64(m: SparseCoder, name: str, x: torch.Tensor,
                          dead: torch.Tensor | None) -> None:
    """m (on op set ``name``) against its float64 twin on x: FVU, AuxK, gradients."""
    ref, g_ref = step(float64_twin(m), x.double(), dead)
    got, g_got = step(m, x, dead)
    ref, got = (o._replace(fvu=o.fvu.detach(), auxk=o.auxk.detach()) for o in (ref, got))
    fvu_tol, auxk_tol, floor, iter_floor = TOLERANCE[name]
    assert abs(float(got.fvu) - float(ref.fvu)) / float(ref.fvu) < fvu_tol, (float(got.fvu), float(ref.fvu))
    if dead is not None and m.cfg.kind == "topk":
        assert float(ref.auxk) > 0
        assert abs(float(got.auxk) - float(ref.auxk)) / float(ref.auxk) < auxk_tol, (
            float(got.auxk), float(ref.auxk))
    floor = iter_floor if m.cfg.encoder_steps else floor
    if x.is_cuda and name == "reference":
        # cuBLAS sums in another order than float64 does: a few near-tied pre-activations
        # pick another latent, which moves the weight gradient by ~1e-5 in cosine (seen on
        # an H200 at d 768, width 4096, k 32: 0.99998996).
        floor = min(floor, 0.9999)
    assert g_ref.keys() == g_got.keys()
    for key, g in g_ref.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g_got[key].double().flatten(), dim=0)
        assert cos > floor, (key, float(cos))
