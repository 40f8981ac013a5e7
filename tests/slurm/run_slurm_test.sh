#!/usr/bin/env bash
# The study's DAG on a real (single-node) Slurm, through workflow/profiles/slurm.
#
#   bash tests/slurm/run_slurm_test.sh          # as root; installs what it needs
#
# 1. setup_slurm.sh installs slurm-wlm/munge/slurmdbd/MariaDB if missing and starts a
#    private cluster under $ISAE_SLURM_STATE (default /tmp/isae-slurm).
# 2. The workflow on a reduced config (tests/slurm/tiny.yaml) with --profile: every job of
#    the DAG must have run as one Slurm job and COMPLETED, under the account and partition
#    the profile's placeholders were given, none holding a GPU (device: cpu) -- checked
#    from sacct by check_sacct.py against a dry run. A second run has nothing to do, and
#    the two-pass recipe of docs/slurm.md (device changed, --rerun-triggers mtime) keeps
#    the finished checkpoints.
# 3. device: cuda: a training job must be granted a GPU (a stand-in gres on this GPU-less
#    node) -- the rules' `gpu` resource reaches Slurm through the profile.
# 4. Time limit (tests/slurm/mini/Snakefile, run beside step 2): a job that Slurm kills
#    (TIMEOUT) fails the workflow with a message naming the rule and the Slurm job id,
#    leaves no half-written output that counts as done, and a rerun with the limit
#    raised completes.
# 5. Teardown stops exactly the daemons setup started.
#
# Ends with "slurm: N passed, M failed"; exits non-zero if anything failed.
# About 6-7 minutes on 2 cores, most of it Slurm's 30 s time-limit checks and the
# executor's growing sacct polling interval.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/tests/slurm
export ISAE_SLURM_STATE=${ISAE_SLURM_STATE:-/tmp/isae-slurm}
WORK=$ISAE_SLURM_STATE/work
PROFILE=$REPO/workflow/profiles/slurm
# The executor's first sacct poll after 5 s instead of the profile's 20 s.
FAST=(--slurm-init-seconds-before-status-checks 5)
PASSED=0
FAILED=0
T_START=$SECONDS

say() { echo "[slurm-test $((SECONDS - T_START))s] $*"; }
ok() { PASSED=$((PASSED + 1)); say "PASS $*"; }
bad() { FAILED=$((FAILED + 1)); say "FAIL $*"; }
finish() {
  # Stopped early: end the background Snakemake (timeout passes TERM on to it).
  if [[ -n ${KILL_PID:-} && -f ${KILL:-/nonexistent}/run1.pid ]]; then
    kill "$(cat "$KILL/run1.pid")" 2>/dev/null; wait "$KILL_PID" 2>/dev/null
  fi
  say "stopping the daemons this test started"
  if bash "$HERE/teardown_slurm.sh"; then
    left=$(ls "$ISAE_SLURM_STATE/pids" 2>/dev/null | wc -l)
    if ((left == 0)); then ok "teardown: all started daemons stopped"; else bad "teardown: $left pid files left"; fi
  else
    bad "teardown"
  fi
  say "total $((SECONDS - T_START)) s; state and logs kept in $ISAE_SLURM_STATE"
  echo "slurm: $PASSED passed, $FAILED failed"
}
trap 'rc=$?; trap - EXIT; finish; exit $(( FAILED > 0 ? 1 : rc ))' EXIT
# Job stats line of a dry run ("train   4") -> the count, or nothing.
count_of() { awk -v r="$1" '$1 == r && $2 ~ /^[0-9]+$/ {print $2; exit}' "$2"; }
fresh_dir() { rm -rf "$1" && mkdir -p "$1" && cd "$1"; }

# ------------------------------------------------------------------------------ 1. cluster
if bash "$HERE/setup_slurm.sh"; then
  ok "setup: single-node Slurm with accounting up ($((SECONDS - T_START)) s)"
else
  bad "setup: see $ISAE_SLURM_STATE/log"
  exit 1
