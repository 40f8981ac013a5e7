"""The Triton kernels of kernels.py against stock torch, and both op sets against float64
with the kernels in place, run by Triton's interpreter on the CPU (a subprocess, since
TRITON_INTERPRET must be set before Triton compiles anything).

Skipped where Triton is not installed (it comes with the ``dev`` extra); on a GPU the same
kernels are compiled and checked by tests/test_fast_gpu.py.
"""

import subprocess
import textwrap

import pytest
from interpreted import run_interpreted

pytest.importorskip("triton")

CHECKS = textwrap.dedent('''
    import torch
    from isae.gpu import kernels as K

    assert K.usable(torch.zeros(1)), "interpret mode not active"
    g = torch.Generator().manual_seed(0)

    def check_topk(B, N, k, signed, dtype, levels=0):
        pre = torch.randn(B, N, generator=g)
        if levels:  # few distinct values: many ties at the k-th score
            pre = (pre * levels).round() / levels
        pre = pre.to(dtype)
        if not signed:
            pre[0, : N - 2] = -1.0  # fewer positive values than k: zeros fill the rest
        val, idx = K.topk_rows(pre, k, signed)
        s = pre.float().abs() if signed else pre.float().relu()
        ref = s.topk(k, dim=-1).values
        got = s.gather(1, idx).sort(dim=1, descending=True).values
        assert torch.equal(got, ref), (B, N, k, signed)
        want = pre.float().gather(1, idx)
        assert torch.equal(val, want if signed else want.relu())
        assert (idx.diff(dim=1) > 0).all(), "not in index order, or an index twice"

    check_topk(7, 300, 5, False, torch.bfloat16)   # ragged last group; row 0: the slow path
    check_topk(5, 3000, 13, True, torch.bfloat16)  # several chunks
    check_topk(3, 64, 64, True, torch.float32)     # k = N
    check_topk(4, 700, 9, True, torch.float32)     # 32-bit keys: the search's widest span
    check_topk(6, 500, 7, True, torch.bfloat16, levels=2)   # ties at the bound
    check_topk(4, 200, 1, False, torch.float32)    # k = 1
    ties = torch.zeros(2, 100, dtype=torch.bfloat16)
    ties[:, 10:20] = 1.0
    ties[1, 50] = 2.0
    v, i = K.topk_rows(ties, 4, False)
    assert i.tolist() == [[10, 11, 12, 13], [10, 11, 12, 50]], i  # ties: the lower index
    many = torch.ones(2, 5000)  # all equal: every column a candidate, over CAP
    v, i = K.topk_rows(many, 20, True)
    assert i.tolist() == [list(range(20))] * 2, i

    def check_hinted(B, N, k, signed, dtype, hint, levels=0):
        # topk_rows_hinted equals topk_rows exactly, for any hint: a close one (the fast
        # path), a loose one (more than HINT_CAP * k columns reach it: the group path), one
        # with repeated columns (no bound: the group path)
        pre = torch.randn(B, N, generator=g)
        if levels:
            pre = (pre * levels).round() / levels
        pre = pre.to(dtype)
        if not signed:
            pre[0, : N - 2] = -1.0
        if hint == "previous":  # the last support, moved by a small step: as in an IHT step
            h = K.topk_rows(pre, k, signed)[1]
            pre = (pre.float() + 0.05 * torch.randn(B, N, generator=g)).to(dtype)
        elif hint == "random":
            h = torch.rand(B, N, generator=g).argsort(1)[:, :k]
        elif hint == "smallest":  # the row's k smallest scores: every column reaches the bound
            s = pre.float().abs() if signed else pre.float().relu()
            h = s.argsort(1)[:, :k]
        else:
            h = torch.zeros(B, k, dtype=torch.int64)
        tally = torch.zeros(2, dtype=torch.int64)
        got, want = K.topk_rows_hinted(pre, k, signed, h, tally), K.topk_rows(pre, k, signed)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (B, N, k, hint)
        return tally.tolist()

    K.HINT_CAP = 16  # the hint on (off by default: not yet faster on a GPU)
    for hint in ("previous", "smallest", "random", "repeated"):
        for B, N, k, signed in ((6, 300, 5, True), (5, 3000, 13, False)):  # chunks
            rows, unhinted = check_hinted(B, N, k, signed, torch.bfloat16, hint)
            # a close hint serves every row but the unsigned set's row 0 (2 positive scores,
            # k zeros tie at the bound); the smallest scores serve none (every column is a
            # candidate, over the cap); any other hint: right, whichever way it went
            want = {"previous": int(not signed), "smallest": B}.get(hint, unhinted)
            assert rows == B and unhinted == want, (hint, signed, unhinted)
    check_hinted(4, 700, 9, True, torch.float32, "previous")
    check_hinted(6, 500, 7, True, torch.bfloat16, "previous", levels=2)  # ties at the bound
    check_hinted(3, 64, 64, False, torch.float32, "previous")  # k = N
    tie_hint = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 50]])
    got = K.topk_rows_hinted(ties, 4, False, tie_hint[[1, 0]])[1]  # the hint's bound is a tie
    assert got.tolist() == [[10, 11, 12, 13], [10, 11, 12, 50]], got
    try:
        K.topk_rows_hinted(ties, 4, False, tie_hint[:, :3])
        raise AssertionError("a hint of the wrong shape was accepted")
    except ValueError:
        pass

    B, N, D, k = 9, 50, 40, 5
    W = torch.randn(N, D, generator=g).bfloat16()
    idx = torch.randint(0, N, (B, k), generator=g)
    val = torch.randn(B, k, generator=g)
    ref = (val.double()[..., None] * W.double()[idx]).sum(1)
    assert (K.gather_decode(val, idx, W).double() - ref).abs().max() < 1e-5
    bias = torch.randn(D, generator=g)
    assert (K.gather_decode(val, idx, W, bias).double() - ref - bias.double()).abs().max() < 1e-5
    gr = torch.randn(B, D, generator=g)
    ref = (W.double()[idx] * gr.double()[:, None]).sum(-1)
    assert (K.gather_dot(gr, idx, W).double() - ref).abs().max() < 1e-5

    idx[:, 0] = 3  # one latent in every row
    src = torch.randn(B, D, generator=g)
    seg = K.Segments(idx, N)
    ref = torch.zeros(N, D, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (val.double()[..., None] * src.double()[:, None]).reshape(-1, D))
    assert (seg.reduce(val, src).double() - ref).abs().max() < 1e-5
    acc = torch.randn(N, D, generator=g)
    want = acc.double() + ref
    seg.reduce_into(acc, val, src)  # accumulates in place
    assert (acc.double() - want).abs().max() < 1e-5
    # latents past 16-bit keys (a stacked group's global indices): sorted as 32-bit ones
    wide = 40_000
    idx_w = idx * 800 + 7  # up to 39 207, every row still sharing latent 3 * 800 + 7
    seg = K.Segments(idx_w, wide)
    ref = torch.zeros(wide, D, dtype=torch.float64).index_add_(
        0, idx_w.reshape(-1), (val.double()[..., None] * src.double()[:, None]).reshape(-1, D))
    assert (seg.reduce(val, src).double() - ref).abs().max() < 1e-5

    def check_mask(B, C, k, signed, dtype):
        src = torch.randn(B, C, generator=g).to(dtype)
        valid = torch.rand(C, generator=g) < 0.5
        z = K.topk_mask_rows(src, k, signed, valid)
        score = torch.where(valid, src.float().abs() if signed else src.float().relu(), -1.0)
        kth = score.topk(k, dim=1).values[:, -1:]
        v = src if signed else src.relu()
        kept = z != 0
        assert z.dtype == dtype and torch.equal(z[kept], v[kept])
        assert (kept.sum(1) <= k).all() and (valid | ~kept).all()
        assert (score[kept.nonzero(as_tuple=True)] >= kth.expand_as(score)[kept]).all()
        missed = (score > kth) & ~kept  # every score above the k-th is kept
        assert not missed.any(), (B, C, k)

    check_mask(5, 300, 20, True, torch.bfloat16)   # one block
    check_mask(4, 5000, 37, False, torch.bfloat16)  # chunks
    check_mask(3, 100, 10, False, torch.float32)
    ties = torch.zeros(2, 50, dtype=torch.bfloat16)
    ties[:, 5:15] = 1.0
    z = K.topk_mask_rows(ties, 4, True, torch.ones(50, dtype=torch.bool))
    assert z.nonzero()[:, 1].tolist() == [5, 6, 7, 8] * 2, z.nonzero()  # ties: lower index

    xs = torch.randn(70, 77, generator=g) + 5.0  # an offset the variance must not see
    xh = torch.randn(70, 77, generator=g)
    err, sse, tv = K.fvu_parts(xs, xh)
    e64 = xs.double() - xh.double()
    assert (err.double() - e64).abs().max() < 1e-6
    assert abs(float(sse) / float(e64.pow(2).sum()) - 1) < 1e-6
    assert abs(float(tv) / float((xs.double() - xs.double().mean(0)).pow(2).sum()) - 1) < 1e-5
    sc = K.sub_cast(xs, xh[0], torch.bfloat16)
    ref = xs - xh[0]  # within one bfloat16 step (the interpreter truncates)
    assert sc.dtype == torch.bfloat16 and ((sc.float() - ref).abs() <= ref.abs() * 2.0**-7).all()
    zm = torch.where(torch.rand(70, 77, generator=g) < 0.3, xh, 0.0).bfloat16()
    assert torch.equal(K.keep_where(xs, zm), torch.where(zm != 0, xs, 0.0))
    two, three = torch.tensor(2.0), torch.tensor(3.0)
    assert (K.scale(xh, two, three, -2.0).double() - xh.double() * (-4.0 / 3.0)).abs().max() < 1e-6

    G, W = torch.randn(N, 77, generator=g), torch.randn(N, 77, generator=g)  # D not a power of 2
    W[3] = 0.0  # a zero row stays zero (the norm's floor)
    Wn = W.double() / W.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    ref = G.double() - (G.double() * Wn).sum(-1, keepdim=True) * Wn
    K.project_rows_(G, Wn.float())
    assert (G.double() - ref).abs().max() < 1e-5
    low = torch.empty(N, 77, dtype=torch.bfloat16)
    K.normalize_rows_(W, low)
    assert (W.double() - Wn).abs().max() < 1e-6
    # within one bfloat16 step (the interpreter truncates; the GPU test checks rounding)
    assert ((low.float() - W).abs() <= W.abs() * 2.0**-7).all()

    # The two halves of an undifferentiated IHT step against their stock-op fallback (the
    # maths of the differentiated step): a kept-old row and a kept-new row in each case.
    def fallback(fn, *a):
        K.AVAILABLE = False
        try:
            return fn(*a)
        finally:
            K.AVAILABLE = True

    # whole-row kernels (the first two) and the chunked ones (a [32, 1024] tile is too big)
    assert K.iht_row_fits(40, 5) and K.iht_row_fits(130, 32) and not K.iht_row_fits(600, 32)
    for B, N, D, k, signed, with_bias in ((9, 70, 40, 5, True, False), (7, 300, 130, 32, False, True),
                                          (5, 200, 600, 32, True, True)):
        W = torch.randn(N, D, generator=g)
        W = (W / W.norm(dim=1, keepdim=True)).bfloat16()
        x = torch.randn(B, D, generator=g)
        idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
        val = torch.randn(B, k, generator=g)
        val = val if signed else val.abs()
        bias = 0.1 * torch.randn(D, generator=g) if with_bias else None
        xh = K.gather_decode(val, idx, W, bias)
        step, rs = K.iht_eta(x, xh, idx, W, 0.9)
        step0, rs0 = fallback(K.iht_eta, x, xh, idx, W, 0.9)
        assert ((step - step0).abs() <= 1e-5 * step0.abs()).all()
        assert rs.dtype == torch.bfloat16 and ((rs.float() - rs0.float()).abs() <= rs0.float().abs() * 2.0**-7 + 1e-6).all()
        # the new support keeps half the old latents and draws the rest afresh
        fresh = [[c for c in torch.randperm(N, generator=g).tolist() if c not in r[: k // 2].tolist()]
                 for r in idx]
        new = torch.stack([torch.cat([r[: k // 2], torch.tensor(f[: k - k // 2])]) for r, f in zip(idx, fresh)])
        step0[0] = 1e3  # a step far too long: row 0 keeps its old codes
        got = K.iht_update(x, xh, val, idx, new, step0, W, bias, signed)
        want = fallback(K.iht_update, x, xh, val, idx, new, step0, W, bias, signed)
        assert torch.equal(got[1], want[1]), (got[1], want[1])
        assert (got[0] - want[0]).abs().max() < 1e-4 and (got[2] - want[2]).abs().max() < 1e-4
        kept_new = (want[1] == new).all(1)
        assert not kept_new[0] and kept_new.any(), kept_new
        # which rows took the new codes, and the differentiated step's backward from it
        kept = K.iht_update_kept(x, xh, val, idx, new, step0, W, bias, signed)[3]
        assert torch.equal(kept, fallback(K.iht_update_kept, x, xh, val, idx, new, step0, W,
                                          bias, signed)[3]) and torch.equal(kept, kept_new)
        step0[0] = 0.7  # a usable step for the gradients (the row still keeps its old codes)
        gv, gx = torch.randn(B, k, generator=g), torch.randn(B, D, generator=g)
        for a, c in ((gv, gx), (None, gx), (gv, None)):
            got = K.iht_grad(x, xh, val, idx, new, step0, kept, W, 0.9, signed, a, c)
            want = fallback(K.iht_grad, x, xh, val, idx, new, step0, kept, W, 0.9, signed, a, c)
            for u, v in zip(got, want):
                assert u.shape == v.shape and (u - v).abs().max() <= 1e-4 * (1 + v.abs().max()), (
                    (u - v).abs().max(), v.abs().max())
        if with_bias:  # a stacked group's: each block of rows its own bias
            gb = 0.1 * torch.randn(B, D, generator=g)[:1].repeat(2, 1)
            gb[1] += 0.05
            rows = B - B % 2
            args = (x[:rows], xh[:rows], val[:rows], idx[:rows], new[:rows], step0[:rows], W)
            got = K.iht_update(*args, gb, signed)
            want = fallback(K.iht_update, *args, gb, signed)
            assert torch.equal(got[1], want[1])
            assert (got[2] - want[2]).abs().max() < 1e-4

    # Whole models: here the fast op set runs the interpreted kernels (few rows: it is slow).
    from opsets import OP_SETS, check_against_float64
    from isae.models.config import SAEConfig
    from isae.models.sparse_coder import SparseCoder

    torch.manual_seed(0)
    x, dead = torch.randn(48, 16), torch.rand(130) < 0.3
    # The interpreter truncates iht_eta's bfloat16 scaled residual where torch and the GPU
    # round it (half its entries here): near-tied correlations reorder and a few rows take
    # another support, which moved this FVU by 3 % against float64. For the whole-model
    # check the scaled residual is torch's (iht_eta's kernel is checked above).
    real_eta = K.iht_eta
    K.iht_eta = lambda *a: fallback(real_eta, *a)
    for name, ops in OP_SETS.items():
        for arch in ("topk", "isae-iter"):
            cfg = SAEConfig.from_arch(arch, d_in=16, d_sae=130, k=4, seed=1)
            check_against_float64(SparseCoder(cfg, ops=ops()), name, x, dead)
    K.iht_eta = real_eta
    # +sg: its undifferentiated steps run the same forward kernels as the differentiated
    # ones (iht_eta, the correlation's top-k, iht_update): the same codes and FVU. The
    # gradients of +sg use no new kernel; tests/test_fast_cpu.py checks them against
    # float64.
    full = SparseCoder(SAEConfig.from_arch("isae-iter", d_in=16, d_sae=130, k=4, seed=1),
                       ops=OP_SETS["fast"]())
    sg = SparseCoder(SAEConfig.from_arch("isae-iter+sg", d_in=16, d_sae=130, k=4, seed=1),
                     ops=OP_SETS["fast"]())
    from isae.gpu import kernel_trace
    with torch.no_grad(), kernel_trace.hint_tally("cpu") as tally:
        a, b = full(x), sg(x)
    # each of the 2 x 3 thresholding steps selected its 48 rows from the previous support
    assert tally[0] == 2 * 3 * 48 and 0 <= tally[1] <= tally[0], tally
    K.HINT_CAP = 0
    with torch.no_grad(), kernel_trace.hint_tally("cpu") as tally:
        a2 = full(x)
    assert tally[0] == 0 and torch.equal(a2.codes.idx, a.codes.idx), "HINT_CAP 0: unhinted"
    assert torch.equal(a.codes.idx, b.codes.idx) and torch.equal(a.codes.val, b.codes.val)
    assert float(a.fvu) == float(b.fvu)
    print("kernels ok")
''')


