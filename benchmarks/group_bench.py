"""Throughput at the study's own shapes, in one command: a group of small SAEs trained as
one stacked model against the same SAEs one after another (and the check that they learn
the same), and every switch combination of the TopK family against topk.

    PYTHONPATH=src python benchmarks/group_bench.py [--out results.json]
    PYTHONPATH=src python benchmarks/group_bench.py --only check          # correctness alone
    PYTHONPATH=src python benchmarks/group_bench.py --device cpu --d 32 --width 128 --wide 256 \\
        --k 4 --batch 256 --steps 20 --rows 20000 --switch-reps 2 --user-steps 6   # CPU smoke

Sections (``--only`` takes a comma list; the table is printed last):

* ``group``: the 9 SAEs of the issue (topk, isae, isae-iter x seeds 0-2; d 384, width 1 536,
  k 16, batch 4 096) trained end to end from a float16 set on disk, first one after another
  (``isae.training.trainer.train``, each its own pass), then as one group
  (``train_many(..., grouped=True)``), then sharing one pass one by one (``grouped=False``,
  the way before grouping). Wall times include loading, graph recordings and checkpoints; the
  speed-up line compares the first two (target >= 3x).
* ``check``: the group's checkpoints against the one-after-another ones (same batches: one
  data seed): held-out FVU of each run (isae.analysis.reconstruction), relative difference
  within ``--tolerance`` (default 2 %: bfloat16 near-ties flip a few selections, as between
  the fast path and the float32 reference); one line "check: PASS" or "check: FAIL". Needs
  the group section's checkpoints (run together).
* ``switches``: every combination of signed / tied / nobias / iter at d 384 / width 12 288
  (``--wide``), batch 4 096, k 16: the steady-state step of the graphed fast path with
  ``--dead-frac`` of the latents dead (AuxK on), each combination's first (eager, compiling)
  and second (recording) step, and which kernels one eager step launched (a wrapper that
  launched none fell back to stock torch: isae.gpu.kernel_trace); then the line
  "slowest switch combination <name>: N % of topk" (target >= 70 %).
* ``profile``: where the group's time goes, without data loading: the graphed step of each
  arch alone and of the whole group, and on CUDA torch.profiler's share of the step that the
  GPU is busy, with the kernels that fill it (not in the default run's list of targets).
* ``steps``: torch.profiler over each of ``--profile-archs`` alone, at ``--width`` and
  ``--wide`` with ``--dead-frac`` dead: its graphed step and the kernels that fill it.
* ``floor``: the least a thresholding step can cost at ``--wide``: its dense bfloat16
  correlation ([batch, d] x [d, width]) and the top-k of it, timed alone, without gradient,
  beside ``topk``'s whole graphed step; then the rate ``topk+iter`` would reach if each of its
  steps cost only that (no step size, no update, no backward): the ceiling that today's
  GEMM and top-k kernels put on #26's "slowest switch" ratio (a kernel fusing the two would
  lower the floor, and speed ``topk`` too).
* ``select``: the two top-k kernels (group maxima first, or the whole row) timed at the
  group's and the switches' widths.
* ``user``: each combination trained from scratch for ``--user-steps`` steps at the wide
  shape as ``isae train`` would (its loop rate, early training included: dead latents as
  they come, and for each new AuxK width an eager step and a graph recording, counted and
  timed).

Expected on an H100 at the defaults: about 4 minutes in all (set ~20 s, group ~90 s,
switches ~60 s, user ~60 s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_set import Peak, ensure_set, hint_tally, sections  # noqa: E402

from isae.data import checkpoints  # noqa: E402
from isae.models.compute import select_ops  # noqa: E402
from isae.models.config import SAEConfig, TrainConfig, parse_arch  # noqa: E402
from isae.models.sparse_coder import SparseCoder  # noqa: E402
from isae.training.trainer import SAEStepper, train, train_many  # noqa: E402

ROWS: list[dict] = []
DEV = "cuda"


def row(what: str, ms: float | None = None, rate: str = "", note: str = "", **extra) -> None:
    ROWS.append({"what": what, "ms": ms, "rate": rate, "note": note, **extra})
    print(f"  {what}: {'' if ms is None else f'{ms:.3f} ms'} {rate} {note}", flush=True)


def dsync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


section = sections(lambda name, e: row(name, note=f"FAILED: {type(e).__name__}: {e}"[:300]))


# ----------------------------------------------------------------------------- switch names

SWITCH_NAMES = ("signed", "tied", "nobias", "iter")


def combination_names() -> list[str]:
    """The 16 combinations of the TopK family's switches, each by its shortest arch name
    (a preset, ``topk+...`` or ``isae-...``), topk first."""
    names = []
    for mask in range(16):
        on = [s for i, s in enumerate(SWITCH_NAMES) if mask >> i & 1]
        core = [s for s in ("signed", "tied", "nobias") if s in on]
        if len(core) >= 2:  # nearer to isae: name what it lacks
            missing = [s for s in ("signed", "tied", "nobias") if s not in core]
            if not missing and "iter" in on:
                name = "isae-iter"
            else:
                name = "isae" + "".join(f"-{s}" for s in missing) + ("+iter" if "iter" in on else "")
        else:
            name = "topk" + "".join(f"+{s}" for s in on)
        f = parse_arch(name).fields
        assert (f["signed"], f["tied"], f["bias"] == "none", f["encoder_steps"] > 0) == tuple(
            s in on for s in SWITCH_NAMES), name
        names.append(name)
    return names


# ----------------------------------------------------------------------------- group + check

GROUP_RUNS: dict = {}


@section("a group of SAEs as one model vs one after another (end to end, from disk)")
def _group_of(a, tmp: Path):
    """The group's set on disk, its SAEs (--archs x --seeds), its training settings and the
    short ones that compile the kernels before a timing."""
    acts = ensure_set(tmp / "acts", a.rows, a.d, 4 * a.width, a.batch, DEV)
    cfgs = [SAEConfig.from_arch(arch, d_in=a.d, d_sae=a.width, k=a.k, seed=s)
            for arch in a.archs.split(",") for s in range(a.seeds)]
    tcfg = TrainConfig(tokens=a.steps * a.batch, batch_size=a.batch, device=DEV,
                       checkpoint_every=10**9)
    warm = TrainConfig(tokens=15 * a.batch, batch_size=a.batch, device=DEV, checkpoint_every=10**9)
    return acts, cfgs, tcfg, warm


def group_section(a, tmp: Path) -> None:
    acts, cfgs, tcfg, warm = _group_of(a, tmp)
    # Compile the kernels outside the timings (each way still pays its own graph recordings,
    # loads and checkpoints).
    train_many(acts.path, cfgs[:: a.seeds], warm, [tmp / "warm" / c.arch for c in cfgs[:: a.seeds]],
               resume=False, grouped=True)
    for c in cfgs[:: a.seeds]:
        train(acts.path, c, warm, tmp / "warm1" / c.arch, resume=False)
    total = len(cfgs) * tcfg.total_steps() * a.batch
    seq_wall, seq = 0.0, []
    with Peak(DEV) as p_seq:
        for c in cfgs:
            t0 = time.perf_counter()
            seq.append(train(acts.path, c, tcfg, tmp / "seq" / f"{c.arch}-{c.seed}", resume=False))
            seq_wall += time.perf_counter() - t0
    loop = sum(s["tokens"] / s["tokens_per_s"] for s in seq)
    row(f"{len(cfgs)} SAEs one after another", seq_wall * 1e3, f"{total / seq_wall / 1e6:.2f} M tok/s",
        f"loops alone {total / loop / 1e6:.2f} M tok/s; {(seq_wall - loop) / len(cfgs):.2f} s per run "
        f"outside its loop" + ("" if p_seq.gb is None else f"; peak {p_seq.gb:.2f} GB"),
        key="sequential", wall_s=seq_wall, tok_s=total / seq_wall)
    t0 = time.perf_counter()
    with Peak(DEV) as p_grp:
        grp = train_many(acts.path, cfgs, tcfg, [tmp / "grp" / f"{c.arch}-{c.seed}" for c in cfgs],
                         resume=False, grouped=True)
    grp_wall = time.perf_counter() - t0
    row(f"{len(cfgs)} SAEs as one group", grp_wall * 1e3, f"{total / grp_wall / 1e6:.2f} M tok/s",
        f"loop alone {grp[0]['tokens_per_s'] / 1e6:.2f} M tok/s"
        + ("" if p_grp.gb is None else f"; peak {p_grp.gb:.2f} GB"),
        key="grouped", wall_s=grp_wall, tok_s=total / grp_wall)
    t0 = time.perf_counter()
    shared = train_many(acts.path, cfgs, tcfg, [tmp / "shr" / f"{c.arch}-{c.seed}" for c in cfgs],
                        resume=False, grouped=False)
    shr_wall = time.perf_counter() - t0
    row(f"{len(cfgs)} SAEs sharing one pass one by one (before grouping)", shr_wall * 1e3,
        f"{total / shr_wall / 1e6:.2f} M tok/s",
        f"loop alone {shared[0]['tokens_per_s'] / 1e6:.2f} M tok/s", key="shared", wall_s=shr_wall)
    row("speed-up of the group over one after another",
        note=f"{seq_wall / grp_wall:.2f}x end to end (target >= 3x); loops alone "
             f"{loop / (tcfg.total_steps() * a.batch * len(cfgs) / grp[0]['tokens_per_s']):.2f}x; "
             f"{shr_wall / grp_wall:.2f}x over sharing the pass one by one",
        key="group_speedup", ratio=seq_wall / grp_wall)
    GROUP_RUNS.update(acts=acts, cfgs=cfgs, seq=tmp / "seq", grp=tmp / "grp")


@section("check: the group learns what one-after-another training learns")
def check_section(a, tmp: Path) -> None:
    from isae.analysis.reconstruction import reconstruction_metrics

    if not GROUP_RUNS:
        group_section(a, tmp)
    acts, cfgs = GROUP_RUNS["acts"], GROUP_RUNS["cfgs"]
    worst, lines = 0.0, []
    for c in cfgs:
        name = f"{c.arch}-{c.seed}"
        ca = checkpoints.load(GROUP_RUNS["seq"] / name, DEV)
        cb = checkpoints.load(GROUP_RUNS["grp"] / name, DEV)
        fa = reconstruction_metrics(ca, acts)["fvu"]
        fb = reconstruction_metrics(cb, acts)["fvu"]
        rel = abs(fb - fa) / fa
        cos = float((ca.W_dec * cb.W_dec).sum(1).mean())
        worst = max(worst, rel)
        lines.append(f"{name} {fa:.4f}/{fb:.4f}")
        row(f"check {name}: held-out FVU one after another / grouped",
            note=f"{fa:.4f} / {fb:.4f} (rel diff {rel:.2%}); mean cos of same-index atoms {cos:.3f}",
            key="check_run", run=name, fvu_seq=fa, fvu_grp=fb, rel=rel, cos=cos)
    verdict = "PASS" if worst <= a.tolerance else "FAIL"
    row(f"check: {verdict}", note=f"largest relative held-out FVU difference {worst:.2%} "
        f"(tolerance {a.tolerance:.0%}) over {len(cfgs)} runs", key="check", passed=verdict == "PASS",
        worst=worst)


# ----------------------------------------------------------------------------- profile


@section("profile: one group step against the same SAEs' steps alone (steady state)")
def profile_section(a) -> None:
    """Where the group's time goes, without data loading: the graphed steady-state step of
    each arch alone and of the group of all archs x seeds, on one random batch with every
    latent live (no AuxK); then, on CUDA, torch.profiler over a few group steps: how much of
    the step the GPU is busy, and the kernels that keep it busy."""
    from isae.training.group import RunGroup
    from isae.training.steppers import Run

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(a.batch, a.d, device=DEV, generator=g)
    dead = torch.zeros(a.width, dtype=torch.bool, device=DEV)
    tcfg = TrainConfig(lr=2e-4, batch_size=a.batch, device=DEV)
    archs = a.archs.split(",")
    alone = 0.0
    for arch in archs:
        m = SparseCoder(SAEConfig.from_arch(arch, d_in=a.d, d_sae=a.width, k=a.k, seed=0),
                        device=DEV, ops=select_ops(DEV))
        st = SAEStepper(m, tcfg)
        for _ in range(3):  # eager, recorded, replayed
            st.step(x, 1.0, dead)
        ms = _per_step(lambda st=st: st.step(x, 1.0, dead), a.switch_reps)
        alone += ms * a.seeds
        row(f"profile: {arch} step alone", ms, f"{a.batch / ms / 1e3:.2f} M tok/s",
            "CUDA graph" if st.graphs is not None else "eager", key="profile_alone", arch=arch)
        del m, st
        gc.collect()
    runs = [Run(SAEConfig.from_arch(arch, d_in=a.d, d_sae=a.width, k=a.k, seed=s), tcfg, None,
                torch.device(DEV), select_ops(DEV)) for arch in archs for s in range(a.seeds)]
    group = RunGroup(runs, tcfg, torch.device(DEV))
    for _ in range(3):
        group.step(x, 1.0)
    ms_g = _per_step(lambda: group.step(x, 1.0), a.switch_reps)
    row(f"profile: the group's step ({len(runs)} SAEs)", ms_g,
        f"{len(runs) * a.batch / ms_g / 1e3:.2f} M tok/s",
        f"its SAEs' steps alone, one after another: {alone:.3f} ms ({alone / ms_g:.2f}x the "
        f"group's); {'CUDA graph' if group.graphs is not None else 'eager'}",
        key="profile_group", ms_alone=alone, ratio=alone / ms_g)
    if DEV != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    reps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            group.step(x, 1.0)
        dsync()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / reps / 1e3
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    kernels = [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / reps / 1e3,
                "calls_per_step": e.count / reps} for e in top if e.self_device_time_total > 0]
    row("profile: GPU busy per group step", busy,
        note=f"of {ms_g:.3f} ms per step: {100 * busy / ms_g:.0f} % (the rest: the host, "
             f"launch gaps, syncs); top kernels: " + "; ".join(
                 f"{k['name'][:40]} {k['ms_per_step']:.3f} ms x{k['calls_per_step']:.0f}"
                 for k in kernels[:5]),
        key="profile_busy", busy_ms=busy, kernels=kernels)
    print(events.table(sort_by="self_device_time_total", row_limit=20), flush=True)


@section("where one SAE's step goes, per arch and width (steady state, graphed)")
def steps_section(a) -> None:
    """torch.profiler over a few graphed steps of each of ``--profile-archs`` alone, at the
    group's width and at the switches' width (``--dead-frac`` dead, AuxK on): the step's time
    and the kernels that fill it, so that a change to one kernel can be aimed and judged."""
    from isae.gpu import kernels

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(a.batch, a.d, device=DEV, generator=g)
    for width in (a.width, a.wide):
        dead = torch.rand(width, device=DEV, generator=g) < a.dead_frac
        for arch in [s for s in a.profile_archs.split(",") if _known(s.removesuffix(":chunked"))]:
            chunked = arch.endswith(":chunked")  # the IHT row kernels as before whole rows
            arch = arch.removesuffix(":chunked")
            tile = getattr(kernels, "ROW_TILE", None)  # None: code from before the row kernels
            if chunked and tile is None:
                continue
            if tile is not None:
                kernels.ROW_TILE = 0 if chunked else tile
            m = SparseCoder(SAEConfig.from_arch(arch, d_in=a.d, d_sae=width, k=a.k, seed=0),
                            device=DEV, ops=select_ops(DEV))
            st = SAEStepper(m, TrainConfig(lr=2e-4))
            with hint_tally(DEV) as tally:  # the steps' top-k: how often the previous support served
                for _ in range(3):  # eager, recorded, replayed
                    st.step(x, 1.0, dead)
                ms = _per_step(lambda st=st, dead=dead: st.step(x, 1.0, dead), a.switch_reps)
                top, busy = _profile_kernels(lambda st=st, dead=dead: st.step(x, 1.0, dead))
            served = "" if tally is None or not int(tally[0]) else (
                f"; the steps' top-k hint served {100 * (1 - int(tally[1]) / int(tally[0])):.1f} %"
                " of rows (one batch stepped again and again)")
            if tile is not None:
                kernels.ROW_TILE = tile
            label = f"{arch} (chunked IHT kernels)" if chunked else arch
            row(f"steps: {label} at width {width}", ms, f"{a.batch / ms / 1e3:.2f} M tok/s",
                f"GPU busy {busy:.3f} ms; " + "; ".join(
                    f"{k['name'][:38]} {k['ms_per_step']:.3f} ms x{k['calls_per_step']:.0f}"
                    for k in top[:8]) + served,
                key="steps", arch=label, width=width, busy_ms=busy, kernels=top)
            del m, st
            gc.collect()
            if DEV == "cuda":
                torch.cuda.empty_cache()


def _profile_kernels(fn, reps: int = 5) -> tuple[list[dict], float]:
    """(the kernels of ``fn`` by GPU time per call, top first; GPU-busy ms per call). Empty
    off CUDA."""
    if DEV != "cuda":
        return [], 0.0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        dsync()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / reps / 1e3
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:16]
    return [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / reps / 1e3,
             "calls_per_step": e.count / reps} for e in top if e.self_device_time_total > 0], busy


@section("the top-k selection kernels at the study's shapes")
def select_section(a) -> None:
    """``kernels.topk_rows`` (group maxima, then bisection in the groups that reach the bound)
    against ``kernels.topk_mask_rows`` with every column valid (bisection over the whole row
    held in registers, for rows up to 4 096 wide): which is faster where, on random bf16
    scores, by CUDA events over 50 calls."""
    from isae.gpu import kernels

    g = torch.Generator(device=DEV).manual_seed(0)
    for rows, n in ((a.batch, a.width), (3 * a.batch, a.width), (9 * a.batch, a.width),
                    (a.batch, 4096), (a.batch, a.wide)):
        pre = torch.randn(rows, n, device=DEV, generator=g).to(torch.bfloat16)
        valid = torch.ones(n, dtype=torch.bool, device=DEV)
        for name, fn in (("topk_rows", lambda pre=pre: kernels.topk_rows(pre, a.k, True)),
                         ("topk_mask_rows",
                          lambda pre=pre, valid=valid: kernels.topk_mask_rows(pre, a.k, True, valid))):
            if name == "topk_mask_rows" and n > 4096:
                continue
            fn()
            ms = _per_step(fn, 50)
            row(f"select: {name} [{rows}, {n}] k {a.k}", ms, key="select", fn=name, rows=rows, n=n)
        if not getattr(kernels, "HINT_CAP", 0) or rows != a.batch:
            continue  # the hint off (--hint-cap), or a version without it
        # An IHT step's selection: the previous support as the hint, the scores moved a
        # little (served: the short way), or random columns as the hint (the unhinted way).
        prev = kernels.topk_rows(pre, a.k, True)[1]
        moved = (pre.float() + 0.05 * torch.randn(pre.shape, device=DEV, generator=g)).bfloat16()
        rand = torch.rand(rows, n, device=DEV, generator=g).argsort(1)[:, :a.k]
        for label, hint in (("previous support", prev), ("random columns", rand)):
            tally = torch.zeros(2, dtype=torch.int64, device=DEV)
            kernels.topk_rows_hinted(moved, a.k, True, hint, tally)
            served = 1 - int(tally[1]) / int(tally[0]) if int(tally[0]) else float("nan")

            def fn(moved=moved, hint=hint):
                return kernels.topk_rows_hinted(moved, a.k, True, hint)
            ms = _per_step(fn, 50)
            row(f"select: topk_rows_hinted [{rows}, {n}] k {a.k}, hint: {label}", ms,
                note=f"the hint served {100 * served:.1f} % of rows", key="select",
                fn=f"topk_rows_hinted ({label})", rows=rows, n=n, served=served)


@section("the floor under a thresholding step: its correlation and top-k alone")
def floor_section(a) -> None:
    """Each thresholding step of ``isae-iter`` and ``topk+iter`` chooses its support from a
    dense correlation of the residual with every atom and the top-k of it: the same GEMM and
    selection that ``topk``'s encoder runs once. Timed here alone (CUDA, no gradient, as
    ops.iht_step_fused computes them), against ``topk``'s graphed step at the same shape, so
    that the best ratio these steps could reach with today's kernels is a measurement."""
    from isae.gpu.ops import select_topk

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(a.batch, a.d, device=DEV, generator=g)
    dead = torch.rand(a.wide, device=DEV, generator=g) < a.dead_frac
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=a.d, d_sae=a.wide, k=a.k, seed=0),
                    device=DEV, ops=select_ops(DEV))
    st = SAEStepper(m, TrainConfig(lr=2e-4))
    for _ in range(3):  # eager, recorded, replayed
        st.step(x, 1.0, dead)
    topk_ms = _per_step(lambda st=st: st.step(x, 1.0, dead), a.switch_reps)
    W = torch.randn(a.wide, a.d, device=DEV, generator=g).bfloat16()
    rs = torch.randn(a.batch, a.d, device=DEV, generator=g).bfloat16()
    u = rs @ W.T
    gemm = _per_step(lambda: rs @ W.T, 50)
    fields = parse_arch("topk+iter").fields
    steps, signed = fields["encoder_steps"], fields["signed"]
    select_topk(u, a.k, signed)
    sel = _per_step(lambda: select_topk(u, a.k, signed), 50)
    per = gemm + sel
    best = topk_ms + steps * per
    row(f"floor: topk step at width {a.wide}", topk_ms, f"{a.batch / topk_ms / 1e3:.2f} M tok/s",
        key="floor_topk")
    row(f"floor: one step's correlation [{a.batch}, {a.d}] x [{a.d}, {a.wide}] bf16", gemm,
        note=f"{2 * a.batch * a.d * a.wide / gemm / 1e9:.0f} TFLOP/s", key="floor_gemm")
    row(f"floor: one step's top-{a.k} of [{a.batch}, {a.wide}] bf16", sel,
        note=f"{a.batch * a.wide * 2 / sel / 1e9:.2f} TB/s read once", key="floor_select")
    row(f"floor: topk+iter ({steps} steps) at most {100 * topk_ms / best:.0f} % of topk", best,
        note=f"if each step cost only its correlation and top-k ({per:.3f} ms); the 70 % "
             f"target allows {topk_ms / 0.7 - topk_ms:.3f} ms for all {steps} steps with "
             f"their backward", key="floor", pct=100 * topk_ms / best, per_step_ms=per)
    del m, st
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- switches