fi
# shellcheck disable=SC1091
source "$ISAE_SLURM_STATE/env.sh"
# The profile's documented placeholders, pointed at the test cluster.
export ISAE_SLURM_ACCOUNT=$ISAE_SLURM_TEST_ACCOUNT
export ISAE_SLURM_PARTITION=$ISAE_SLURM_TEST_PARTITION
export ISAE_SLURM_GPU_PARTITION=$ISAE_SLURM_TEST_PARTITION
mkdir -p "$WORK"
# The repository's Snakefile run from working directories under $WORK, so that results/,
# logs/, benchmarks/ and .snakemake/ stay out of the repository.
SMK=(-s "$REPO/Snakefile" --configfile "$HERE/tiny.yaml")
MINI=(-s "$HERE/mini/Snakefile")

# ------------------------------------------- 4a. the job killed at its limit, in background
KILL=$WORK/kill
fresh_dir "$KILL" || exit 1
(
  timeout 600 snakemake "${MINI[@]}" --profile "$PROFILE" "${FAST[@]}" \
    --config slow_runtime=1 > run1.log 2>&1 &
  echo $! > run1.pid
  wait $!
  echo $? > run1.rc
) &
KILL_PID=$!

# ----------------------------------------------------------------------- 2. the workflow
STUDY=$WORK/study
fresh_dir "$STUDY" || exit 1
if snakemake -n --cores 1 "${SMK[@]}" > dry.log 2>&1; then
  ok "dry run of the reduced config: $(count_of total dry.log) jobs"
else
  bad "dry run of the reduced config (see $STUDY/dry.log)"; tail -20 dry.log
fi
t0=$SECONDS
if timeout 1500 snakemake --profile "$PROFILE" "${FAST[@]}" "${SMK[@]}" > run.log 2>&1; then
  ok "workflow on Slurm completed in $((SECONDS - t0)) s"
else
  bad "workflow on Slurm (rc $?, $((SECONDS - t0)) s; log $STUDY/run.log)"; tail -40 run.log
fi
if python "$HERE/check_sacct.py" --run-log run.log --dry-run dry.log --account "$ISAE_SLURM_ACCOUNT" \
    --partition "$ISAE_SLURM_PARTITION" --gpu none --local all; then
  ok "sacct: every job of the DAG ran as a Slurm job and COMPLETED (no GPU under device: cpu)"
else
  bad "sacct check of the workflow run"
fi
snakemake -n --cores 1 "${SMK[@]}" > rerun.log 2>&1
if grep -q "Nothing to be done" rerun.log; then
  ok "rerun: nothing to be done after the Slurm run"
else
  bad "rerun: the dry run after the Slurm run still has jobs (see $STUDY/rerun.log)"
fi
# docs/slurm.md's two passes: switching `device` changes the jobs' --device flag, which
# alone reruns training; with --rerun-triggers mtime the checkpoints are kept.
snakemake -n --cores 1 "${SMK[@]}" --config device=cuda > pass2-params.log 2>&1
snakemake -n --cores 1 "${SMK[@]}" --config device=cuda --rerun-triggers mtime > pass2.log 2>&1
if [[ $(count_of train pass2-params.log) == "$(count_of train dry.log)" ]] \
  && grep -q "Nothing to be done" pass2.log; then
  ok "two passes: a device switch with --rerun-triggers mtime redoes no job"
else
  bad "two passes (see $STUDY/pass2*.log)"
fi

# --------------------------------------------------------------------- 3. GPU requests
# One training job under device: cuda. Its rule must ask Slurm for a GPU and be granted
# the node's stand-in one; `isae train --device cuda` then fails on this CUDA-less node,
# which is expected. Its input, the synthetic extraction, needs no GPU and must get none.
# The learning-rate sweep is left out: it is a GPU job that the group's training waits on,
# and on this node it would fail before the training job is ever submitted. The target is
# tiny.yaml's main group (every arch and seed at k 2, width 32, 8000 rows).
GPU=$WORK/gpu
fresh_dir "$GPU" || exit 1
target=results/checkpoints/synthetic/k2-w32-r8000
timeout 600 snakemake --profile "$PROFILE" "${FAST[@]}" "${SMK[@]}" \
  --config device=cuda "lr_sweep={factors: []}" -- "$target" > run.log 2>&1
