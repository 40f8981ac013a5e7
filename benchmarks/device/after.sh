#!/usr/bin/env bash
# The measurements that need the GPU to themselves, run by session.sh (AFTER) once the
# study has ended, most wanted first, each with its own time limit, each writing its table
# into $BENCH (they travel back with the run under device/). A session whose device time
# runs out keeps the ones that finished.
#
#   AFTER='bash benchmarks/device/after.sh' run_study.sh start config/gpu.yaml -- ...
#
# Each benchmark's own docstring says what it measures; here only the order and the limits.
set -u
BENCH=${BENCH:?run by session.sh, which sets BENCH}
acts=${ACTS:-results/activations/minilm}
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%H:%M:%S) $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$BENCH/$name.log" 2>&1
  echo "== $(date +%H:%M:%S) $name exit code $?"
  tail -n 30 "$BENCH/$name.log"
}
# #26: a group of 9 SAEs against the same 9 one after another, the group's correctness
# check, and every switch combination's step at width 12 288.
step group_bench 360 python benchmarks/group_bench.py --out "$BENCH/group_bench.json" \
  --only group,check,switches
# #23: the certified matcher at the paper's width against scipy on the same matrices.
step match_bench 420 python benchmarks/match_bench.py --device cuda --sizes 24576 --d 768 \
  --kinds trained --cli --scipy-timeout 240 --out "$BENCH/match_bench.json"
# #25: the dead-latent recipes at 32 x d on the study's own MiniLM set.
if [ -d "$acts" ]; then
  step width_bench 420 python benchmarks/width_bench.py --activations "$acts" --device cuda \
    --widths 12288 --table "$BENCH/width_bench.parquet"
fi
# #24: how far two identical trainings land on this GPU.
step rerun_spread 240 python benchmarks/rerun_spread.py --device cuda \
  --out "$BENCH/rerun_spread.json"
# #26 item 3: what the thresholding steps cost, with and without gradient.
step iter_bench 240 python benchmarks/iter_bench.py --part throughput --out "$BENCH/iter_bench.json"
