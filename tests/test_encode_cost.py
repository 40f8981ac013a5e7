"""The encoder's cost per row: the matrix-product part against torch's own FLOP counter on
the reference encoders, the rest by hand."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from isae.analysis.reconstruction import encode_flops, encode_flops_parts
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder


@pytest.mark.parametrize("arch,steps", [("topk", 0), ("isae", 0), ("topk+iter1", 1),
                                        ("isae-iter", 3), ("isae+iter10", 10), ("dl", 0)])
@pytest.mark.parametrize("d,n,k", [(16, 64, 4), (24, 37, 5)])
def test_matrix_products_equal_torchs_count(arch, steps, d, n, k):
    model = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k))
    assert model.cfg.encoder_steps == steps
    x = torch.randn(50, d)
    with FlopCounterMode(display=False) as counter:
        model.encode(x)
    mm, _ = encode_flops_parts(model.cfg.kind, d, n, k, steps)
    assert counter.get_total_flops() == 50 * mm


def test_hand_counted_totals():
    # topk, d 4, n 10: one product 2*4*10 = 80.
    assert encode_flops("topk", 4, 10, 2) == 80
    # one step more: a second product (80) and three k-decodes (3*2*2*4 = 48), 6d + 4k = 32.
    assert encode_flops("topk", 4, 10, 2, encoder_steps=1) == 80 + 80 + 48 + 32
    # OMP, k 2: t=1: 80 + 2*1*4 + 8 + 8 = 104, rest 0 + 4; t=2: 80 + 32 + 16 + 16 = 144,
    # rest 5 + 4.
    assert encode_flops("dl", 4, 10, 2) == 104 + 4 + 144 + 9
    with pytest.raises(ValueError):
        encode_flops("nope", 4, 10, 2)