gpu_job() {  # rule -> "State|AllocTRES" of its (first) Slurm job in run.log
  local id
  id=$(sed -n "s/.*SLURM jobid \([0-9]*\) (log: .*rule_$1\/.*/\1/p" run.log | head -1)
  [[ -n $id ]] && sacct -X -n -P -j "$id" -o State,AllocTRES | head -1
}
train_job=$(gpu_job train)
extract_job=$(gpu_job activations)
if [[ $train_job == *gres/gpu=1* && $extract_job == COMPLETED* && $extract_job != *gres/gpu* ]]; then
  ok "device: cuda -> the train job was granted gres/gpu=1 ($train_job); extraction got none"
else
  bad "GPU request under device: cuda: train '$train_job', activations '$extract_job' (log $GPU/run.log)"
  tail -20 run.log
fi

# ------------------------------------------------------------------ 4b. killed at the limit
cd "$KILL" || exit 1
wait "$KILL_PID"
KILL_PID=
rc=$(cat run1.rc 2>/dev/null || echo missing)
jobid=$(sed -n 's/.*has been submitted with SLURM jobid \([0-9]*\) (log: .*rule_slow\/.*/\1/p' run1.log | head -1)
state=$([[ -n $jobid ]] && sacct -X -n -P -j "$jobid" -o State,Timelimit | head -1)
if [[ $rc != 0 && $rc != 124 && $rc != missing && -n $jobid && $state == "TIMEOUT|00:01:00" ]]; then
  ok "time limit: Slurm killed job $jobid at 1 min (TIMEOUT), the workflow failed (rc $rc, $(sed -n 's/^Elapsed time: \([0-9:]*\).*/\1/p' run1.log))"
else
  bad "time limit: rc $rc, job '$jobid', sacct '$state' (log $KILL/run1.log)"; tail -30 run1.log
fi
# The error names the rule and the Slurm job, in one block.
if grep -A2 "^Error in rule slow:" run1.log > error.txt \
  && grep -q "SLURM-job '$jobid' failed, SLURM status is: 'TIMEOUT'" error.txt; then
  ok "time limit: the error names rule slow, Slurm job $jobid and TIMEOUT"
else
  bad "time limit: no error naming rule slow and Slurm job $jobid"; grep -A4 "Error in rule" run1.log
fi
# The job had written "started" into slow.txt when it was killed. That must not count as
# done: the file is gone and the next run schedules `slow` again.
snakemake -n "${MINI[@]}" --cores 1 > after-kill.log 2>&1
if [[ ! -e slow.txt && ! -e summary.txt && $(count_of slow after-kill.log) == 1 ]]; then
  ok "time limit: the half-written output was removed and slow is scheduled again"
else
  bad "time limit: output after the kill: $(ls | tr '\n' ' '); dry run in $KILL/after-kill.log"
fi
t0=$SECONDS
if timeout 600 snakemake "${MINI[@]}" --profile "$PROFILE" "${FAST[@]}" \
    --config slow_runtime=3 > run2.log 2>&1 \
  && [[ $(cat slow.txt 2>/dev/null) == $'started\nfinished' && $(tr -d ' ' < summary.txt) == 2 ]]; then
  jobid2=$(sed -n 's/.*SLURM jobid \([0-9]*\) (log: .*rule_slow\/.*/\1/p' run2.log | head -1)
  state2=$(sacct -X -n -P -j "$jobid2" -o State,Timelimit | head -1)
  if [[ $state2 == "COMPLETED|00:03:00" ]]; then
    ok "time limit raised to 3 min: the rerun completed as Slurm job $jobid2 ($((SECONDS - t0)) s)"
  else
    bad "rerun: sacct says '$state2' for job '$jobid2'"
  fi
else
  bad "rerun with the limit raised (log $KILL/run2.log)"; tail -30 run2.log
fi
exit 0
