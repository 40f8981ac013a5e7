"""Shared fixtures: small activation sets that several test files reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Parameters of the shared synthetic set (tests compare against them).
SYNTHETIC = {"d": 32, "atoms": 128, "k": 3, "rows": 20000, "noise": 0.01, "zipf": 1.0,
             "seed": 0, "heldout_fraction": 0.1, "rows_per_shard": 8192}


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> Path:
    """A synthetic activation set (d 32, 128 atoms, k 3, 20000 rows, noise 0.01, seed 0)
    with its ``truth/`` checkpoint; written once per test session (well under a second)."""
    from isae.data.sources import synthetic

    out = tmp_path_factory.mktemp("sets") / "synthetic"
    synthetic.extract(out=str(out), **SYNTHETIC)
    return out
