"""isae-iter's thresholding steps: what they cost in a training step, and what stopping their
gradient (``+sg``) changes in what is learned. One command, a table last.

    PYTHONPATH=src python benchmarks/iter_bench.py [--out iter.json]     # CUDA: ~2 min on an H100
    PYTHONPATH=src python benchmarks/iter_bench.py --part throughput     # part 1 alone (~1 min)
    PYTHONPATH=src python benchmarks/iter_bench.py --device cpu --tiny   # the same at toy sizes
    PYTHONPATH=src python benchmarks/iter_bench.py --device cpu --part training \
        --sets small:32:128:3 --rows 30000 --tokens 300000 --train-batch 256   # part 2 alone

Part 1, throughput: training steps as ``isae train`` runs them (SAEStepper; on CUDA the fast
op set replayed as a CUDA graph) of ``topk``, ``isae``, ``isae-iter`` and ``isae-iter+sg``
at d 384 / width 12 288 and d 768 / width 24 576, batch 4 096, k 32, on random rows with 5 %
of the latents dead (AuxK on). Per arch: ms per step and M tok/s. For the two with steps:
what the steps cost (their step less ``isae``'s, the same model without steps), that cost's
share of their step, and that cost in ``topk`` steps (the issue's target: below 1). And how
far the +sg forward is from isae-iter's on the same weights and rows (the fused kernels
round differently: share of rows with the same support, relative FVU difference).

Part 2, training: synthetic sets with a known dictionary (the GPU study's two regimes,
coherent d 64 / 256 atoms / k 8 and well-posed d 128 / 512 atoms / k 4, 300 000 rows each,
written first), ``isae``, ``isae-iter`` and ``isae-iter+sg`` (``--train-archs`` for others,
e.g. ``topk+iter,topk+iter+sg``) x 3 seeds trained on one shared pass of 3 M tokens
(batch 1 024, the default learning rate for all). Per arch: held-out FVU, truth recovery
(Hungarian-matched |cos| of the decoder with the true dictionary), stability (matched |cos|
between seeds, all pairs), dead %, how many runs converged (the trainer's control) or
diverged; mean and spread over seeds.

``+sg`` (isae.models.config.SAEConfig.iht_gradient) computes isae-iter's codes, and trains
on the final codes' FVU with the codes as constants plus the amortised TopK codes' FVU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_set import hint_tally, per_step

from isae.analysis.convergence import run_convergence
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import reconstruction_metrics
from isae.data import checkpoints
from isae.data.activations import ActivationSet
from isae.data.sources import synthetic
from isae.models.compute import select_ops
from isae.models.config import SAEConfig, TrainConfig
from isae.models.sparse_coder import SparseCoder
from isae.training.trainer import SAEStepper, train_many

ARCHS = ("topk", "isae", "isae-iter", "isae-iter+sg")
TRAIN_ARCHS = ("isae", "isae-iter", "isae-iter+sg")
#: (name, d, atoms, k): the GPU study's synthetic regimes (config/gpu.yaml).
SETS = [("coherent", 64, 256, 8), ("wellposed", 128, 512, 4)]
ROWS: list[dict] = []


def row(part: str, what: str, **cols) -> None:
    ROWS.append({"part": part, "what": what, **cols})
    print(f"  {what}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in cols.items()), flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)




def throughput(d: int, n: int, k: int, batch: int, device: str, reps: int) -> None:
    """Part 1 at one shape."""
    shape = f"d {d} / width {n}"
    print(f"== throughput, {shape}, batch {batch}, k {k}", flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d, device=device, generator=g)
    dead = torch.rand(n, device=device, generator=g) < 0.05
    n_dead = int(dead.sum())
    ms = {}
    for arch in ARCHS:
        m = SparseCoder(SAEConfig.from_arch(arch, d_in=d, d_sae=n, k=k, seed=0), device=device,
                        ops=select_ops(device))
        st = SAEStepper(m, TrainConfig(device=device))
        ms[arch] = per_step(lambda st=st: st.step(x, 1.0, dead, n_dead), device,
                            warmup=3 if device == "cuda" else 1, reps=reps)
        how = "CUDA graph" if st.graphs is not None else "eager"
        row("throughput", f"{arch}, {shape}", ms=ms[arch], M_tok_s=batch / ms[arch] / 1e3, how=how,
            shape=shape, arch=arch)
        del m, st
    for arch in ("isae-iter", "isae-iter+sg"):
        cost = ms[arch] - ms["isae"]
        row("throughput", f"{arch} steps, {shape}", ms=cost, share=cost / ms[arch],
            topk_steps=cost / ms["topk"], shape=shape, arch=arch, key="steps")
    # the +sg forward against isae-iter's, on the same weights and rows
    models = [SparseCoder(SAEConfig.from_arch(a, d_in=d, d_sae=n, k=k, seed=0), device=device,
                          ops=select_ops(device)) for a in ("isae-iter", "isae-iter+sg")]
    with torch.no_grad():
        a, b = (mod(x) for mod in models)
    same = (a.codes.idx.sort(1).values == b.codes.idx.sort(1).values).all(1).float().mean()
    row("throughput", f"+sg forward vs isae-iter's, {shape}", same_support_rows=float(same),
        fvu_rel_diff=abs(float(b.fvu) / float(a.fvu) - 1), shape=shape, key="agreement")


def training(root: Path, device: str, tokens: int, rows: int, batch: int, seeds: int,
             sets: list[tuple[str, int, int, int]], scratch: Path,
             archs: tuple[str, ...] = TRAIN_ARCHS) -> None:
    """Part 2: each set written once under root (reused when there), all archs x seeds on one
    shared pass, checkpoints in scratch."""
    for name, d, atoms, k in sets:
        print(f"== training, {name}: d {d}, {atoms} atoms, k {k}, {tokens:,} tokens", flush=True)
        path = root / name
        if not (path / "truth").is_dir():
            synthetic.extract(str(path), seed=0, d=d, atoms=atoms, k=k, rows=rows, noise=0.05,
                              zipf=1.0)
        tcfg = TrainConfig(tokens=tokens, batch_size=batch, device=device, seed=0,
                           checkpoint_every=10**9)
        cfgs = [SAEConfig.from_arch(a, d_in=d, d_sae=atoms, k=k, seed=s)
                for a, s in itertools.product(archs, range(seeds))]
        outs = [scratch / "runs" / name / f"{c.arch}-{c.seed}" for c in cfgs]
        t0 = time.perf_counter()
        with hint_tally(device) as tally:
            summaries = train_many(path, cfgs, tcfg, outs, resume=False, drop_diverged=True,
                                   report=lambda log, total, out, t=tcfg: run_convergence(
                                       log, t, total))
        wall = time.perf_counter() - t0
        if tally is not None and int(tally[0]):
            served = 1 - int(tally[1]) / int(tally[0])
            print(f"   the thresholding steps' top-k: the previous support served "
                  f"{100 * served:.1f} % of {int(tally[0]):,} rows", flush=True)
            row("hint", f"hint, {name}", served=served, rows=int(tally[0]), set=name)
        acts = ActivationSet(path)
        truth = checkpoints.load_decoder(path / "truth")
        for arch in archs:
            runs = [s for s in summaries if s["arch"] == arch]
            done = [s for s in runs if not s.get("diverged")]
            fvu, rec, dead, dec = [], [], [], []
            for s in done:
                ck = checkpoints.load(s["out"], device=device)
                r = reconstruction_metrics(ck, acts)
                fvu.append(r["fvu"])
                dead.append(r["dead_frac"])
                rec.append(match_dictionaries(ck.model.W_dec.detach(), truth, device=device)
                           .summary()["mean_abs_cos"])
                dec.append(ck.model.W_dec.detach())
            stab = [match_dictionaries(p, q, device=device).summary()["mean_abs_cos"]
                    for p, q in itertools.combinations(dec, 2)]
            row("training", f"{arch}, {name}", fvu=_mean(fvu), fvu_sd=_sd(fvu),
                truth_cos=_mean(rec), truth_cos_sd=_sd(rec), seed_cos=_mean(stab),
                seed_cos_sd=_sd(stab), dead_pct=100 * _mean(dead),
                converged=f"{sum(bool(s.get('converged')) for s in done)}/{len(runs)}",
                diverged=len(runs) - len(done), set=name, arch=arch, wall_s=wall)


def _mean(v: list[float]) -> float:
    return float(np.mean(v)) if v else float("nan")


def _sd(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def table() -> str:
    """The rows as two markdown tables (throughput, training)."""
    out = ["", "| shape | arch | ms / step | M tok/s | steps' cost ms | share of step | in topk steps |",
           "|---|---|---:|---:|---:|---:|---:|"]
    steps = {(r["shape"], r["arch"]): r for r in ROWS if r.get("key") == "steps"}
    for r in ROWS:
        if r["part"] == "throughput" and "M_tok_s" in r:
            s = steps.get((r["shape"], r["arch"]))
            extra = (f"{s['ms']:.3f} | {100 * s['share']:.0f} % | {s['topk_steps']:.2f}"
                     if s else " |  | ")
            out.append(f"| {r['shape']} | {r['arch']} | {r['ms']:.3f} | {r['M_tok_s']:.3f} | {extra} |")
    for r in ROWS:
        if r.get("key") == "agreement":
            out.append(f"\n{r['shape']}: +sg forward vs isae-iter's on the same weights: "
                       f"{100 * r['same_support_rows']:.1f} % of rows with the same support, "
                       f"FVU differs by {100 * r['fvu_rel_diff']:.3f} %")
    train = [r for r in ROWS if r["part"] == "training"]
    if train:
        out += ["", "| set | arch | held-out FVU | truth |cos| | seed |cos| | dead % | converged | diverged |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in train:
            out.append(f"| {r['set']} | {r['arch']} | {r['fvu']:.4f} ± {r['fvu_sd']:.4f} | "
                       f"{r['truth_cos']:.3f} ± {r['truth_cos_sd']:.3f} | "
                       f"{r['seed_cos']:.3f} ± {r['seed_cos_sd']:.3f} | {r['dead_pct']:.1f} | "
                       f"{r['converged']} | {r['diverged']} |")
    for r in ROWS:
        if r["part"] == "hint":
            out.append(f"\n{r['set']}: the thresholding steps' top-k took the previous support's "
                       f"short way for {100 * r['served']:.1f} % of {r['rows']:,} rows")
    return "\n".join(out)


def _shape(spec: str) -> tuple[str, int, int, int]:
    name, *nums = spec.split(":")
    if len(nums) != 3:
        raise SystemExit(f"--sets: {spec!r} is neither a known set ({', '.join(s[0] for s in SETS)}) "
                         "nor NAME:D:ATOMS:K")
    d, atoms, k = (int(v) for v in nums)
    return name, d, atoms, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (with --tiny) to check the script")
    ap.add_argument("--tiny", action="store_true", help="toy sizes throughout (for the CPU)")
    ap.add_argument("--part", choices=["all", "throughput", "training"], default="all")
    ap.add_argument("--batch", type=int, default=4096, help="rows per step of part 1")
    ap.add_argument("--k", type=int, default=32, help="k of part 1")
    ap.add_argument("--reps", type=int, default=30, help="timed steps per arch in part 1")
    ap.add_argument("--tokens", type=int, default=3_000_000, help="training tokens per SAE in part 2")
    ap.add_argument("--rows", type=int, default=300_000, help="rows of each synthetic set")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sets", default="coherent,wellposed",
                    help="part 2's sets: names of SETS, or NAME:D:ATOMS:K for another shape")
    ap.add_argument("--train-batch", type=int, default=1024, help="rows per step of part 2")
    ap.add_argument("--train-archs", default=",".join(TRAIN_ARCHS), help="part 2's archs")
    ap.add_argument("--set-dir", default=None, help="where the synthetic sets are written (reused if there)")
    ap.add_argument("--out", default=None, help="JSON file of the rows")
    ap.add_argument("--hint-cap", type=int, default=None,
                    help="kernels.HINT_CAP (the thresholding steps' top-k bounded by their "
                         "previous support; 0: off, the default); with it, part 2 says how "
                         "often the bound served")
    a = ap.parse_args()
    if a.hint_cap is not None:
        from isae.gpu import kernels

        kernels.HINT_CAP = a.hint_cap
    shapes = [(384, 12288), (768, 24576)]
    known = {s[0]: s for s in SETS}
    sets = [known[n] if n in known else _shape(n) for n in a.sets.split(",")]
    if a.tiny:
        shapes, sets = [(24, 192), (40, 320)], [("tiny", 16, 48, 3)]
        a.batch, a.k, a.reps, a.tokens, a.rows, a.seeds = 128, 4, 2, 20_000, 6000, 2
        a.train_batch = 256
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(1 if a.device == "cpu" else torch.get_num_threads())
    name = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    print(name, torch.__version__, flush=True)
    t0 = time.perf_counter()
    if a.part in ("all", "throughput"):
        for d, n in shapes:
            throughput(d, n, a.k, a.batch, a.device, a.reps)
    if a.part in ("all", "training"):
        with tempfile.TemporaryDirectory(prefix="iter_bench_") as tmp:
            root = Path(a.set_dir) if a.set_dir else Path(tmp)
            training(root, a.device, a.tokens, a.rows, a.train_batch, a.seeds, sets, Path(tmp),
                     tuple(a.train_archs.split(",")))
    print(table())
    print(f"\n{name}; {time.perf_counter() - t0:.0f} s in all")
    if a.out:
        Path(a.out).write_text(json.dumps({"script": "iter_bench", "device": name, "rows": ROWS},
                                          indent=1))


if __name__ == "__main__":
    main()
