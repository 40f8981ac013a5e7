"""Activation sources: synthetic ground truth, language models, vision backbones.

Each module has ``extract(out, ...) -> dict`` writing one activation set (isae.data.activations format)
and returning the JSON summary for the command line.
"""

from __future__ import annotations

import platform
from importlib import metadata

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


def check_layout(heldout_fraction: float, rows_per_shard: int) -> None:
    """The options every source shares: the held-out fraction and the shard size."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
