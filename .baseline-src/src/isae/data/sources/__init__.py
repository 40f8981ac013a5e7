"""Activation sources: synthetic ground truth, language models, vision backbones.

Each module has ``extract(out, ...) -> dict`` writing one activation set (isae.data.activations format)
and returning the JSON summary for the command line.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from isae.data.atomic import check_out
from isae.errors import UserError


def package_versions(*names: str) -> dict[str, str]:
    """Python and the named packages' versions, for meta.json provenance."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def check_layout(heldout_fraction: float, rows_per_shard: int, seed: int = 0) -> None:
    """The options every source shares: the held-out fraction, the shard size, the seed."""
    from isae.models.config import MAX_SEED, check_int

    check_int("--seed", seed, 0, MAX_SEED)
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")


def local_inputs(*names: str | os.PathLike | None) -> list[str]:
    """Those of ``names`` that are existing files or folders (a text or image source, a
    model folder): what an extract must never write over."""
    return [str(n) for n in names if n and Path(n).expanduser().exists()]


def check_extract_out(out: str | os.PathLike, inputs: list[str], force: bool) -> None:
    """Before any work: ``out`` may be replaced only if it is an activation set (or with
    ``force``), and never overlaps an input (isae.data.atomic.check_out)."""
    check_out(out, "activations", inputs=inputs, force=force)
