#!/usr/bin/env bash
# One GPU session for the device-resident training data: the GPU tests, then every
# measurement before (--data-on-device never: the streaming path train used before) and
# after (auto: the split held on the device), then one compact table.
#
#   bash benchmarks/gpu_session.sh            # on the H200, from the repository root; ~5 minutes
#   bash benchmarks/gpu_session.sh --smoke    # anywhere (CPU), tiny shapes: checks the script end to end
#
# Full logs and the JSON rows go to $OUT (a new temporary folder if unset); the activation
# set the benchmarks share goes to a temporary folder outside $OUT and is removed at exit.
# Each step runs under a time limit taken from a session budget (ISAE_SESSION_BUDGET,
# seconds, default 540), so the table is printed even when a step hangs; a failed step is
# reported and the next one runs.

set -u
cd "$(dirname "$0")/.."
SMOKE=${ISAE_SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src}
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SET="$WORK/acts"
BUDGET=${ISAE_SESSION_BUDGET:-540}
START=$(date +%s)

if [[ $SMOKE == 1 ]]; then
  SHAPE=(--device cpu --d 64 --width 512 --k 8 --batch 256)
  LOOP=(--rows 40000 --tokens 60000)
  SEEDS=(--seed-rows 40000 --seed-tokens 30000)
  AFTER=always  # on the CPU, auto streams: always exercises the device-resident path
else
  SHAPE=(--device cuda --d 768 --width 24576 --k 32 --batch 8192)
  LOOP=(--rows 1081344 --tokens 8000000)
  SEEDS=(--seed-rows 1081344 --seed-tokens 8000000)
  AFTER=auto
fi

# run NAME LIMIT CMD...: stdout to the console (its tables left out) and $OUT/NAME.log,
# stderr to $OUT/NAME.err; at most LIMIT seconds, less when the session budget runs short.
run() {
  local name=$1 limit=$2
  shift 2
  local now left t0 rc
  now=$(date +%s)
  left=$((BUDGET - (now - START) - 15))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "[$name] SKIPPED: the session budget ($BUDGET s) is spent"
    return
  fi
  echo "[$name] started at +$((now - START)) s (limit $limit s): $*"
  t0=$(date +%s)
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.log" | grep -v '^|'
  rc=${PIPESTATUS[0]}
  local what="ok"
  ((rc == 124)) && what="TIMED OUT"
  ((rc != 0 && rc != 124)) && what="FAILED (tail of $name.err below)"
  echo "[$name] rc $rc, $what, $(($(date +%s) - t0)) s"
  if ((rc != 0 && rc != 124)); then tail -n 5 "$OUT/$name.err"; fi
}

run pytest 180 python3 -m pytest -q -p no:cacheprovider tests/test_fast_gpu.py tests/test_graphs.py \
  tests/test_resident.py
run loop_after 120 python3 benchmarks/loop_bench.py "${SHAPE[@]}" "${LOOP[@]}" --set "$SET" \
  --data-on-device $AFTER --json "$OUT/loop_after.json"
run seeds_after 120 python3 benchmarks/gpu_bench.py --only seeds "${SHAPE[@]}" "${SEEDS[@]}" \
  --set "$SET" --data-on-device $AFTER --out "$OUT/seeds_after.json"
run iter 90 python3 benchmarks/gpu_bench.py --only iter "${SHAPE[@]}" --out "$OUT/iter.json"
run loop_before 120 python3 benchmarks/loop_bench.py "${SHAPE[@]}" "${LOOP[@]}" --set "$SET" \
  --data-on-device never --json "$OUT/loop_before.json"
run seeds_before 120 python3 benchmarks/gpu_bench.py --only seeds "${SHAPE[@]}" "${SEEDS[@]}" \
  --set "$SET" --data-on-device never --out "$OUT/seeds_before.json"
echo
echo "pytest: $(grep -E 'passed|failed|error' "$OUT/pytest.log" | tail -n 1)"
echo "session: $(($(date +%s) - START)) s; logs and JSON in $OUT"
echo
python3 benchmarks/session_table.py "$OUT"
