"""Tie a device run to a commit: the device's copy of the repository has no .git.

    python3 tree_stamp.py make REPO STAMP     here: the commit, and a Git blob hash of every
                                              tracked file as it is in the working tree
    python3 tree_stamp.py check REPO STAMP    there: one line saying whether the copy the run
                                              uses holds exactly those files

Git's blob hash (SHA-1 of ``blob <size>\\0`` + content) is used so that ``git ls-tree -r
COMMIT`` checks a stamp independently. ``make`` notes the files whose content differs from
the commit, and hashes the untracked files that travel too (the device tool copies them).

Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def blob_hash(path: Path) -> str:
    data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def make(repo: Path) -> dict:
    commit = _git(repo, "rev-parse", "HEAD").strip()
    at_commit = {}
    for line in _git(repo, "ls-tree", "-r", "HEAD").splitlines():
        meta, path = line.split("\t", 1)
        at_commit[path] = meta.split()[2]
    tracked = [p for p in _git(repo, "ls-files", "-z").split("\0") if p]
    untracked = [p for p in _git(repo, "ls-files", "-z", "-o", "--exclude-standard").split("\0") if p]
    # Both travel to the device: both are checked there.
    files = {p: blob_hash(repo / p) for p in tracked + untracked if (repo / p).exists()}
    changed = sorted(p for p in set(tracked) | set(at_commit)
                     if files.get(p) != at_commit.get(p))
    return {"commit": commit, "files": files, "changed_from_commit": changed,
            "untracked": sorted(untracked)}


def check(repo: Path, stamp: dict) -> str:
    differ = [p for p, h in stamp["files"].items()
              if not (repo / p).exists() or blob_hash(repo / p) != h]
    head = stamp["commit"]
    if stamp["changed_from_commit"]:
        head += f" + uncommitted changes in {len(stamp['changed_from_commit'])} files (" + \
            ", ".join(stamp["changed_from_commit"][:10]) + ")"
    if stamp["untracked"]:
        head += f"; untracked files present: {', '.join(stamp['untracked'][:10])}"
    if differ:
        return (f"{head}; the run's copy DIFFERS from the stamp in {len(differ)} files: "
                + ", ".join(differ[:10]))
    return f"{head}; the run's copy matches the stamp ({len(stamp['files'])} files checked)"


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] not in ("make", "check"):
        print("usage: tree_stamp.py make|check REPO STAMP", file=sys.stderr)
        return 2
    repo, stamp = Path(argv[2]), Path(argv[3])
    if argv[1] == "make":
        s = make(repo)
        stamp.write_text(json.dumps(s, indent=1) + "\n")
        state = "clean" if not s["changed_from_commit"] else f"{len(s['changed_from_commit'])} files changed"
        print(f"stamp {stamp}: {s['commit']} ({state}; {len(s['untracked'])} untracked files)")
        return 0
    try:
        print(check(repo, json.loads(stamp.read_text())))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"unknown: cannot read the stamp {stamp} ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
