"""One GPU run that measures every line of the speed issue, ours and the anchors side by side.

    PYTHONPATH=src python benchmarks/gpu_bench.py [--out results.json] [--quick]
    PYTHONPATH=src python benchmarks/gpu_bench.py --only seeds,iter --data-on-device never --set DIR
    PYTHONPATH=src python benchmarks/gpu_bench.py --only seeds,iter --device cpu --d 64 --width 512 --k 8 --batch 256 --seed-rows 40000 --seed-tokens 50000

Shapes (the issue's): d = 768, width 24 576, k = 32, batch 8 192 rows, float32 parameters.
``seeds`` trains 3 seeds one after another and then sharing one pass, end to end from a
float16 set of ~1 M training rows it writes itself (or finds at ``--set``), each run with
its peak device memory; ``--data-on-device never`` gives the streaming path of before.
``iter`` takes the ``isae-iter`` step apart (phases by the wall clock between device syncs,
kernel time by kind from the profiler). Those two also run on the CPU at small shapes.
Each section is independent; a failing one prints its error and the rest still run. The
table is printed last. EleutherAI sparsify (the `eai-sparsify` wheel) is imported module by
module, without its package __init__ (which pulls in its trainer and datasets).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from bench_set import sections

from isae.gpu import cuda_graphs as graphs
from isae.gpu.ops import FastOps
from isae.models.compute import select_ops
from isae.models.config import SAEConfig, TrainConfig
from isae.models.reference import REFERENCE
from isae.models.sparse_coder import SparseCoder
from isae.training.trainer import SAEStepper

D, N, K, B = 768, 24576, 32, 8192
#: The device of the sections that can run elsewhere (seeds, iter: ``--device cpu`` checks
#: them end to end at small shapes); the others need CUDA.
DEV = "cuda"
ROWS: list[dict] = []


def row(what: str, ms: float | None = None, rate: str = "", note: str = "", **extra) -> None:
    """One result. ``extra`` (key, tok_s, peak_gb, ...) goes to the JSON file only, for
    benchmarks/session_table.py."""
    ROWS.append({"what": what, "ms": ms, "rate": rate, "note": note, **extra})
    print(f"  {what}: {'' if ms is None else f'{ms:.3f} ms'} {rate} {note}", flush=True)


def dsync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))


def per_step(fn, warmup: int = 5, reps: int = 30) -> float:
    """Milliseconds per call of fn() called back to back (as a training loop does), by the
    wall clock between two device syncs: launch overhead and host syncs count."""
    for _ in range(warmup):
        fn()
    dsync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    dsync()
    return (time.perf_counter() - t0) * 1e3 / reps


section = sections(lambda name, e: row(name, note=f"FAILED: {type(e).__name__}: {e}"[:200]))


def synthetic_batches(d: int, n_true: int, k_true: int, seed: int):
    """Signed sparse rows of a hidden dictionary, generated on the GPU (endless)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    Dt = torch.randn(n_true, d, device="cuda", generator=g)
    Dt /= Dt.norm(dim=1, keepdim=True)
    while True:
        idx = torch.randint(0, n_true, (B, k_true), device="cuda", generator=g)
        val = (torch.rand(B, k_true, device="cuda", generator=g) + 0.5) * torch.sign(
            torch.randn(B, k_true, device="cuda", generator=g))
        x = torch.einsum("bk,bkd->bd", val, Dt[idx]) + 0.05 * torch.randn(B, d, device="cuda", generator=g)
        yield x / x.norm(dim=1, keepdim=True).mean() * d**0.5


def load_sparsify():
    import site

    for base in [*site.getsitepackages(), *sys.path]:
        p = Path(base) / "sparsify"
        if (p / "sparse_coder.py").is_file():
            pkg = types.ModuleType("sparsify")
            pkg.__path__ = [str(p)]
            sys.modules["sparsify"] = pkg
            cfg = importlib.import_module("sparsify.config")
            sc = importlib.import_module("sparsify.sparse_coder")
            return cfg, sc
    raise ImportError("sparsify (eai-sparsify) not found")


