"""How long a benchmark's thread waits on isae.data.stream's shard decodes (``Future.result``)."""

from __future__ import annotations

import concurrent.futures as cf
import time


class ReadWaits:
    """While active, every ``Future.result`` call adds its wall time to ``seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> ReadWaits:
        self._result = result = cf.Future.result

        def timed(fut, timeout=None):
            t = time.perf_counter()
            try:
                return result(fut, timeout)
            finally:
                self.seconds += time.perf_counter() - t

        cf.Future.result = timed
        return self

    def __exit__(self, *exc) -> None:
        cf.Future.result = self._result
