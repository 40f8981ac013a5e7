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


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1536, 12288, 70000])
def test_hinted_topk_equals_topk(signed, n, monkeypatch):
    """topk_rows_hinted, compiled, gives topk_rows's values and indices exactly: with the
    previous support of a slightly moved matrix (the hint serves most rows), a random hint
    (it serves none), and rows of equal scores."""
    from isae.gpu import kernels

    monkeypatch.setattr(kernels, "HINT_CAP", 16)  # on (off by default)

    g = torch.Generator(device="cuda").manual_seed(n)
    pre = torch.randn(2048, n, device="cuda", generator=g).bfloat16()
    for k in (1, 16, 32, 100):
        prev = kernels.topk_rows(pre, k, signed)[1]
        moved = (pre.float() + 0.05 * torch.randn(pre.shape, device="cuda", generator=g)).bfloat16()
        moved[:8] = 1.0
        rand = torch.rand(2048, n, device="cuda", generator=g).argsort(1)[:, :k]
        want = kernels.topk_rows(moved, k, signed)
        for hint, served in ((prev, 0.9), (rand, None)):
            tally = torch.zeros(2, dtype=torch.int64, device="cuda")
            got = kernels.topk_rows_hinted(moved, k, signed, hint, tally)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (k, served)
            rows, unhinted = tally.tolist()
            assert rows == 2048
            if served is not None:
                assert 1 - unhinted / rows >= served, (k, unhinted)


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


# ----------------------------------------------------------------------------- grouped training


def test_grouped_kernel_forms_on_cuda():
    """A bias and an AuxK mask per block of rows, source rows shared by the blocks, and
    Adam with a rate per model, against their references."""
    from isae.gpu import kernels
    from isae.models import reference

    g = torch.Generator(device="cuda").manual_seed(2)
    G, R, N, D, K = 3, 4096, 1536, 384, 16
    W = torch.randn(G * N, D, generator=g, device="cuda").bfloat16()
    idx = torch.randint(0, G * N, (G * R, K), generator=g, device="cuda")
    val = torch.randn(G * R, K, generator=g, device="cuda")
    bias = torch.randn(G, D, generator=g, device="cuda")
    ref = (val.double()[..., None] * W.double()[idx]).sum(1) + bias.double().repeat_interleave(R, 0)
    assert float((kernels.gather_decode(val, idx, W, bias).double() - ref).abs().max()) < 1e-3
    src = torch.randn(G * R, 700, generator=g, device="cuda").bfloat16()
    valid = torch.rand(G, 700, generator=g, device="cuda") < 0.4
    z = kernels.topk_mask_rows(src, 192, True, valid)
    for b in range(G):
        assert torch.equal(z[b * R:(b + 1) * R], kernels.topk_mask_rows(src[b * R:(b + 1) * R], 192,
                                                                          True, valid[b]))
    x = torch.randn(R, D, generator=g, device="cuda")
    ref = torch.zeros(G * N, D, device="cuda", dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (val.double()[..., None] * x.double().repeat(G, 1)[:, None]).reshape(-1, D))
    assert float((kernels.Segments(idx, G * N).reduce(val, x).double() - ref).abs().max()) < 1e-3
    p, gr = torch.randn(G * N, D, device="cuda"), torch.randn(G * N, D, device="cuda")
    m, v = torch.randn(G * N, D, device="cuda"), torch.rand(G * N, D, device="cuda")
    scal = reference.adam_scalars(torch.tensor([1.0, 5.0, 50.0], device="cuda"),
                                  torch.tensor([1e-3, 0.0, 3e-2], device="cuda"))
    old = [t.clone() for t in (p, m, v)]
    want = [t.clone() for t in (p, m, v)]
    reference.adam_rows_(want[0], gr, want[1], want[2], *scal)
    kernels.adam_rows_(p, gr, m, v, *scal)
    for a, b, o in zip((p, m, v), want, old):
        # One fused expression against torch's op-by-op rounding. Where the update nearly
        # cancels the old value, the result keeps the operands' rounding, not its own
        # (an H100: 2.5e-6 on a result of 0.07 from operands of order 1), so the bound is
        # relative to the operands: float32 rounds them to 6e-8, the bound allows 1e-5.
        scale = o.abs() + (b - o).abs()
        worst = float(((a - b).abs() / (scale + 1e-30)).max())
        assert worst < 1e-5, worst