@section("anchors: encoder matmul")
def anchors():
    x = torch.randn(B, D, device="cuda")
    W = torch.randn(D, N, device="cuda")
    xb, Wb = x.bfloat16(), W.bfloat16()
    ms = timed(lambda: xb @ Wb)
    row("encoder matmul, bf16", ms, f"{2 * B * D * N / ms / 1e9:.0f} TFLOP/s, {B / ms / 1e3:.1f} M tok/s")
    torch.backends.cuda.matmul.allow_tf32 = True
    ms = timed(lambda: x @ W)
    torch.backends.cuda.matmul.allow_tf32 = False
    row("encoder matmul, TF32", ms, f"{B / ms / 1e3:.1f} M tok/s")
    pre = xb @ Wb
    row("topk on bf16 pre-acts (stock torch)", timed(lambda: pre.topk(K, dim=-1, sorted=False)))


@section("kernels: ours vs stock torch")
def kernel_bench():
    import triton

    from isae.gpu import kernels

    row("triton version", note=triton.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    pre = (torch.randn(B, D, device="cuda", generator=g).bfloat16()
           @ torch.randn(D, N, device="cuda", generator=g).bfloat16())
    ref = pre.float().abs().topk(K, dim=-1).values
    ms = timed(lambda: kernels.topk_rows(pre, K, True))
    v, i = kernels.topk_rows(pre, K, True)
    ok = torch.equal(pre.float().abs().gather(1, i).sort(1, descending=True).values, ref)
    row("ours top-k (|.|)", ms, note=f"equal to torch: {ok}")
    G = N // kernels.GROUP
    gm = torch.rand(B, G, device="cuda")
    row("  of which: stock topk of the group maxima", timed(lambda: gm.topk(K, dim=1, sorted=False)))
    row("stock torch topk (|.|)", timed(lambda: pre.abs().topk(K, dim=-1, sorted=False)))
    row("ours top-k (ReLU)", timed(lambda: kernels.topk_rows(pre, K, False)))
    row("stock torch topk (ReLU)", timed(lambda: pre.topk(K, dim=-1, sorted=False)))
    sub = pre[:, :1229].contiguous()
    row("ours top-384 of 1229 dead columns (AuxK)", timed(lambda: kernels.topk_rows(sub, 384, False)))
    row("stock topk 384 of 1229", timed(lambda: sub.topk(384, dim=-1, sorted=False)))
    v, i = kernels.topk_rows(pre, K, False)
    W = torch.randn(N, D, device="cuda", generator=g)
    Wb = W.bfloat16()
    gr = torch.randn(B, D, device="cuda", generator=g)
    row("ours gather_decode (bf16 table)", timed(lambda: kernels.gather_decode(v, i, Wb)))
    row("stock embedding_bag (fp32 table)",
        timed(lambda: torch.nn.functional.embedding_bag(i, W, per_sample_weights=v, mode="sum")))
    out = torch.empty(B, D, device="cuda")
    vf, ic = v.float().contiguous(), i.contiguous()
    for bd, nw in ((256, 4), (256, 8), (512, 8), (1024, 8), (1024, 16)):  # launch settings
        def variant(bd=bd, nw=nw):
            kernels._gather_decode_kernel[(B,)](vf, ic, Wb, out, out, D, K=K, KP=K, BLOCK_D=bd,
                                                BIAS=False, num_warps=nw)
        row(f"  gather_decode with BLOCK_D {bd}, {nw} warps", timed(variant))
    row("ours gather_dot (bf16 table)", timed(lambda: kernels.gather_dot(gr, i, Wb)))
    Wd, G = torch.randn(N, D, device="cuda"), torch.randn(N, D, device="cuda")
    lowb = torch.empty(N, D, dtype=torch.bfloat16, device="cuda")
    row("ours decoder rows: normalise + bf16 copy", timed(lambda: kernels.normalize_rows_(Wd, lowb)))
    row("stock: normalise, then bf16 cast",
        timed(lambda: (Wd.div_(Wd.norm(dim=1, keepdim=True).clamp_min(1e-12)), lowb.copy_(Wd))))
    row("ours decoder gradient: project out the rows", timed(lambda: kernels.project_rows_(G, Wd)))
    row("stock: project out the rows", timed(lambda: G.sub_((G * Wd).sum(-1, keepdim=True) * Wd)))
    row("ours Segments (sort + CSR row offsets)", timed(lambda: kernels.Segments(i, N)))
    flat = i.reshape(-1).to(torch.int32)
    row("  of which: torch.sort of B*k int32", timed(lambda: torch.sort(flat)))
    seg = kernels.Segments(i, N)
    xb = gr.bfloat16()
    ref = torch.zeros(N, D, device="cuda").index_add_(0, i.reshape(-1), (v[..., None] * xb.float()[:, None]).reshape(-1, D))
    err = float((seg.reduce(v, xb) - ref).abs().max())
    row("segmented dW (CSR SpMM)", timed(lambda: seg.reduce(v, xb)), note=f"max |diff| {err:.1e}")
    row("index_add_ dW (stock)", timed(lambda: torch.zeros(N, D, device="cuda").index_add_(
        0, i.reshape(-1), (v[..., None] * xb.float()[:, None]).reshape(-1, D))))

    def dense():
        Z = torch.zeros(B, N, dtype=torch.bfloat16, device="cuda").scatter_(1, i, v.bfloat16())
        return Z.T @ xb
    row("dense dW (scatter + bf16 matmul), the v3 path", timed(dense))


@section("sparsify training step")
def sparsify_step():
    cfgmod, sc = load_sparsify()
    cfg = cfgmod.SparseCoderConfig(num_latents=N, k=K)
    sae = sc.SparseCoder(D, cfg, device="cuda")
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True)
    x = torch.randn(B, D, device="cuda")
    dead = torch.rand(N, device="cuda") < 0.05

    def step():
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    ms = per_step(step)
    row("sparsify 1.3.3 step (fwd, FVU+AuxK, bwd, Adam)", ms, f"{B / ms / 1e3:.2f} M tok/s")
    return ms


