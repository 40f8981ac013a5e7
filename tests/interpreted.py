"""Run Python in a subprocess under Triton's interpreter (TRITON_INTERPRET must be set
before Triton compiles anything, so it cannot be switched on inside the test process)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_interpreted(argv: list[str], timeout: float, cwd: Path | None = None,
                    env: dict | None = None) -> subprocess.CompletedProcess:
    """``python argv...`` with the interpreter on, this project's src and tests (helpers
    such as opsets) first on the path; captured output."""
    paths = (str(ROOT / "src"), str(TESTS), os.environ.get("PYTHONPATH"))
    full = {**os.environ, **(env or {}), "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run([sys.executable, *argv], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