@pytest.mark.parametrize("arch,aux_detach,aux_fit", [
    ("topk", False, False), ("isae", False, False), ("isae-tied", False, False),
    ("isae-iter", False, False), ("topk+tied+nobias", False, False), ("isae", True, False),
    ("isae-iter", True, False), ("isae-tied", False, True)])
@pytest.mark.parametrize("d,n,k", [(64, 512, 8), (384, 1536, 16)])
def test_stacked_fast_ops_equal_single_models_on_cuda(arch, aux_detach, aux_fit, d, n, k):
    """Three models stacked on the fast op set against each alone on it: loss, AuxK (a dead
    mask per model, one model with none) and gradients, to bfloat16 near-ties; with AuxK's
    codes detached too (gpu.yaml's tied coders from 16 x d), and with AuxK's decode fitted
    to the residual (auxk_fit)."""
    from isae.gpu.stacked_ops import StackedFastOps
    from isae.models.stacked import StackedCoder

    torch.manual_seed(n)
    singles = [_pair(arch, d, n, k, seed=s, ops=FastOps(cuda_graphs=False)) for s in range(3)]
    stacked = StackedCoder(singles, StackedFastOps(cuda_graphs=False))
    x = torch.randn(4096, d, device="cuda")
    dead = torch.rand(3, n, device="cuda") < torch.tensor([[0.0], [0.05], [0.4]], device="cuda")
    out = stacked(x, dead, aux_width=int(dead.sum(1).max()) + 100, aux_detach=aux_detach,
                  aux_fit=aux_fit)
    (out.fvu.sum() + out.auxk.sum() / 32).backward()
    assert out.auxk[0] == 0
    for m, c in enumerate(singles):
        o = c(x, dead[m] if dead[m].any() else None, aux_detach=aux_detach, aux_fit=aux_fit)
        (o.fvu + o.auxk / 32).backward()
        assert abs(float(out.fvu[m]) / float(o.fvu) - 1) < 2e-3, (m, float(out.fvu[m]), float(o.fvu))
        if m:
            assert abs(float(out.auxk[m]) / float(o.auxk) - 1) < 2e-2, (m, float(out.auxk[m]), float(o.auxk))
        for name, (P, cut) in stacked.member_params().items():
            ga, gb = cut(P.grad, m).flatten(), getattr(c, name).grad.flatten()
            cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0)
            # bfloat16 near-ties select other latents in a few rows (an H100: 0.994 for W_dec)
            assert cos > (0.98 if c.cfg.encoder_steps else 0.99), (m, name, float(cos))


def _group_runs(archs, seeds, d, n, k, tcfg):
    from isae.models.compute import select_ops
    from isae.models.config import SAEConfig
    from isae.training.steppers import Run

    return [Run(SAEConfig.from_arch(a, d_in=d, d_sae=n, k=k, seed=s), tcfg, None,
                 torch.device("cuda"), select_ops("cuda")) for a in archs for s in seeds]


def _force_dead(group, n: int) -> None:
    """The first n latents of every model of the group silent for ever, and the group's
    dead counts (which pick the next step's AuxK width) as its step would leave them."""
    for p in group.parts:
        p.since[:, :n] = 10**9
    group.n_dead = torch.cat([(p.since >= group.tcfg.dead_tokens).sum(1)
                              for p in group.parts]).tolist()


