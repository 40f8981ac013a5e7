"""Check a folder of wheels against the device image: what each wheel requires (its
Requires-Dist, markers evaluated for CPython 3.12 on Linux x86_64, no extras) must be another
wheel of the folder, a package of the image (image-packages.txt), or a package left out on
purpose (wheels.txt's comment says why). Prints one line per wheel and the total size.

    python3 benchmarks/device/check_wheels.py .whl

Exit code 1 when a requirement is in none of the three, or a name has two wheels.
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
#: Declared by the carried packages but not imported by the study's runs (wheels.txt says
#: which code path would need each).
LEFT_OUT = {"pulp", "docutils", "gitpython", "conda-inject", "connection-pool", "jupyter-core",
            "greenlet", "wandb", "beartype", "fancy-einsum", "typeguard",
            "transformers-stream-generator"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = HERE / "image-packages.txt") -> set[str]:
    return {norm(line.strip()) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of one wheel."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(name).decode("utf-8"))
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


def main(argv: list[str]) -> int:
    folder = Path(argv[1] if len(argv) > 1 else ".whl")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"check_wheels: no wheels in {folder}", file=sys.stderr)
        return 2
    image = image_packages()
    meta = {w: wheel_metadata(w) for w in wheels}
    names: dict[str, list[str]] = {}
    for name, version, _ in meta.values():
        names.setdefault(norm(name), []).append(version)
    bad = 0
    for name, versions in names.items():
        if len(versions) > 1:
            print(f"TWO VERSIONS of {name}: {versions}")
            bad += 1
    for name, version, reqs in meta.values():
        gaps, skipped = [], []
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(ENV):
                continue
            n = norm(req.name)
            if n in names or n in image:
                continue
            (skipped if n in LEFT_OUT else gaps).append(n)
        note = f"; left out: {', '.join(sorted(set(skipped)))}" if skipped else ""
        if gaps:
            bad += 1
            print(f"{name} {version}: MISSING {', '.join(sorted(set(gaps)))}{note}")
        else:
            print(f"{name} {version}: ok{note}")
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {folder}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