def test_triton_kernels_in_interpreter():
    r = run_interpreted(["-c", CHECKS], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kernels ok" in r.stdout


GROUPED_CHECKS = textwrap.dedent('''
    import torch
    from isae.gpu import kernels as K
    from isae.models import reference

    assert K.usable(torch.zeros(1)), "interpret mode not active"
    g = torch.Generator().manual_seed(1)

    # A bias per block of rows (a stacked group: each model its own b_dec).
    G, R, N, D, k = 3, 5, 40, 24, 4
    W = torch.randn(G * N, D, generator=g).bfloat16()
    idx = torch.randint(0, G * N, (G * R, k), generator=g)
    val = torch.randn(G * R, k, generator=g)
    bias = torch.randn(G, D, generator=g)
    ref = (val.double()[..., None] * W.double()[idx]).sum(1) + bias.double().repeat_interleave(R, 0)
    assert (K.gather_decode(val, idx, W, bias).double() - ref).abs().max() < 1e-5

    # An AuxK mask per block of rows: each block as if alone with its own mask.
    src = torch.randn(G * R, 300, generator=g).bfloat16()
    valid = torch.rand(G, 300, generator=g) < 0.4
    for signed in (True, False):
        z = K.topk_mask_rows(src, 7, signed, valid)
        for b in range(G):
            zb = K.topk_mask_rows(src[b * R:(b + 1) * R], 7, signed, valid[b])
            assert torch.equal(z[b * R:(b + 1) * R], zb), (signed, b)

    # Segments whose source rows are shared by the blocks (models without a learned bias
    # encode the batch itself): row r of the codes reads src[r % R].
    src = torch.randn(R, D, generator=g)
    seg = K.Segments(idx, G * N)
    full = src.repeat(G, 1)
    ref = torch.zeros(G * N, D, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (val.double()[..., None] * full.double()[:, None]).reshape(-1, D))
    assert (seg.reduce(val, src).double() - ref).abs().max() < 1e-5
    assert (seg.reduce(val, full).double() - ref).abs().max() < 1e-5  # and unshared

    # Adam with a rate per model: the kernel against the reference formula.
    M = 3
    p, gr = torch.randn(M * 50, 7, generator=g), torch.randn(M * 50, 7, generator=g)
    m0, v0 = torch.randn(M * 50, 7, generator=g), torch.rand(M * 50, 7, generator=g)
    scal = reference.adam_scalars(torch.tensor([1.0, 4.0, 9.0]), torch.tensor([1e-3, 0.0, 3e-2]))
    want = [t.clone() for t in (p, m0, v0)]
    reference.adam_rows_(want[0], gr, want[1], want[2], *scal)
    K.adam_rows_(p, gr, m0, v0, *scal)
    for got, ref in zip((p, m0, v0), want):
        assert (got - ref).abs().max() < 1e-6

    # A stacked group on the kernels against each of its models alone on the single-model
    # kernels, within the fast path's tolerance of float64 (tests/opsets.py): the interpreter
    # truncates where sub_cast rounds on a GPU, so the two paths' bfloat16 inputs differ here.
    from isae.gpu.ops import FastOps
    from isae.gpu.stacked_ops import StackedFastOps
    from isae.models.config import SAEConfig
    from isae.models.sparse_coder import SparseCoder
    from isae.models.stacked import StackedCoder

    torch.manual_seed(0)
    x = torch.randn(24, 16)
    for arch in ("topk", "isae-tied", "isae-iter"):
        coders = [SparseCoder(SAEConfig.from_arch(arch, d_in=16, d_sae=70, k=3, seed=s),
                              ops=FastOps(cuda_graphs=False)) for s in (0, 1)]
        stacked = StackedCoder(coders, StackedFastOps(cuda_graphs=False))
        dead = torch.rand(2, 70) < 0.3
        o = stacked(x, dead)
        (o.fvu.sum() + o.auxk.sum() / 32).backward()
        for m, c in enumerate(coders):
            oc = c(x, dead[m])
            (oc.fvu + oc.auxk / 32).backward()
            assert abs(float(o.fvu[m]) / float(oc.fvu) - 1) < 0.02, (arch, m)
            assert abs(float(o.auxk[m]) / float(oc.auxk) - 1) < 0.03, (arch, m)
            for name, (P, cut) in stacked.member_params().items():
                ga, gb = cut(P.grad, m).flatten(), getattr(c, name).grad.flatten()
                cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0)
                assert cos > (0.9 if c.cfg.encoder_steps else 0.98), (arch, m, name, float(cos))
    print("grouped kernels ok")
''')


SWITCH_CHECKS = textwrap.dedent('''
    import torch
    from isae.gpu import kernel_trace
    from isae.gpu import kernels as K
    from isae.gpu.ops import FastOps
    from isae.gpu.stacked_ops import StackedFastOps
    from isae.models.compute import select_ops
    from isae.models.config import SAEConfig, TrainConfig, parse_arch
    from isae.models.sparse_coder import SparseCoder
    from isae.training.group import RunGroup
    from isae.training.steppers import Run, SAEStepper

    assert K.usable(torch.zeros(1)), "interpret mode not active"
    torch.manual_seed(0)
    names = []
    for mask in range(16):  # every combination of the four switches, from topk
        on = [s for i, s in enumerate(("signed", "tied", "nobias", "iter")) if mask >> i & 1]
        names.append("topk" + "".join("+" + s for s in on))
    names += ["isae", "isae-signed", "isae-tied", "isae-nobias", "isae-iter"]  # removals from isae
    ENCODE = {"_sub_cast_kernel", "_group_max_kernel", "_select_kernel", "_gather_decode_kernel",
              "_gather_dot_kernel", "_fvu_kernel", "_scale_kernel", kernel_trace.CSR,
              "_project_rows_kernel", "_normalize_rows_kernel"}
    AUXK = {"_topk_mask_kernel", "_keep_where_kernel"}
    IHT = {"_iht_eta_row_kernel", "_iht_update_row_kernel", "_iht_grad_row_kernel"}
    x, dead = torch.randn(8, 8), torch.rand(64) < 0.3
    tcfg = TrainConfig(lr=1e-3, batch_size=8, dead_tokens=8)
    runs = []
    for name in names:
        cfg = SAEConfig.from_arch(name, d_in=8, d_sae=64, k=2)
        ops = select_ops("cuda")  # what a CUDA run of this config gets: the fast op set...
        assert isinstance(ops, FastOps) and ops.cuda_graphs, name  # ...whatever the switches
        model = SparseCoder(cfg, ops=FastOps(cuda_graphs=False))  # on the CPU: no graphs
        with kernel_trace.trace() as t:
            SAEStepper(model, tcfg).step(x, 1.0, dead)
        launched = set(t.kernels())
        assert not t.fallbacks(), (name, t.fallbacks())
        steps = parse_arch(name).fields["encoder_steps"]
        want = ENCODE | AUXK | (IHT if steps else set())  # the fused steps' row kernels
        assert launched == want, (name, launched ^ want)
        assert t.kernels()["_select_kernel"] == 1 + steps, name  # each IHT step selects again
        print(name, dict(t.kernels()))
        runs.append(Run(cfg, tcfg, None, torch.device("cpu"), FastOps(cuda_graphs=False)))
    # every combination in one group, each its own part: the stacked kernels, no fallback
    group = RunGroup(runs, tcfg, torch.device("cpu"), StackedFastOps(cuda_graphs=False))
    assert len(group.parts) == 16
    group.step(x, 1.0)  # no dead latent yet
    with kernel_trace.trace() as t:
        group.step(x, 1.0)  # every latent unused so far is dead
    assert not t.fallbacks(), t.fallbacks()
    assert {"_adam_rows_kernel", "_topk_mask_kernel", "_select_kernel"} <= set(t.kernels())
    K.HINT_CAP = 16  # the steps' top-k bounded by their previous support: the hinted kernel
    with kernel_trace.trace() as t:
        group.step(x, 1.0)
    assert not t.fallbacks() and "_select_hinted_kernel" in t.kernels(), t.kernels()
    print("switches ok")
''')


def _interpret(script: str) -> subprocess.CompletedProcess:
    return run_interpreted(["-c", script], timeout=1200)


@pytest.mark.slow
def test_grouped_kernels_in_interpreter():
    """The kernels' grouped forms (a bias and an AuxK mask per block of rows, shared source
    rows, Adam with a rate per model) and a stacked group on them, against references."""
    r = _interpret(GROUPED_CHECKS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "grouped kernels ok" in r.stdout


@pytest.mark.slow
def test_every_switch_combination_runs_on_the_fast_kernels():
    """For each combination of signed / tied / nobias / iter (from topk, and removed from
    isae): a CUDA device gets the fast op set, and a training step launches the fast path's
    kernels with no fallback to stock torch (isae.gpu.kernel_trace); the same for all of
    them trained as one group."""
    r = _interpret(SWITCH_CHECKS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "switches ok" in r.stdout
