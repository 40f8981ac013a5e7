#!/usr/bin/env bash
# The measurements that need the GPU to themselves, run by session.sh around the study,
# each with its own time limit, each writing its table into $BENCH (they travel back with
# the run under device/). A session whose device time runs out keeps the ones that finished.
#
#   BEFORE='bash benchmarks/device/after.sh before' \
#   AFTER='bash benchmarks/device/after.sh after' run_study.sh start config/gpu.yaml -- ...
#
# before: the GPU tests and the grouped-training check, which decide whether the study may
#   train its SAEs in groups (gpu_tests below; a failure writes ISAE_GROUPED=0 into $RUN_ENV,
#   which session.sh sources before Snakemake), then the short timing targets (#26's group
#   and switches, #23's matcher at 24 576), so that they are measured even if the study uses
#   the rest.
# gate: the same decision alone (for a session whose benchmarks an earlier one measured).
# after: the longer measurements, most wanted first.
# tests: the GPU tests alone, as AFTER (on the idle GPU once the study has ended).
# short: the GPU tests, the rerun spread and the grouped check alone, for a session with
#   minutes of device time and no study (run directly, BENCH=$OUT).
# side_start [PART] / side_wait: measurements beside the study rather than after it:
#   side_start (as BEFORE) starts PART in the background (side, session B's, by default;
#   side_a for session A; side_tests, the GPU tests alone), side_wait (as AFTER) waits for
#   it. The study's early jobs (extraction, the lr sweeps) leave the GPU mostly idle, and a
#   lent session is too short to run them one after the other.
# profile: #26's group profile on an idle GPU (as AFTER, once the study has ended).
# Each benchmark's own docstring says what it measures; here only the order and the limits.
set -u
BENCH=${BENCH:?run by session.sh, which sets BENCH}
part=${1:-after}
acts=${ACTS:-results/activations/minilm}
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%H:%M:%S) $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$BENCH/$name.log" 2>&1
  local rc=$?
  echo "== $(date +%H:%M:%S) $name exit code $rc"
  tail -n 30 "$BENCH/$name.log"
  return $rc
}
no_groups() {
  echo "== $1: the study trains its SAEs one by one (ISAE_GROUPED=0)"
  echo "export ISAE_GROUPED=0" >> "${RUN_ENV:?run by session.sh, which sets RUN_ENV}"
}
group_check() {
  # group_bench's group and check sections (and any others named in $1, comma-led): a group
  # of 9 SAEs against the same 9 trained one by one, within 2 % in held-out FVU, or the
  # study trains one by one.
  step group_bench 240 python3 benchmarks/group_bench.py --out "$BENCH/group_bench.json" \
    --only "group,check${1:-}"
  grep -q "check: PASS" "$BENCH/group_bench.log" || no_groups "group_bench's check did not pass"
}
run_gpu_tests() {  # $1: time limit (s)
  step gpu_tests "$1" python3 -m pytest -q -p no:cacheprovider tests/test_fast_gpu.py \
    tests/test_group.py tests/test_recipes.py
}
run_rerun_spread() {  # $1: time limit (s)
  step rerun_spread "$1" python3 benchmarks/rerun_spread.py --device cuda \
    --out "$BENCH/rerun_spread.json"
}
gpu_tests() {
  # The GPU tests; if a grouped-training test fails, the study's own shape decides
  # (group_check). (A unit test's tolerance can be wrong on a GPU it never ran on:
  # 2026-12-06, six of them were.)
  run_gpu_tests 180 && return 0
  grep -qE "^FAILED.*(group|stacked)" "$BENCH/gpu_tests.log" || return 0
  echo "== a grouped-training test failed on the GPU; the group's check at the study's shape decides"
  group_check "${1:-}"
}
case "$part" in
  gate)
    gpu_tests
    ;;
  before)
    # #26: a group of 9 SAEs against the same 9 one after another, the group's correctness
    # check, and every switch combination's step at width 12 288 (once, whether or not the
    # tests needed the check).
    gpu_tests ,switches
    [ -f "$BENCH/group_bench.log" ] || group_check ,switches
    # #23: the certified matcher at the paper's width against scipy on the same matrices
    # (scipy stopped after 60 s: the dense solver's time there is a lower bound).
    step match_bench 150 python3 benchmarks/match_bench.py --device cuda --sizes 24576 --d 768 \
      --kinds trained --cli --scipy-timeout 60 --out "$BENCH/match_bench.json"
    ;;
  after)
    # #25: the dead-latent recipes at 32 x d on the study's own MiniLM set.
    if [ -d "$acts" ]; then
      step width_bench 420 python3 benchmarks/width_bench.py --activations "$acts" --device cuda \
        --widths 12288 --table "$BENCH/width_bench.parquet"
    fi
    # #24: how far two identical trainings land on this GPU.
    run_rerun_spread 240
    # #26 item 3: what the thresholding steps cost, with and without gradient.
    step iter_bench 240 python3 benchmarks/iter_bench.py --part throughput \
      --out "$BENCH/iter_bench.json"
    ;;
  side_start)
    # Same process group as session.sh (no setsid): run_study.sh stop ends it too.
    side=${2:-side}
    case "$side" in side|side_a|side_tests) ;; *) echo "after.sh: error: side_start runs side, side_a or side_tests, not $side" >&2; exit 2 ;; esac
    nohup bash "$0" "$side" > "$BENCH/side.log" 2>&1 < /dev/null &
    echo "== side measurements ($side) started in the background (pid $!), log: $BENCH/side.log"
    ;;
  side_a)
    # Session A's: #25's dead isae-iter latents at 32 x d (24 % in the width run of
    # 2026-12-06, with the study's recipe: tied codes' AuxK detached, 200 000-row window, 1 x).
    # Its latents die in the first few M rows, so 10 M rows per run show it: the study's own
    # recipe (detached), no AuxK (noaux), AuxK through the codes (isae), the 20 000-row
    # window with detached codes (live), each at 0.25 and 1 x, and sparsify's recipe.
    for _ in $(seq 1 240); do [ -f "$acts/meta.json" ] && break; sleep 5; done
    if [ -f "$acts/meta.json" ]; then
      step width_bench_iter 420 python3 benchmarks/width_bench.py --activations "$acts" \
        --device cuda --archs isae-iter --widths 12288 --recipes detached,noaux,isae,live,sparsify \
        --lr-factors 0.25,1 --tokens 10000000 \
        --table "$BENCH/width_bench_iter.parquet"
      # The same recipe on the reference op set (float32 throughout), where the fast one
      # picks the thresholding steps' supports and AuxK's codes in bfloat16: a CPU stand-in
      # in float32 did not lose isae-iter's latents (benchmarks/dead_latents_iter.md).
      ISAE_REFERENCE_OPS=1 step width_bench_iter_ref 300 python3 benchmarks/width_bench.py \
        --activations "$acts" --device cuda --archs isae-iter --widths 12288 --recipes detached \
        --lr-factors 1 --tokens 5000000 --table "$BENCH/width_bench_iter_ref.parquet"
    else
      echo "== no activation set at $acts after 20 min: width_bench_iter skipped"
    fi
    touch "$BENCH/side.done"
    ;;
  side_tests)
    # The GPU tests alone, recorded beside a study whose other side measurements earlier
    # sessions made (they decide nothing here: the study is already running).
    run_gpu_tests 240
    touch "$BENCH/side.done"
    ;;
  tests)
    # The GPU tests on the idle GPU, as AFTER: beside the study's first jobs they ran out of
    # 240 s twice (sessions B2 and B3); alone they took 40 s (2026-12-07).
    run_gpu_tests 240
    ;;
  profile)
    step group_profile 120 python3 benchmarks/group_bench.py --only profile \
      --out "$BENCH/group_profile.json"
    ;;
  side)
    # Waits for the study's own MiniLM set (the extraction writes it under a temporary name
    # and renames it whole), then: #25's dead-latent recipes at 32 x d, #24's run-to-run
    # spread, #26's group profile, and the GPU tests where no gate ran them (recorded
    # only: here they decide nothing for the study, which is already running).
    for _ in $(seq 1 240); do [ -f "$acts/meta.json" ] && break; sleep 5; done
    if [ -f "$acts/meta.json" ]; then
      # sparsify's recipe alone, at the study's budget at 32 x d (40 M rows): the anchor
      # beside the study's own 32 x d runs (the isae recipe at 1 x, which MiniLM's sweeps
      # chose for all three archs at 4 and 16 x d on 2026-12-06, under the tie rule).
      step width_bench 480 python3 benchmarks/width_bench.py --activations "$acts" --device cuda \
        --widths 12288 --recipes sparsify --tokens 40000000 --table "$BENCH/width_bench.parquet"
    else
      echo "== no activation set at $acts after 20 min: width_bench skipped"
    fi
    run_rerun_spread 240
    # #26: where a group step's time goes (torch.profiler), for the 3x target
    step group_profile 120 python3 benchmarks/group_bench.py --only profile \
      --out "$BENCH/group_profile.json"
    # (not again where the gate ran them before the study)
    [ -f "$BENCH/gpu_tests.log" ] || run_gpu_tests 240
    touch "$BENCH/side.done"
    ;;
  short)
    # A session with only a few minutes of device time (no study): the GPU tests, the rerun
    # spread and the grouped check at the study's shape, each short.
    run_gpu_tests 240
    run_rerun_spread 150
    step group_bench 150 python3 benchmarks/group_bench.py --out "$BENCH/group_bench.json" \
      --only group,check
    ;;
  side_wait)
    for _ in $(seq 1 360); do [ -f "$BENCH/side.done" ] && break; sleep 5; done
    tail -n 80 "$BENCH/side.log"
    ;;
  *) echo "after.sh: error: part must be gate, before, after, tests, short, side_start, side, side_a, side_tests, side_wait or profile, not $part" >&2; exit 2 ;;
esac
exit 0
