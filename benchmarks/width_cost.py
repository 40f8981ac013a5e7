"""What the width study adds to a GPU config's run, from the jobs it plans
(isae.study.plan.jobs) and measured step and matching times.

    python3 benchmarks/width_cost.py [CONFIG [OVERLAY ...]]     (default: config/gpu.yaml)

The config files are merged in order, as `snakemake --configfile A B` merges them, so an
overlay that trims the study can be costed before it is run. Prints, per job the width
study adds (the config against the same config with width_study.datasets = []): the SAEs
it trains, their optimiser steps, the GPU seconds they take at the step times below, and
the seconds of dictionary matching its measure or chance job spends at that width; then
the totals and the longest new job.

Step times, one SAE alone on one H100, batch 4 096, d 384 (benchmarks/RESULTS.md and the
width issue's measurements): topk 0.39 ms at width 1 536 and 2.61 ms at 12 288 (1.57 M
tok/s); isae-iter 3.98 ms at 12 288 (1.03 M tok/s). isae-tied (untied isae) took 17.1 ms
there (0.24 M tok/s) before it ran on the fast path; since the tenth session it runs at
104 % of topk's rate (RESULTS.md, "every switch combination on the fast path"), so it is
costed at topk's time. Between measured widths a step's time is a straight line in the
width; isae-iter keeps its ratio to topk at 12 288 (1.52x) at every width, and the isae
preset and other switches take topk's time: assumptions, not measurements. The synthetic sets (d 64 / 128, batch
1 024, widths up to 2 048) are launch-bound and costed at topk's 1 536-wide step, which
overstates them. An H200 is at least as fast. Four jobs sharing the GPU gain little on
small SAEs (0.39 ms alone against 1.48 ms each with four sharing: RESULTS.md), and a
12 288-wide SAE keeps the GPU busy alone, so the GPU seconds add up: the added wall time is
about their sum, less what overlaps the existing run's idle GPU.

Matching: isae.analysis.matching.match_dictionaries (the certified sparse assignment) on
two random dictionaries (d 384), one thread of the 2-core development machine (load 2-4):
0.14 s at 1 536, 0.40 s at 3 072, 1.38 s at 6 144, 5.35 s at 12 288 (log-log interpolation
between them, the last slope beyond); pairs of trained dictionaries took 1.0-1.5x a random
pair's time at 8 192 (benchmarks/RESULTS.md), so a measure job's matchings are costed at
1.5x. On the CPU: measure jobs on a GPU compute their cosines there, so this overstates
them. (scipy's dense linear_sum_assignment took 0.17, 1.16, 3.3 and 32.7 s at those sizes.)
A measure job matches, per arch, every seed pair twice (all latents; live latents, fewer
when latents die) and, with a truth, every seed once; and every pair of its cross-checked
archs per seed. A chance job (CPU) matches 3 kinds x draws per width (twice on a synthetic
set: against the truth too).
"""

from __future__ import annotations

import argparse
import copy
import math
from collections import Counter
from itertools import combinations
from pathlib import Path

from isae.models.config import parse_arch
from isae.study import grid as study_grid
from isae.study import plan

REPO = Path(__file__).resolve().parents[1]

#: ms per step of one topk SAE at batch 4 096, d 384: (width, ms), measured.
TOPK_MS = ((1536, 0.39), (12288, 4096 / 1.57e6 * 1e3))
#: Step time over topk's, at 12 288 (measured there, assumed at every width).
RATIO = {"iter": (4096 / 1.03e6) / (4096 / 1.57e6)}
#: Seconds of one n x n matching (match_dictionaries, random pairs, one thread), measured.
LSA_S = ((1536, 0.14), (3072, 0.40), (6144, 1.38), (12288, 5.35))
#: A trained pair's matching against a random pair's (at most, at 8 192: RESULTS.md).
TRAINED = 1.5


def topk_ms(width: int) -> float:
    """A topk step's ms at ``width`` (straight line through the two measurements; the
    1 536-wide time below it: small SAEs are launch-bound)."""
    (w0, t0), (w1, t1) = TOPK_MS
    return t0 if width <= w0 else t0 + (t1 - t0) * (width - w0) / (w1 - w0)


def step_ms(arch: str, width: int) -> float:
    """One SAE's step, ms, at ``width``: topk's, times the arch's ratio."""
    fields = parse_arch(arch).fields
    ms = topk_ms(width)
    # Each thresholding step costs the same: a straight line through 0 and 3 steps.
    return ms * (1 + (RATIO["iter"] - 1) * fields["encoder_steps"] / 3)