def _known(name: str) -> bool:
    """Whether this version of isae knows the arch name."""
    try:
        parse_arch(name)
    except Exception:  # noqa: BLE001 - a UserError: not known here
        return False
    return True


def _per_step(fn, reps: int) -> float:
    dsync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    dsync()
    return (time.perf_counter() - t0) * 1e3 / reps


@section("every switch combination on the fast path (steady state, graphed)")
def switches_section(a) -> None:
    from isae.gpu import kernel_trace

    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(a.batch, a.d, device=DEV, generator=g)
    dead = torch.rand(a.wide, device=DEV, generator=g) < a.dead_frac
    results = {}
    # isae-iter+sg (thresholding steps not differentiated) beside the 16, for comparison;
    # not a switch combination (the slowest line leaves it out)
    extra = [n for n in ("isae-iter+sg",) if _known(n)]
    for name in combination_names() + extra:
        ops = select_ops(DEV)
        m = SparseCoder(SAEConfig.from_arch(name, d_in=a.d, d_sae=a.wide, k=a.k, seed=0),
                        device=DEV, ops=ops)
        st = SAEStepper(m, TrainConfig(lr=2e-4))
        t0 = time.perf_counter()
        with kernel_trace.trace() as tr:
            st.step(x, 1.0, dead)  # eager (compiles what this combination is first to need)
        dsync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.step(x, 1.0, dead)  # recorded (CUDA graph), eager elsewhere
        dsync()
        second = time.perf_counter() - t0
        ms = _per_step(lambda st=st: st.step(x, 1.0, dead), a.switch_reps)
        fallbacks = tr.fallbacks()
        results[name] = ms
        how = f"{ops.name} ops, " + ("CUDA graph" if st.graphs is not None else "eager")
        row(f"{name} step", ms, f"{a.batch / ms / 1e3:.2f} M tok/s",
            f"{how}; first step {first:.2f} s, second {second:.2f} s; kernel launches "
            f"{sum(tr.kernels().values())}, fallbacks to stock torch: "
            f"{', '.join(fallbacks) if fallbacks else 'none'}",
            key="switch", arch=name, tok_s=a.batch / ms * 1e3, fallbacks=fallbacks,
            graphs=st.graphs is not None, first_s=first, second_s=second)
        del m, st
        gc.collect()  # a stepper and its graphs form a cycle: free them before the next
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for n in extra:
        results.pop(n)
    base = results["topk"]
    slowest = max(results, key=results.get)
    row(f"slowest switch combination {slowest}: {100 * base / results[slowest]:.0f} % of topk",
        note=f"{results[slowest]:.3f} ms vs topk's {base:.3f} ms per step (target >= 70 %); "
             f"width {a.wide}, {a.dead_frac:.0%} of latents dead", key="slowest", arch=slowest,
        pct=100 * base / results[slowest])
    no_iter = {k: v for k, v in results.items() if "iter" not in k}
    slow2 = max(no_iter, key=no_iter.get)
    row(f"slowest combination without thresholding steps {slow2}: "
        f"{100 * base / no_iter[slow2]:.0f} % of topk", key="slowest_no_iter", arch=slow2,
        pct=100 * base / no_iter[slow2])