@pytest.mark.parametrize("streams", [True, False])
def test_graphed_group_steps_equal_eager_group_steps(streams):
    """A group's steps replayed as one CUDA graph per AuxK width (its parts on parallel
    streams, or one after another) against the same steps run eagerly."""
    from isae.gpu.stacked_ops import StackedFastOps
    from isae.models.config import TrainConfig
    from isae.training.group import RunGroup

    d, n, k, B, steps = 128, 1536, 16, 2048, 14
    gen = torch.Generator(device="cuda").manual_seed(9)
    xs = [torch.randn(B, d, generator=gen, device="cuda") for _ in range(steps)]
    tcfg = TrainConfig(lr=1e-3, batch_size=B, dead_tokens=2 * B)
    # Random data keeps every latent firing (an H100: none silent for 14 steps), so latents
    # are made dead by hand, the same in both runs: two AuxK widths besides none.
    forced = {4: 40, 9: 120}
    res = {}
    for use in (True, False):
        runs = _group_runs(["topk", "isae", "isae-iter"], (0, 1), d, n, k, tcfg)
        start = [[p.detach().clone() for p in r.model.parameters()] for r in runs]
        group = RunGroup(runs, tcfg, torch.device("cuda"), StackedFastOps(cuda_graphs=use, streams=streams))
        assert (group.graphs is not None) == use
        logs = {id(r): [] for r in runs}
        for s in range(steps):
            if s in forced:
                _force_dead(group, forced[s])
            deads = [(r.since_fired >= tcfg.dead_tokens).float().mean() for r in group.runs]
            metrics = group.step(xs[s], (s + 1) / steps)
            for j, r in enumerate(group.runs):
                logs[id(r)].append((float(metrics[j]["fvu"]), float(deads[j])))
        res[use] = (group.runs, start, group, logs)
    (rg, p0, gg, lg), (re_, _, _, le) = res[True], res[False]
    assert len(gg.graphs.graphs) >= 2  # no dead latent, then some: two widths at least
    for a, b, s0 in zip(rg, re_, p0):
        fa, da = np.array(lg[id(a)]).T
        fb, db = np.array(le[id(b)]).T
        np.testing.assert_allclose(fa, fb, rtol=5e-3 if a.cfg.encoder_steps else 2e-3)
        np.testing.assert_allclose(da, db, atol=0.01)
        tol = 0.15 if a.cfg.encoder_steps else 0.03
        for p, q, st in zip(a.model.parameters(), b.model.parameters(), s0):
            moved = float((q.detach() - st).norm())
            assert float((p.detach() - q.detach()).norm()) < tol * moved
        np.testing.assert_allclose(a.model.W_dec.norm(dim=1).detach().cpu().numpy(), 1.0, atol=1e-5)


def test_grouped_training_follows_one_by_one_training_on_cuda(synthetic_set, tmp_path):
    """train_many on the GPU, grouped (the default there) and one by one: no systematic
    difference (the mean relative difference of the final training FVU over the 8 runs
    within 2 %) and no run far off (each within 12 %); isae-iter's runs within 30 %. The two
    follow the same batches but not the same bfloat16 near-ties, so their paths part like
    two runs of one path do (a GPU is not bitwise reproducible: benchmarks/rerun_spread.py).
    On this toy set (300 steps) isae-iter parts most: H100s saw 2.9 %, 6.2 % and 12.2 % for
    one of its runs with the unfused steps, 9.3 %, 13.4 % and 19.5 % with the fused ones
    (results-gpu/kernels-seventeenth/5-grouped-spread.md), so its runs are kept out of the
    mean and held to 30 % only: a wrong stacked gradient shows in tests/test_group.py
    (stacked against single, to 1e-5 in FVU), and benchmarks/group_bench.py's check holds
    the study's shape, isae-iter's included, to 2 % per run (0.19 % seen)."""
    from isae.models.config import SAEConfig, TrainConfig
    from isae.training.trainer import train_many

    cfgs = [SAEConfig.from_arch(a, d_in=32, d_sae=256, k=4, seed=s)
            for a in ("topk", "isae", "isae-iter", "isae-tied") for s in (0, 1)]
    tcfg = TrainConfig(tokens=300 * 512, batch_size=512, device="cuda", dead_tokens=20_000)
    done = {}
    for grouped in (True, False):
        outs = [tmp_path / str(grouped) / f"{c.arch}-{c.seed}" for c in cfgs]
        done[grouped] = train_many(synthetic_set, cfgs, tcfg, outs, resume=False, grouped=grouped)
    rel = [a["fvu"] / b["fvu"] - 1 for a, b in zip(done[True], done[False])]
    print("relative FVU difference, grouped / one by one - 1:", [round(r, 4) for r in rel])
    steady = [r for r, a in zip(rel, done[True]) if a["arch"] != "isae-iter"]
    assert abs(float(np.mean(steady))) < 0.02, rel
    for r, a in zip(rel, done[True]):
        assert abs(r) < (0.3 if a["arch"] == "isae-iter" else 0.12), (a["arch"], a["seed"], r)


