"""Writes width-minilm.yaml, the config of the device session that runs MiniLM's width axis
alone, from config/gpu.yaml, so that the two cannot drift apart (a test checks the file
against this script's output).

    python3 benchmarks/device/width_config.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE / "width-minilm.yaml"

HEADER = """\
# MiniLM's width axis alone (T3, F9 at 4, 8, 16 and 32 x d), for a lent GPU session: the
# 30 minutes of one are too few for it beside the rest of config/gpu.yaml, which the other
# session runs with `--config 'width_study={datasets: [synthetic, wellposed]}'`
# (benchmarks/device/README.md). A full config, config/gpu.yaml with the synthetic sets,
# the k sweep, the budget axis at 4 x d, the ablation, the iteration study, the references
# and the fidelity left out; the budget axis at 32 x d (width_axis.per_width) stays. Written
# by benchmarks/device/width_config.py: edit config/gpu.yaml and run that, not this file
# (config/gpu.yaml says why each value is what it is).
#
#   run_study.sh start benchmarks/device/width-minilm.yaml -- --resources gpu=4 --keep-going
#
# The second lr sweep (16 x d) is left out too: the H100 run of 2026-12-06 made it
# (results-gpu/partial-h100/lr/minilm-w6144/sweep.parquet) and it chose 1 x for all three
# architectures, the factor the 4 x d sweep chose, so every width trains at the 4 x d sweep's
# factor carried by sqrt(1536 / width), the rule that sweep confirmed.
"""


def width_config(gpu: dict) -> dict:
    """config/gpu.yaml's dict -> the width session's: MiniLM's main grid and width axis."""
    cfg = {**gpu, "datasets": {"minilm": gpu["datasets"]["minilm"]}}
    for key, field in (("sweep", "archs"), ("ablation", "datasets"), ("iter", "datasets"),
                       ("references", "datasets")):
        cfg[key] = {**gpu[key], field: []}
    cfg["width_study"] = {**gpu["width_study"], "datasets": ["minilm"]}
    m = cfg["datasets"]["minilm"]
    cfg["datasets"]["minilm"] = {
        **m, "fidelity": False,
        "train": {**m["train"], "budgets": [], "ks": []},
        "width_axis": {**m["width_axis"], "lr_sweep_width": None},
    }
    return cfg


def text() -> str:
    gpu = yaml.safe_load((REPO / "config" / "gpu.yaml").read_text())
    return HEADER + yaml.safe_dump(width_config(gpu), sort_keys=False, width=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    a = p.parse_args()
    if a.check:
        if OUT.read_text() != text():
            sys.exit(f"{OUT} is out of date: run python3 benchmarks/device/width_config.py")
        return
    OUT.write_text(text())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
