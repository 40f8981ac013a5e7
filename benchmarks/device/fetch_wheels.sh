#!/usr/bin/env bash
# Download, here, the wheels that the device machine needs beyond its image
# (benchmarks/device/wheels.txt: snakemake and its closure, transformer-lens and what it
# imports) into .whl/ (git-ignored), check them against the image's package list, and print
# their total size. The isae package itself travels as source (PYTHONPATH=src).
#
#   benchmarks/device/fetch_wheels.sh                       # CPython 3.12 wheels into .whl/
#   benchmarks/device/fetch_wheels.sh --python 3.11 --dest DIR   # e.g. for a CPU smoke run
#
# A new download replaces the folder only once every wheel has arrived, so an interrupted
# run leaves the old set in place.
set -euo pipefail
cd "$(dirname "$0")/../.."
pyver=3.12
dest=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python) pyver=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    *) echo "fetch_wheels.sh: unknown argument $1 (use --python X.Y, --dest DIR)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
stage="$dest.tmp-$$"
rm -rf "$stage"
trap 'rm -rf "$stage"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp "${platforms[@]}" -d "$stage" -r benchmarks/device/wheels.txt \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
want=$(grep -cvE '^\s*(#|$)' benchmarks/device/wheels.txt)
got=$(find "$stage" -name '*.whl' | wc -l)
if [ "$want" != "$got" ]; then
  echo "fetch_wheels.sh: expected $want wheels, downloaded $got" >&2
  exit 1
fi
rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
"$py" benchmarks/device/check_wheels.py "$dest"