def our_stepper(arch: str, seed: int = 0, ops=None):
    """A model and its stepper on DEV, on ``ops`` (default: what training would choose)."""
    m = SparseCoder(SAEConfig.from_arch(arch, d_in=D, d_sae=N, k=K, seed=seed), device=DEV,
                    ops=ops or select_ops(DEV))
    return m, SAEStepper(m, TrainConfig(lr=2e-4))  # fused Adam on CUDA, as in training


@section("our training steps")
def our_steps():
    x = torch.randn(B, D, device="cuda")
    dead = torch.rand(N, device="cuda") < 0.05
    out = {}
    for arch in ("topk", "isae", "isae-iter"):
        for use_graphs in (True, False):
            m, st = our_stepper(arch, ops=FastOps(cuda_graphs=use_graphs))
            ms = per_step(lambda st=st: st.step(x, 1.0, dead))
            how = "CUDA graph" if use_graphs else "eager launches"
            if use_graphs:
                out[arch] = ms
            row(f"ours {arch} step (fast path, {how})", ms, f"{B / ms / 1e3:.2f} M tok/s")
            del m, st
    m, st = our_stepper("topk", ops=REFERENCE)
    ms = per_step(lambda: st.step(x, 1.0, dead), warmup=2, reps=5)
    row("ours topk step, float32 reference path", ms, f"{B / ms / 1e3:.2f} M tok/s")
    return out


@section("equivalence: fast vs float32 reference after a fixed budget")
def equivalence(steps: int):
    for arch in ("topk", "isae", "isae-iter"):
        fvus = {}
        for flag in (True, False):
            m, st = our_stepper(arch, seed=0, ops=FastOps() if flag else REFERENCE)
            data = synthetic_batches(D, 4 * N, 16, seed=1)
            dead_since = torch.zeros(N, device="cuda", dtype=torch.long)
            for s in range(steps):
                x = next(data)
                o = st.step(x, min(1.0, (s + 1) / 20), dead_since >= 20 * B)
                fired = torch.zeros(N, dtype=torch.bool, device="cuda")
                fired[o["codes"].idx] = True
                dead_since += B
                dead_since[fired] = 0
            with torch.no_grad():  # held-out FVU on fresh rows, reference encoder for both
                m.ops = REFERENCE
                xs = torch.cat([next(data) for _ in range(2)])
                fv = float(m(xs).fvu)
            norms = m.W_dec.norm(dim=1)
            fvus[flag] = (fv, float((norms - 1).abs().max()))
        rel = abs(fvus[True][0] - fvus[False][0]) / fvus[False][0]
        row(f"equivalence {arch}: FVU fast / reference after {steps * B / 1e6:.1f}M tok",
            note=f"{fvus[True][0]:.4f} / {fvus[False][0]:.4f} (rel diff {rel:.2%}, target < 1%); "
                 f"max | ||d_i|| - 1 | {fvus[True][1]:.1e}")


