"""The progress bar every long stage shows on stderr."""

from __future__ import annotations

import sys

from tqdm import tqdm

#: False under ``isae -q``: quiet means warnings and errors only, so that a failure is the
#: one line on stderr.
ENABLED = True


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    """A progress bar on stderr; in logs (not a terminal) it updates every 10 s."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        file=sys.stderr,
        mininterval=0.5 if tty else 10.0,
        dynamic_ncols=tty,
        disable=not ENABLED,
        **kw,
    )