@contextlib.contextmanager
def _graph_costs(cls):
    """While active: how many times, and for how long, ``cls`` ran an eager first step of a
    width and recorded a graph (each new AuxK width costs one of each)."""
    costs = {"_eager": [0, 0.0], "_record": [0, 0.0]}
    real = {k: getattr(cls, k) for k in costs}

    def timed(key):
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real[key](self, *args, **kwargs)
            finally:
                dsync()
                costs[key][0] += 1
                costs[key][1] += time.perf_counter() - t0
        return run
    for k in costs:
        setattr(cls, k, timed(k))
    try:
        yield costs
    finally:
        for k, f in real.items():
            setattr(cls, k, f)


@section("every switch combination trained from scratch, as isae train would")
def user_section(a, tmp: Path) -> None:
    acts = ensure_set(tmp / "acts", a.rows, a.d, 4 * a.width, a.batch, DEV)  # the group's set
    tcfg = TrainConfig(tokens=a.user_steps * a.batch, batch_size=a.batch, device=DEV,
                       checkpoint_every=10**9, dead_tokens=a.user_dead_tokens)
    from isae.gpu import cuda_graphs

    rates = {}
    for name in combination_names():
        cfg = SAEConfig.from_arch(name, d_in=a.d, d_sae=a.wide, k=a.k, seed=0)
        with _graph_costs(cuda_graphs.StepGraphs) as costs:
            t0 = time.perf_counter()
            s = train(acts.path, cfg, tcfg, tmp / "user" / name, resume=False)
            wall = time.perf_counter() - t0
        rates[name] = s["tokens_per_s"]
        gc.collect()
        row(f"{name} from scratch", wall * 1e3, f"{s['tokens_per_s'] / 1e6:.2f} M tok/s (loop)",
            f"dead at the end {s['dead_frac']:.1%}; AuxK widths {costs['_eager'][0]}: eager first "
            f"steps {costs['_eager'][1]:.2f} s, recordings {costs['_record'][1]:.2f} s",
            key="user", arch=name, tok_s=s["tokens_per_s"], widths=costs["_eager"][0],
            eager_s=costs["_eager"][1], record_s=costs["_record"][1])
    slowest = min(rates, key=rates.get)
    row(f"from scratch: slowest combination {slowest}: {100 * rates[slowest] / rates['topk']:.0f} % "
        f"of topk's loop rate", key="user_slowest", arch=slowest)