@section("seeds one after another vs sharing one pass (end to end, from disk)")
def seeds_parallel(set_dir: str | None, rows: int, tokens: int, buffer: int, n_seeds: int = 3,
                   mode: str = "auto"):
    from bench_set import Peak, ensure_set

    from isae.training.trainer import train, train_many

    tmp = Path(tempfile.mkdtemp())
    acts = ensure_set(Path(set_dir) if set_dir else tmp / "acts", rows, D, 4 * N, B, DEV)
    tcfg = TrainConfig(tokens=tokens, batch_size=B, device=DEV, shuffle_buffer=buffer,
                       checkpoint_every=10**9, log_every=50, data_on_device=mode)
    cfgs = [SAEConfig.from_arch("topk", d_in=D, d_sae=N, k=K, seed=s) for s in range(n_seeds)]
    # Compile the kernels and warm the caches outside the timing, so neither way pays them
    # (both ways still pay their own loads, graph recordings and checkpoints).
    warm = TrainConfig(tokens=20 * B, batch_size=B, device=DEV, shuffle_buffer=buffer,
                       checkpoint_every=10**9, log_every=50, data_on_device=mode)
    train_many(acts.path, cfgs[:2], warm, [tmp / "warm0", tmp / "warm1"], resume=False)
    steps_tokens = -(-tokens // B) * B
    seq = 0.0
    singles = []  # per run: (loop rate, wall, peak GB, batches)
    for c in cfgs:
        t0 = time.perf_counter()
        with Peak(DEV) as p:
            s = train(acts.path, c, tcfg, tmp / f"seq{c.seed}", resume=False)
        wall = time.perf_counter() - t0
        seq += wall
        singles.append((s["tokens_per_s"], wall, p.gb, s["batches"]))
    t0 = time.perf_counter()
    with Peak(DEV) as p:
        shared = train_many(acts.path, cfgs, tcfg, [tmp / f"par{c.seed}" for c in cfgs], resume=False)
    par = time.perf_counter() - t0
    total = n_seeds * steps_tokens
    loop1 = float(np.mean([r[0] for r in singles]))
    # Time each single run spent outside its loop (loading, setup, checkpoint): what a shared
    # pass pays once instead of n times.
    outside = float(np.mean([w - steps_tokens / r for r, w, _, _ in singles]))
    peaks = [r[2] for r in singles]
    peak_note = "" if peaks[0] is None else f"; peak per run {', '.join(f'{g:.2f}' for g in peaks)} GB"
    row(f"{n_seeds} seeds one after another ({mode}: batches from the {singles[0][3]})", seq * 1e3,
        f"{total / seq / 1e6:.2f} M tok/s",
        f"loop alone {loop1 / 1e6:.2f} M tok/s per seed; {outside:.2f} s per run outside the loop{peak_note}",
        key="seeds_seq", tok_s=total / seq, wall_s=seq, peak_gb=max(peaks) if peaks[0] is not None else None,
        loop_tok_s=loop1, outside_s=outside, mode=mode)
    row(f"{n_seeds} seeds sharing one pass ({mode}: batches from the {shared[0]['batches']})", par * 1e3,
        f"{total / par / 1e6:.2f} M tok/s",
        f"loop alone {shared[0]['tokens_per_s'] / 1e6:.2f} M tok/s (all seeds)"
        + ("" if p.gb is None else f"; peak {p.gb:.2f} GB"),
        key="seeds_shared", tok_s=total / par, wall_s=par, peak_gb=p.gb,
        loop_tok_s=shared[0]["tokens_per_s"], mode=mode)
    if DEV == "cuda":  # the same pass with each seed's steps on its own CUDA stream (opt-in)
        from isae.training import trainer

        trainer.SEED_STREAMS = True
        try:
            t0 = time.perf_counter()
            with Peak(DEV) as p2:
                over = train_many(acts.path, cfgs, tcfg, [tmp / f"str{c.seed}" for c in cfgs], resume=False)
            t_over = time.perf_counter() - t0
        finally:
            trainer.SEED_STREAMS = False
        # Same seeds, same batches: the final FVUs should agree up to the GPU's own
        # run-to-run differences (atomic sums).
        dfvu = max(abs(a["fvu"] - b["fvu"]) / b["fvu"] for a, b in zip(over, shared))
        row(f"{n_seeds} seeds sharing one pass, one CUDA stream per seed (ISAE_SEED_STREAMS=1)",
            t_over * 1e3, f"{total / t_over / 1e6:.2f} M tok/s",
            f"speed-up {seq / t_over:.2f}x; loop alone {over[0]['tokens_per_s'] / 1e6:.2f} M tok/s; "
            f"final FVU vs one stream: max rel diff {dfvu:.1e}; peak {p2.gb:.2f} GB",
            key="seeds_streams", tok_s=total / t_over, wall_s=t_over, peak_gb=p2.gb,
            loop_tok_s=over[0]["tokens_per_s"], fvu_rel_diff=dfvu, mode=mode)
    # If the shared pass ran each model's step at the single seed's loop rate and paid the
    # per-run costs once, its speed-up would be this: the most sharing can give unless the
    # models' steps overlap on the device.
    bound = seq / (total / loop1 + outside)
    row(f"speed-up of sharing ({mode})", note=f"{seq / par:.2f}x (target >= 3x); "
        f"{bound:.2f}x if the steps ran back to back at one seed's loop rate and the per-run "
        f"costs were paid once", key="seeds_ratio", ratio=seq / par, bound=bound, mode=mode)


@section("isae-iter: step rate and where its time goes")
def iter_breakdown(arch: str = "isae-iter"):
    """The graphed step's rate (CUDA), then an eager step taken apart: forward, backward and
    the update (project, Adam, normalise), each also with the IHT steps switched off
    (encoder_steps 0 on the same model), so the difference is what the IHT steps cost; and
    the profiler's kernel time by kind."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(B, D, device=DEV, generator=g)
    dead = torch.rand(N, device=DEV, generator=g) < 0.05
    width = graphs.aux_bucket(int(dead.sum()), N)  # AuxK's width as a graph has it
    for a in ("topk", arch):
        m, st = our_stepper(a)
        ms = per_step(lambda st=st: st.step(x, 1.0, dead))
        how = "CUDA graph" if st.graphs is not None else "eager"
        row(f"{a} step ({how})", ms, f"{B / ms / 1e3:.2f} M tok/s", key=f"step_{a}", tok_s=B / ms * 1e3)
        del m, st
    # eager: the phases are timed one by one (the CPU's op set never replays graphs)
    m, st = our_stepper(arch, ops=FastOps(cuda_graphs=False) if DEV == "cuda" else None)
    reps = 20 if DEV == "cuda" else 3

    def phases(steps: int) -> dict[str, float]:
        m.cfg.encoder_steps = steps
        t = {"forward": 0.0, "backward": 0.0, "update": 0.0}
        for i in range(reps + 2):
            dsync()
            t0 = time.perf_counter()
            out = m(x, dead=dead, aux_width=width if DEV == "cuda" else None)
            loss = m.loss(x, out, st.tcfg.auxk_alpha)  # +sg: its amortised term too
            dsync()
            t1 = time.perf_counter()
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            dsync()
            t2 = time.perf_counter()
            m.project_decoder_grad()
            st.opt.step()
            m.normalize_decoder()
            dsync()
            t3 = time.perf_counter()
            if i >= 2:  # the first two compile and allocate
                for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2)):
                    t[k] += dt * 1e3 / reps
        return t

    steps = m.cfg.encoder_steps
    full, base = phases(steps), phases(0)
    m.cfg.encoder_steps = steps
    total = sum(full.values())
    row(f"{arch} eager step, phases (syncs between them)", total, f"{B / total / 1e3:.2f} M tok/s",
        "; ".join(f"{k} {v:.2f} ms" for k, v in full.items()), key="iter_phases",
        phases_ms=full, phases_no_iht_ms=base)
    row(f"  of which the {steps} IHT steps", sum(full.values()) - sum(base.values()),
        note=f"forward {full['forward'] - base['forward']:.2f} ms, backward "
             f"{full['backward'] - base['backward']:.2f} ms (the same model with encoder_steps 0: "
             f"{sum(base.values()):.2f} ms a step)")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            st._body(x, dead, width if DEV == "cuda" else None)
        dsync()
    if DEV == "cuda":
        by_kind: dict[str, float] = {}
        by_name: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us = e.time_range.elapsed_us() / 5
                by_kind[_kernel_kind(e.name)] = by_kind.get(_kernel_kind(e.name), 0.0) + us
                by_name[e.name] = by_name.get(e.name, 0.0) + us
        kernel_ms = sum(by_kind.values()) / 1e3
        row(f"{arch} kernels per eager step (profiler)", kernel_ms,
            note="; ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])),
            key="iter_kernels", kinds_ms={k: v / 1e3 for k, v in by_kind.items()})
        for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    {us / 1e3:7.3f} ms  {name[:110]}")
    else:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


#: Kernel-name fragments -> what the kernel does (first match wins).
KINDS = [
    ("_select_kernel", "top-k select"), ("_group_max", "top-k select"),
    ("_topk_mask", "AuxK top-k mask"), ("_gather_decode", "gathered decode"),
    ("_gather_dot", "gathered dots"), ("csr", "CSR products (weight gradients)"),
    ("spmm", "CSR products (weight gradients)"), ("cusparse", "CSR products (weight gradients)"),
    ("adam", "Adam"), ("sort", "sort"), ("radix", "sort"), ("_fvu", "FVU"),
    ("_normalize_rows", "row constraint"), ("_project_rows", "row constraint"),
    ("gemm", "dense matmuls"), ("cutlass", "dense matmuls"), ("nvjet", "dense matmuls"),
    ("xmma", "dense matmuls"), ("sm90", "dense matmuls"),
]


def _kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for frag, kind in KINDS if frag in low), "other (elementwise, casts, copies)")


@section("restricted isometry on observed supports")
def ric(n_unions: int):
    from isae.analysis import isometry
    from isae.analysis.isometry import delta_of_supports

    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, D, device="cuda", generator=g)
    sizes = torch.randint(2 * K - 16, 2 * K + 1, (n_unions,), device="cuda", generator=g)
    sup = torch.randint(0, N, (n_unions, 2 * K), device="cuda", generator=g)
    sup = torch.sort(sup, dim=1).values  # duplicates are rare at N = 24 576 but do not matter
    isometry.delta_by_squaring(W, sup[:1000], sizes[:1000])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    d = isometry.delta_by_squaring(W, sup, sizes)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    row(f"δ_U by squaring, {n_unions} unions, |U| <= {2 * K}", dt * 1e3, f"{n_unions / dt:,.0f} unions/s",
        "target >= 100 000/s")
    sel = torch.arange(0, n_unions, n_unions // 2000)
    ref = delta_of_supports(W.cpu(), sup[sel].cpu(), sizes[sel].cpu()).numpy()
    err = np.abs(d[sel].double().cpu().numpy() - ref).max()
    row("δ_U agreement with float64 (2000 unions)", note=f"max |diff| {err:.1e} (target 1e-4)")
    # the anchors' kernels on the same batch shape
    Du = W[sup[:768, :64]]
    Gm = Du @ Du.transpose(1, 2)
    ms = timed(lambda: torch.linalg.svdvals(Du), warmup=1, reps=3)
    row("anchor: torch.linalg.svdvals, 768 x (64 x 768)", ms, f"{768 / ms * 1e3:,.0f} /s")
    ms = timed(lambda: torch.linalg.eigvalsh(Gm), warmup=1, reps=3)
    row("anchor: eigvalsh of 768 Gram matrices 64 x 64", ms, f"{768 / ms * 1e3:,.0f} /s")


@section("matching two dictionaries")
def matching(n_atoms: int):
    from isae.analysis.matching import match_dictionaries

    g = torch.Generator(device="cuda").manual_seed(0)
    for n in sorted({8192, n_atoms}):
        A = torch.randn(n, D, device="cuda", generator=g)
        perm = torch.randperm(n, device="cuda", generator=g)
        sign = torch.randint(0, 2, (n,), device="cuda", generator=g) * 2.0 - 1
        Bm = sign[:, None] * A[perm] + 0.7 * torch.randn(n, D, device="cuda", generator=g)
        t0 = time.perf_counter()
        m = match_dictionaries(A, Bm, device="cuda")
        dt = time.perf_counter() - t0
        s = m.summary()
        row(f"match {n} x {n} atoms (blocked |cos| on GPU + scipy Hungarian)", dt * 1e3,
            note=f"mean matched |cos| {s.get('mean_abs_cos', float('nan')):.3f}"
                 + (" (target <= 60 s)" if n == n_atoms else ""))


@section("profile of one training step")
def profile_steps(trace_dir: str | None = None):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(B, D, device="cuda")
    dead = torch.rand(N, device="cuda") < 0.05
    width = graphs.aux_bucket(int(dead.sum()), N)  # AuxK's width as a graph has it
    for arch in ("topk", "isae", "isae-iter"):
        # no graph replay: the profiler sees kernels launched one by one
        m, st = our_stepper(arch, ops=FastOps(cuda_graphs=False))
        for _ in range(3):
            st._body(x, dead, width)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                st._body(x, dead, width)
            torch.cuda.synchronize()
        print(f"-- {arch}: CUDA time by kernel, 5 steps")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=80,
                                        max_name_column_width=110))
        if trace_dir:  # kernels linked to the ops that launched them, for a closer look
            prof.export_chrome_trace(str(Path(trace_dir) / f"profile_{arch}.json"))


def main() -> None:
    global D, N, K, B, DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file of the rows (benchmarks/session_table.py reads it)")
    ap.add_argument("--label", default=None, help="names this run in the JSON")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma list of sections")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for the seeds and iter sections at small shapes")
    ap.add_argument("--d", type=int, default=D)
    ap.add_argument("--width", type=int, default=N)
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--eq-steps", type=int, default=300, help="steps of the equivalence runs")
    ap.add_argument("--set", default=None, help="seeds: activation set folder, reused if there, else written")
    ap.add_argument("--seed-rows", type=int, default=1_081_344, help="rows of the on-disk set")
    ap.add_argument("--seed-tokens", type=int, default=8_000_000, help="tokens per seed")
    ap.add_argument("--seed-buffer", type=int, default=131072, help="shuffle buffer (rows)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds in the seeds section")
    ap.add_argument("--data-on-device", default="auto", choices=["auto", "always", "never"],
                    help="seeds: where batches come from (never: the streaming path of before)")
    ap.add_argument("--iter-arch", default="isae-iter", help="iter: the preset taken apart")
    ap.add_argument("--prefetch", type=int, default=None, help="reader threads (isae.data.stream.PREFETCH)")
    ap.add_argument("--pin", choices=["on", "off"], default=None, help="isae.data.stream.PIN_MEMORY")
    ap.add_argument("--ric-unions", type=int, default=200_000)
    ap.add_argument("--match-atoms", type=int, default=32768)
    ap.add_argument("--trace-dir", default=None, help="where the profile section writes its traces")
    a = ap.parse_args()
    if a.quick:
        a.eq_steps, a.seed_rows, a.seed_tokens, a.ric_unions, a.match_atoms = 60, 200_000, 2_000_000, 20_000, 8192
    D, N, K, B, DEV = a.d, a.width, a.k, a.batch, a.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import isae.data.stream

    if a.prefetch:
        isae.data.stream.PREFETCH = a.prefetch
    if a.pin:
        isae.data.stream.PIN_MEMORY = a.pin == "on"
    device_name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(device_name, torch.__version__, flush=True)
    sections = {
        "anchors": anchors,
        "kernels": kernel_bench,
        "sparsify": sparsify_step,
        "steps": our_steps,
        "equivalence": lambda: equivalence(a.eq_steps),
        "seeds": lambda: seeds_parallel(a.set, a.seed_rows, a.seed_tokens, a.seed_buffer, a.seeds,
                                        a.data_on_device),
        "iter": lambda: iter_breakdown(a.iter_arch),
        "ric": lambda: ric(a.ric_unions),
        "matching": lambda: matching(a.match_atoms),
        "profile": lambda: profile_steps(a.trace_dir),
    }
    only = a.only.split(",") if a.only else [s for s in sections if s != "profile"]

    def save() -> None:
        if a.out:
            Path(a.out).write_text(json.dumps({"script": "gpu_bench", "label": a.label,
                                               "mode": a.data_on_device, "device": device_name,
                                               "rows": ROWS}, indent=1))

    for name in only:
        sections[name]()
        save()  # after every section, so a run cut short keeps what it measured
    print("\n| what | ms | rate | note |\n|---|---|---|---|")
    for r in ROWS:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        print(f"| {r['what']} | {ms} | {r['rate']} | {r['note']} |")
    save()


if __name__ == "__main__":
    main()