SWITCH_ARCHS = ["topk" + "".join("+" + s for i, s in enumerate(("signed", "tied", "nobias", "iter"))
                                 if mask >> i & 1) for mask in range(16)]


@pytest.mark.parametrize("arch", SWITCH_ARCHS + ["isae-signed", "isae-tied", "isae-nobias"])
def test_every_switch_combination_runs_on_the_fast_path_on_cuda(arch):
    """Each combination of the switches gets the fast op set, a CUDA graph, and launches the
    fast kernels with no fallback to stock torch (isae.gpu.kernel_trace)."""
    from isae.gpu import kernel_trace
    from isae.models.compute import select_ops
    from isae.models.config import SAEConfig, TrainConfig
    from isae.models.sparse_coder import SparseCoder
    from isae.training.trainer import SAEStepper

    m = SparseCoder(SAEConfig.from_arch(arch, d_in=384, d_sae=12288, k=16), device="cuda",
                    ops=select_ops("cuda"))
    st = SAEStepper(m, TrainConfig(lr=1e-3))
    assert m.ops.name == "fast" and st.graphs is not None
    x = torch.randn(4096, 384, device="cuda")
    dead = torch.rand(12288, device="cuda") < 0.05
    with kernel_trace.trace() as t:
        st.step(x, 1.0, dead)  # the eager first step of its width
    assert not t.fallbacks(), t.fallbacks()
    assert {"_select_kernel", "_topk_mask_kernel", "_gather_decode_kernel", kernel_trace.CSR,
            "_fvu_kernel", "_normalize_rows_kernel"} <= set(t.kernels())
    if "iter" in arch:  # the fused differentiated step, forward and backward
        assert {"_iht_eta_row_kernel", "_iht_update_row_kernel",
                "_iht_grad_row_kernel"} <= set(t.kernels())
    for _ in range(2):  # recorded, replayed
        out = st.step(x, 1.0, dead)
    assert len(st.graphs.graphs) == 1 and torch.isfinite(out["fvu"])


def test_a_group_step_runs_on_the_fast_kernels_on_cuda():
    """A group of every switch combination and the two +sg presets (each its own stacked
    part, two seeds each): the eager first step of a width launches the fast kernels (the
    IHT row kernels for +sg), none falls back to stock torch; the recorded and replayed
    steps then run (finite losses)."""
    from isae.gpu import kernel_trace
    from isae.models.config import TrainConfig
    from isae.training.group import RunGroup

    tcfg = TrainConfig(lr=1e-3, batch_size=4096, dead_tokens=4096)
    runs = _group_runs(SWITCH_ARCHS + ["topk+iter+sg", "isae-iter+sg"], (0, 1), 384, 1536, 16,
                       tcfg)
    group = RunGroup(runs, tcfg, torch.device("cuda"))
    assert len(group.parts) == 18 and group.graphs is not None
    x = torch.randn(4096, 384, device="cuda")
    group.step(x, 1.0)  # no dead latent: width 0, eager
    _force_dead(group, 100)  # every latent fired on the first batch: make some dead
    with kernel_trace.trace() as t:
        group.step(x, 1.0)  # dead latents now: a new width, eager
    assert not t.fallbacks(), t.fallbacks()
    assert {"_adam_rows_kernel", "_topk_mask_kernel", "_select_kernel", kernel_trace.CSR,
            "_iht_eta_row_kernel", "_iht_update_row_kernel", "_iht_grad_row_kernel"
            } <= set(t.kernels())
    for _ in range(3):  # recorded, replayed
        _force_dead(group, 100)
        metrics = group.step(x, 1.0)
    assert all(np.isfinite(float(m["loss"])) for m in metrics.values()) and len(group.graphs.graphs) >= 1