# ----------------------------------------------------------------------------- main


def main() -> None:
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file of the rows")
    ap.add_argument("--only", default=None,
                    help="comma list of: group, check, switches, user, profile, steps, select, "
                         "floor")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--width", type=int, default=1536, help="the group's SAEs")
    ap.add_argument("--wide", type=int, default=12288, help="the switch combinations' width")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--archs", default="topk,isae,isae-iter", help="the group's architectures")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per architecture in the group")
    ap.add_argument("--steps", type=int, default=2442,
                    help="steps of each group run (2 442: the GPU study's 10 M tokens at batch 4 096)")
    ap.add_argument("--rows", type=int, default=262144, help="rows of the on-disk set")
    ap.add_argument("--tolerance", type=float, default=0.02, help="check: relative FVU difference")
    ap.add_argument("--dead-frac", type=float, default=0.05, help="switches: dead latents")
    ap.add_argument("--switch-reps", type=int, default=30, help="switches: timed steps each")
    ap.add_argument("--user-steps", type=int, default=150, help="user: steps per combination")
    ap.add_argument("--user-dead-tokens", type=int, default=200_000, help="user: --dead-tokens")
    ap.add_argument("--profile-archs",
                    default="topk,isae,isae-iter,isae-iter+sg,isae-iter+sg:chunked",
                    help="steps: the archs profiled alone (:chunked: with the IHT kernels that "
                         "reload the table per phase, as before the whole-row ones)")
    ap.add_argument("--set-dir", default=None, help="where the sets are written (reused if there)")
    ap.add_argument("--hint-cap", type=int, default=None,
                    help="kernels.HINT_CAP for the whole run (the thresholding steps' top-k "
                         "bounded by their previous support; 0: off, the default)")
    a = ap.parse_args()
    DEV = a.device
    if a.hint_cap is not None:
        from isae.gpu import kernels

        kernels.HINT_CAP = a.hint_cap
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(name, torch.__version__, flush=True)
    tmp = Path(a.set_dir) if a.set_dir else Path(tempfile.mkdtemp(prefix="group_bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    sections = {"group": lambda: group_section(a, tmp), "check": lambda: check_section(a, tmp),
                "switches": lambda: switches_section(a), "user": lambda: user_section(a, tmp),
                "profile": lambda: profile_section(a), "steps": lambda: steps_section(a),
                "select": lambda: select_section(a), "floor": lambda: floor_section(a)}
    only = a.only.split(",") if a.only else list(sections)
    unknown = [s for s in only if s not in sections]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")

    def save() -> None:
        if a.out:
            Path(a.out).write_text(json.dumps({"script": "group_bench", "device": name,
                                               "args": vars(a), "rows": ROWS}, indent=1))

    for s in only:
        sections[s]()
        save()
    print("\n| what | ms | rate | note |\n|---|---|---|---|")
    for r in ROWS:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        print(f"| {r['what']} | {ms} | {r['rate']} | {r['note']} |")


if __name__ == "__main__":
    main()
