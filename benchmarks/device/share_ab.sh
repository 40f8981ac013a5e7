#!/usr/bin/env bash
# There, in a finished study's work copy (/tmp/isae-device/repo): four of the study's `train`
# commands (the synthetic sets' iteration, main and ablation groups) one after another on the idle
# GPU, then all four at once, as `--resources gpu=4` lets Snakemake run them. Each job's wall
# time and the total, one line each, into $OUT/share-ab.txt: how much of a job's seconds in
# a study is other jobs' time on a time-sliced GPU.
#   bash benchmarks/device/share_ab.sh [MODES]   (MODES: "serial shared", the default)
set -u
dev=${ISAE_DEVICE:-/tmp/isae-device}
cd "$dev/repo" || exit 2
export PYTHONPATH=src:$dev/site PYTHONPYCACHEPREFIX=$dev/pycache
unset PYTHONDONTWRITEBYTECODE
log=${OUT:-.}/share-ab.txt
jobs=(
  "synthetic isae+iter,isae+iter1,isae+iter10 0,1,2 8 256 5000000 1024 iter"
  "synthetic topk,isae,isae-iter 0,1,2 8 256 5000000 1024 main"
  "wellposed topk,isae,isae-iter 0,1,2 4 512 10000000 1024 main"
  "wellposed isae-nobias,isae-signed,isae-tied,topk+iter,topk+nobias,topk+signed,topk+tied 0,1,2 4 512 10000000 1024 ablation"
)
one() {  # MODE INDEX
  read -r ds archs seeds k width tokens batch tag <<< "${jobs[$2]}"
  local t0 t1
  t0=$(date +%s%N)
  python3 -m isae --threads 2 train --activations "results/activations/$ds" --arch "$archs" \
    --seeds "$seeds" --data-seed 0 --k "$k" --width "$width" --tokens "$tokens" \
    --batch-size "$batch" --device cuda --lr-from "results/lr/$ds/lr.json" \
    --reuse "results/lr/$ds/ckpt" --out "/tmp/share-$1/$ds-$tag/{arch}/seed{seed}" \
    > "/tmp/share-$1-$2.log" 2>&1
  local rc=$?
  t1=$(date +%s%N)
  echo "$1 $ds-$tag: $(( (t1 - t0) / 1000000 )) ms (exit $rc)" >> "$log"
}
for mode in ${1:-serial shared}; do
  rm -rf "/tmp/share-$mode"
  t0=$(date +%s%N)
  if [ "$mode" = serial ]; then
    for i in 0 1 2 3; do one serial $i; done
  else
    for i in 0 1 2 3; do one shared $i & done
    wait
  fi
  t1=$(date +%s%N)
  echo "$mode total wall: $(( (t1 - t0) / 1000000 )) ms" >> "$log"
done
cat "$log"