def lsa_s(n: int) -> float:
    """Seconds of one n x n matching: log-log interpolation of LSA_S."""
    pts = [(math.log(w), math.log(t)) for w, t in LSA_S]
    x = math.log(max(n, 2))
    i = 0 if x <= pts[1][0] else len(pts) - 2 if x >= pts[-2][0] else next(
        j for j in range(len(pts) - 1) if pts[j][0] <= x <= pts[j + 1][0])
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def measure_matchings(cfg: dict, g: study_grid.Group) -> int:
    """Matchings one measure job runs (see the module docstring)."""
    seeds = len(g.seeds)
    cross = [a for a in study_grid.main_archs(cfg, g.dataset) if a in g.archs]
    truth = cfg["datasets"][g.dataset]["source"] == "synthetic"
    pairs = len(g.archs) * math.comb(seeds, 2)
    return 2 * pairs + (len(g.archs) * seeds if truth else 0) + len(list(combinations(cross, 2))) * seeds


def added_jobs(cfg: dict) -> list[dict]:
    """One row per job the width study adds: rule, wildcards, SAEs, steps, GPU s, matching s."""
    base = copy.deepcopy(cfg)
    base["width_study"]["datasets"] = []
    grid = study_grid.Grid.of(cfg)
    old = {(j.rule, tuple(sorted(j.wildcards.items()))) for j in plan.jobs(base)}
    rows = []
    for j in plan.jobs(cfg, grid):
        if (j.rule, tuple(sorted(j.wildcards.items()))) in old:
            continue
        ds = j.wildcards.get("dataset")
        batch = cfg["datasets"][ds]["train"]["batch_size"] if ds else 0
        saes = steps = 0
        gpu = 0.0
        reused = 0
        if j.rule == "train":
            g = grid.groups[(ds, j.wildcards["group"])]
            # The lr sweep at this width hands its chosen candidate over as that seed's run.
            if (study_grid.lr_width_of(cfg, grid, ds, g.width) == g.width
                    and cfg["lr_sweep"]["seed"] in g.seeds):
                reused = len({parse_arch(a).preset for a in g.archs} - {"dl"})
        for t in j.trained:
            n = math.ceil(t.rows / batch)
            saes += t.saes
            steps += t.saes * n
            gpu += t.saes * n * step_ms(t.arch, t.width) / 1e3
        if reused:
            per = {t.arch: math.ceil(t.rows / batch) * step_ms(t.arch, t.width) / 1e3
                   for t in j.trained}
            gpu -= sum(v for a, v in per.items() if parse_arch(a).preset == a)
        match = 0.0
        if j.rule == "measure":
            g = grid.groups[(ds, j.wildcards["group"])]
            match = measure_matchings(cfg, g) * lsa_s(g.width) * TRAINED
        rows.append(dict(rule=j.rule, what=" ".join(f"{k}={v}" for k, v in j.wildcards.items()),
                         saes=saes, reused=reused, steps=steps, gpu_s=gpu, match_s=match))
    # The chance jobs are the same jobs, with more widths: their added matchings.
    for name in cfg["datasets"]:
        new = set(study_grid.dataset_widths(cfg, grid, name))
        had = set(study_grid.dataset_widths(base, study_grid.Grid.of(base), name))
        per = cfg["chance"]["draws"] * 3 * (2 if cfg["datasets"][name]["source"] == "synthetic" else 1)
        extra = sum(per * lsa_s(w) for w in new - had)
        if extra:
            rows.append(dict(rule="chance (more widths)", what=f"dataset={name} widths="
                             + ",".join(map(str, sorted(new - had))), saes=0, reused=0, steps=0,
                             gpu_s=0.0, match_s=extra))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", type=Path, default=[REPO / "config" / "gpu.yaml"])
    a = p.parse_args()
    cfg = plan.load_config(a.configs, REPO / "config" / "schema.yaml")
    rows = added_jobs(cfg)
    print("| job | wildcards | SAEs (reused) | SAE-steps | GPU s | matching s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['rule']} | {r['what']} | {r['saes']} ({r['reused']}) | {r['steps']:,} | "
              f"{r['gpu_s']:.0f} | {r['match_s']:.0f} |")
    jobs = Counter(r["rule"] for r in rows if not r["rule"].startswith("chance"))
    gpu = sum(r["gpu_s"] for r in rows)
    match = sum(r["match_s"] for r in rows)
    longest = max(rows, key=lambda r: r["gpu_s"] + r["match_s"])
    print(f"| **added** | {dict(jobs)} | {sum(r['saes'] for r in rows)} "
          f"({sum(r['reused'] for r in rows)}) | {sum(r['steps'] for r in rows):,} | "
          f"**{gpu:.0f}** | **{match:.0f}** |")
    print(f"\nlongest added job: {longest['rule']} {longest['what']}: "
          f"{longest['gpu_s'] + longest['match_s']:.0f} s")


if __name__ == "__main__":
    main()
