"""Both op sets on CUDA against float64, and the fast path's kernels and CUDA graphs
(skipped without CUDA)."""

import copy

import numpy as np
import pytest
import torch
from opsets import OP_SETS, check_against_float64, model

from isae.analysis.isometry import delta_of_supports
from isae.gpu.ops import FastOps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [cuda, pytest.mark.gpu]


def _pair(arch, d, n, k, seed=0, ops=None):
    """A model on CUDA (the fast op set with graph replay unless ``ops``), random biases."""
    return model(arch, d, n, k, ops or FastOps(), seed=seed, device="cuda")


@pytest.mark.parametrize("ops", OP_SETS)
@pytest.mark.parametrize("arch", ["topk", "isae", "topk+signed", "isae-iter", "isae-iter+sg"])
@pytest.mark.parametrize("d,n,k", [(64, 512, 8), (96, 1000, 13), (768, 4096, 32)])
def test_op_sets_match_float64_forward_and_gradients(ops, arch, d, n, k):
    torch.manual_seed(d + n)
    m = _pair(arch, d, n, k, ops=OP_SETS[ops]())
    x = torch.randn(2048, d, device="cuda")
    dead = torch.rand(n, device="cuda") < 0.2
    check_against_float64(m, ops, x, dead)


def test_delta_by_squaring_matches_float64_svd():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24576, 768, generator=g)
    P, S = 3000, 64
    sizes = torch.randint(2, S + 1, (P,), generator=g)
    sup = torch.stack([torch.randperm(24576, generator=g)[:S] for _ in range(P)])
    got = delta_of_supports(W, sup, sizes, device="cuda").numpy()
    ref = delta_of_supports(W, sup, sizes).numpy()  # float64 eigvalsh on the CPU
    Wn = W.double() / W.double().norm(dim=1, keepdim=True)
    for p in range(0, P, 300):  # and the SVD itself on a subset
        s = np.linalg.svd(Wn[sup[p, : sizes[p]]].numpy(), compute_uv=False)
        assert abs(max(s[0] ** 2 - 1, 1 - s[-1] ** 2) - ref[p]) < 1e-10
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("ops", OP_SETS)
def test_training_on_cuda_keeps_unit_rows(ops):
    from isae.models.config import TrainConfig
    from isae.training.trainer import SAEStepper

    m = _pair("topk", 128, 1024, 16, ops=FastOps() if ops == "fast" else OP_SETS[ops]())
    st = SAEStepper(m, TrainConfig(lr=1e-3))
    assert (st.graphs is not None) == (ops == "fast")
    for _ in range(10):
        st.step(torch.randn(4096, 128, device="cuda"), 1.0, torch.rand(1024, device="cuda") < 0.3)
        np.testing.assert_allclose(m.W_dec.norm(dim=1).detach().cpu().numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n,dtype", [(24576, torch.bfloat16), (70000, torch.bfloat16), (5000, torch.float32)])
def test_triton_topk_equals_torch_topk(signed, n, dtype):
    from isae.gpu import kernels

    g = torch.Generator(device="cuda").manual_seed(n)
    pre = torch.randn(1024, n, device="cuda", generator=g).to(dtype)
    pre[:8] = 1.0  # all scores equal: every column a candidate (the kernel's slow path)
    for k in (1, 32, 100, 384):
        val, idx = kernels.topk_rows(pre, k, signed)
        s = pre.float().abs() if signed else pre.float().relu()
        got = s.gather(1, idx).sort(dim=1, descending=True).values
        assert torch.equal(got, s.topk(k, dim=-1).values)
        if k <= kernels.MAX_K:  # the kernel writes rows in index order; stock topk does not
            assert (idx.diff(dim=1) > 0).all()
        want = pre.float().gather(1, idx)
        assert torch.equal(val, want if signed else want.relu())


def test_triton_sparse_kernels_equal_float64():
    from isae.gpu import kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    B, N, D, K = 4096, 24576, 768, 32
    W = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    idx = torch.randint(0, N, (B, K), device="cuda", generator=g)
    idx[:, 0] = 7  # a latent in every row: its sum is split over work items
    val = torch.randn(B, K, device="cuda", generator=g)
    src = torch.randn(B, D, device="cuda", generator=g)
    ref = torch.einsum("bk,bkd->bd", val.double(), W.double()[idx])
    assert (kernels.gather_decode(val, idx, W).double() - ref).abs().max() < 1e-3
    ref = torch.einsum("bd,bkd->bk", src.double(), W.double()[idx])
    assert (kernels.gather_dot(src, idx, W).double() - ref).abs().max() < 1e-3
    ref = torch.zeros(N, D, device="cuda", dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (val.double()[..., None] * src.double()[:, None]).reshape(-1, D))
    assert (kernels.Segments(idx, N).reduce(val, src).double() - ref).abs().max() < 1e-3


def _dead_masks(n, steps, gen):
    """Dead masks whose counts revisit a few AuxK widths (and none dead), so graphs get
    recorded and replayed."""
    fracs = [0.0, 0.05, 0.05, 0.3, 0.05, 0.0, 0.3, 0.3, 0.05, 0.0, 0.05, 0.3]
    return [torch.rand(n, generator=gen, device="cuda") < fracs[s % len(fracs)] for s in range(steps)]


@pytest.mark.parametrize("arch", ["topk", "isae", "isae-iter", "isae-iter+sg"])
def test_graphed_steps_equal_eager_steps(arch):
    """The CUDA-graph replay (fixed AuxK widths) against eager fast steps (exact dead
    columns), from the same start on the same batches and schedule."""
    from isae.models.config import TrainConfig
    from isae.training.trainer import SAEStepper

    d, n, k, B, steps = 128, 4096, 16, 2048, 12
    gen = torch.Generator(device="cuda").manual_seed(7)
    xs = [torch.randn(B, d, generator=gen, device="cuda") for _ in range(steps)]
    deads = _dead_masks(n, steps, gen)
    runs = {}
    for use in (True, False):
        torch.manual_seed(4)  # _pair draws the biases from the global generator
        m = _pair(arch, d, n, k, seed=4, ops=FastOps(cuda_graphs=use))
        start = [p.detach().clone() for p in m.parameters()]
        st = SAEStepper(m, TrainConfig(lr=1e-3))
        assert (st.graphs is not None) == use
        logs = []
        for s in range(steps):
            o = st.step(xs[s], (s + 1) / steps, deads[s])
            logs.append((float(o["fvu"]), float(o["auxk"]), o["codes"].idx.clone()))
        runs[use] = (m, st, logs, start)
    (mg, stg, lg, p0), (me, _, le, _) = runs[True], runs[False]
    assert len(stg.graphs.graphs) == 3  # widths 0, 512 and 1536 were each replayed
    for s, (a, b) in enumerate(zip(lg, le)):
        # isae-iter's discrete support choices amplify summation-order differences (below)
        assert abs(a[0] - b[0]) <= (5e-3 if "iter" in arch else 2e-3) * b[0], (s, a[0], b[0])
        assert abs(a[1] - b[1]) <= 1e-2 * max(b[1], 1e-6), (s, a[1], b[1])  # AuxK: noisier
        ma = torch.zeros(B, n, device="cuda").scatter_(1, a[2], 1.0)
        mb = torch.zeros(B, n, device="cuda").scatter_(1, b[2], 1.0)
        assert float((ma * mb).sum() / mb.sum()) > 0.95, s  # same latents chosen
    # Summation order differs (sparse products, AuxK widths): compare the parameters'
    # displacement from their start rather than elementwise.
    # isae-iter's discrete support choices in each IHT step amplify those differences
    # (its FVU above still agrees step by step).
    tol = 0.15 if "iter" in arch else 0.02
    for (name, p), q, s0 in zip(mg.named_parameters(), me.parameters(), p0):
        moved = float((q.detach() - s0).norm())
        assert float((p.detach() - q.detach()).norm()) < tol * moved, name
    np.testing.assert_allclose(mg.W_dec.norm(dim=1).detach().cpu().numpy(), 1.0, atol=1e-5)


def test_graphed_stepper_resumes_like_an_uninterrupted_one():
    from isae.models.config import TrainConfig
    from isae.training.trainer import SAEStepper

    d, n, k, B = 64, 2048, 8, 1024
    gen = torch.Generator(device="cuda").manual_seed(3)
    xs = [torch.randn(B, d, generator=gen, device="cuda") for _ in range(10)]
    deads = _dead_masks(n, 10, gen)
    m = _pair("topk", d, n, k, seed=1)
    start = [p.detach().clone() for p in m.parameters()]
    st = SAEStepper(m, TrainConfig(lr=1e-3))
    for s in range(5):
        st.step(xs[s], 1.0, deads[s])
    saved = copy.deepcopy(st.state_dict())
    for s in range(5, 10):
        st.step(xs[s], 1.0, deads[s])
    m2 = _pair("topk", d, n, k, seed=99)
    st2 = SAEStepper(m2, TrainConfig(lr=1e-3))
    st2.load_state_dict(saved)
    for s in range(5, 10):
        st2.step(xs[s], 1.0, deads[s])
    for p, q, s0 in zip(m.parameters(), m2.parameters(), start):
        moved = float((p.detach() - s0).norm())
        assert float((p.detach() - q.detach()).norm()) < 0.02 * moved


def test_row_kernels_equal_float64():
    from isae.gpu import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(5000, 768, generator=g, device="cuda") * 3
    G = torch.randn(5000, 768, generator=g, device="cuda")
    Wn = W.double() / W.double().norm(dim=1, keepdim=True)
    low = torch.empty_like(W, dtype=torch.bfloat16)
    kernels.normalize_rows_(W, low)
    assert float((W.double() - Wn).abs().max()) < 1e-6
    assert torch.equal(low, W.bfloat16())  # rounded to nearest, as torch casts
    ref = G.double() - (G.double() * W.double()).sum(-1, keepdim=True) * W.double()
    kernels.project_rows_(G, W)
    assert float((G.double() - ref).abs().max()) < 1e-5


def test_recording_survives_garbage_steppers():
    """Recordings succeed while earlier steppers (with their graphs) lie around as cyclic
    garbage and the collector's threshold is 1, so that it would run at almost every
    allocation of a recording were it not switched off there. (This did not reproduce the
    intermittent recording failure seen once in gpu_bench's equivalence runs; see RESULTS.)"""
    import gc

    from isae.models.config import TrainConfig
    from isae.training.trainer import SAEStepper

    x = torch.randn(512, 32, device="cuda")
    dead = torch.zeros(256, dtype=torch.bool, device="cuda")
    old = gc.get_threshold()
    try:
        for arch in ("topk", "isae-iter", "topk", "isae-iter"):
            st = SAEStepper(_pair(arch, 32, 256, 4), TrainConfig(lr=1e-3))
            gc.set_threshold(1)
            for _ in range(3):  # eager, recorded, replayed
                out = st.step(x, 1.0, dead)
            gc.set_threshold(*old)
            assert len(st.graphs.graphs) == 1 and torch.isfinite(out["fvu"])
            del st  # a cycle (graphs -> bound method -> stepper): garbage, not freed
    finally:
        gc.set_threshold(*old)


def test_elementwise_kernels_equal_torch():
    """The small fused passes of a step: FVU's sums, its scaled backward, the encoder's
    shifted bf16 input, AuxK's masked gradient and top-k mask, the biased decode."""
    from isae.gpu import kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8192, 768, generator=g, device="cuda") + 3.0
    xh = torch.randn(8192, 768, generator=g, device="cuda")
    err, sse, tv = kernels.fvu_parts(x, xh)
    e64 = x.double() - xh.double()
    assert torch.equal(err, x - xh)
    assert abs(float(sse) / float(e64.pow(2).sum()) - 1) < 1e-5
    assert abs(float(tv) / float((x.double() - x.double().mean(0)).pow(2).sum()) - 1) < 1e-5
    num, den = torch.tensor(0.7, device="cuda"), torch.tensor(3.0, device="cuda")
    torch.testing.assert_close(kernels.scale(err, num, den, -2.0), err * (-2.0 * num / den))
    assert torch.equal(kernels.sub_cast(x, xh[0], torch.bfloat16), (x - xh[0]).bfloat16())
    z = torch.where(torch.rand(8192, 1536, generator=g, device="cuda") < 0.25,
                    torch.randn(8192, 1536, generator=g, device="cuda"), 0.0).bfloat16()
    gz = torch.randn(8192, 1536, generator=g, device="cuda").bfloat16()
    assert torch.equal(kernels.keep_where(gz, z), torch.where(z != 0, gz, 0.0))
    sub = torch.randn(8192, 1536, generator=g, device="cuda").bfloat16()
    valid = torch.arange(1536, device="cuda") < 1229
    for signed in (True, False):
        zk = kernels.topk_mask_rows(sub, 384, signed, valid)
        score = torch.where(valid, sub.float().abs() if signed else sub.float().relu(), -1.0)
        kth = score.topk(384, dim=1).values[:, -1:]
        kept = zk != 0
        assert not ((score > kth) & ~kept).any() and not (kept & (score < kth)).any()
        assert (kept.sum(1) <= 384).all() and not kept[:, 1229:].any()
    W = torch.randn(24576, 768, generator=g, device="cuda").bfloat16()
    idx = torch.randint(0, 24576, (8192, 32), generator=g, device="cuda")
    val = torch.randn(8192, 32, generator=g, device="cuda")
    b = torch.randn(768, generator=g, device="cuda")
    ref = (val.double()[..., None] * W.double()[idx]).sum(1) + b.double()
    assert float((kernels.gather_decode(val, idx, W, b).double() - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("d,n,k", [(384, 12288, 32), (768, 24576, 32)])
def test_stop_gradient_forward_agrees_with_the_differentiated_steps(d, n, k):
    """+sg's fused undifferentiated steps against isae-iter's on the same weights and rows:
    each half of a step equals its stock counterpart to rounding (tests/test_kernels.py),
    and whole steps agree except where bfloat16 near-ties in the correlation reorder."""
    torch.manual_seed(11)
    full, sg = (_pair(a, d, n, k) for a in ("isae-iter", "isae-iter+sg"))
    sg.load_state_dict(full.state_dict())
    x = torch.randn(4096, d, device="cuda")
    with torch.no_grad():
        a, b = full(x), sg(x)
    same = (a.codes.idx.sort(1).values == b.codes.idx.sort(1).values).all(1).float().mean()
    assert float(same) > 0.9, float(same)
    assert abs(float(a.fvu) - float(b.fvu)) < 2e-3 * float(a.fvu)
