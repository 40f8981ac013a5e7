"""What config/paper.yaml's training would cost on H200s, from the training tokens its DAG
plans per architecture and the training rates measured on one H200
(benchmarks/RESULTS.md, "GPU, fifth session": d 768, width 24 576, k 32, batch 8 192,
the paper's Pythia and DINOv2 shape; the synthetic set's d 512 / width 8 192 is costed at
the same rate, which overstates it).

    python3 benchmarks/paper_cost.py [--config config/paper.yaml]

Measured: the TopK family's graphed step from device-resident data (3.20 M tok/s) and
isae-iter's 3 thresholding steps (0.76 M tok/s). The rate at 1 and 10 steps is a straight
line through those two points in the time per token (each thresholding step costs the same),
an interpolation, not a measurement. relu and dl have no H200 measurement at this shape:
their tokens are listed apart, not costed.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from isae.models.config import parse_arch
from isae.study import plan

REPO = Path(__file__).resolve().parents[1]

TOPK_RATE = 3.20e6  # tok/s, topk family, from disk via the device-resident split
ITER3_RATE = 0.76e6  # tok/s, isae-iter (3 thresholding steps), CUDA graph


def iter_rate(steps: int) -> float:
    """Tokens/s with ``steps`` thresholding steps: time per token linear in the steps,
    through the two measured points (0 and 3 steps)."""
    per_step = (1 / ITER3_RATE - 1 / TOPK_RATE) / 3
    return 1 / (1 / TOPK_RATE + steps * per_step)


def encoder_steps(arch: str) -> int:
    """Thresholding steps of an arch name, as the SAE family reads it (isae-iter: 3,
    +iterN: N, +iter: 3)."""
    return int(parse_arch(arch).fields["encoder_steps"])


def planned_tokens(config: Path) -> dict[str, int]:
    """Training tokens per arch over every train and lr_sweep job of the plan (the study's
    grid, isae.study.plan.jobs)."""
    cfg = plan.load_config([config], REPO / "config" / "schema.yaml")
    tokens: dict[str, int] = defaultdict(int)
    for job in plan.jobs(cfg):
        for t in job.trained:
            tokens[t.arch] += t.saes * t.rows
    return dict(tokens)


def costed(tokens: dict[str, int]) -> list[dict]:
    """One row per class of SAE: its tokens, its rate (None: never measured on a GPU, not
    costed) and GPU-hours, largest costed class first."""
    classes: dict[str, dict] = {}
    for arch, t in tokens.items():
        if arch in ("relu", "dl"):
            name, rate, how = f"{arch} (not measured on a GPU)", None, "n/a"
        else:
            s = encoder_steps(arch)
            rate = iter_rate(s)
            name = ("TopK family, no thresholding step" if s == 0
                    else f"{s} thresholding step{'s' if s > 1 else ''}")
            how = ("measured" if s in (0, 3) else "interpolated") + f", {rate / 1e6:.2f} M tok/s"
        c = classes.setdefault(name, {"name": name, "tokens": 0, "rate": rate, "how": how})
        c["tokens"] += t
    for c in classes.values():
        c["hours"] = None if c["rate"] is None else c["tokens"] / c["rate"] / 3600
    return sorted(classes.values(), key=lambda c: (c["hours"] is None, -c["tokens"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "config" / "paper.yaml")
    a = p.parse_args()
    rows = costed(planned_tokens(a.config))
    print("| SAEs | training tokens | rate on one H200 | GPU-hours |")
    print("| --- | ---: | --- | ---: |")
    for c in rows:
        hours = "n/a" if c["hours"] is None else f"{c['hours']:.2f}"
        print(f"| {c['name']} | {c['tokens'] / 1e9:.2f} B | {c['how']} | {hours} |")
    done = [c for c in rows if c["hours"] is not None]
    print(f"| **all costed** | {sum(c['tokens'] for c in done) / 1e9:.2f} B | | "
          f"**{sum(c['hours'] for c in done):.1f}** |")


if __name__ == "__main__":
    main()
