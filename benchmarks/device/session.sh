#!/usr/bin/env bash
# The detached part of `run_study.sh start`: run Snakemake (in one or two phases), then the
# measurements that need the GPU to themselves. Started with setsid by run_study.sh, in the
# run's own copy of the repository; not meant to be called by hand.
#
#   session.sh RUN_DIR SNAKEMAKE_COMMAND...
#
# Environment (all optional):
#   FIRST_CONFIG  a --config string for a first Snakemake phase, e.g.
#                 'width_study={datasets: []}': the study without its width axis first, so
#                 that a session whose device time runs out still has every table and figure
#                 of that smaller DAG; the second phase (the command as given) then adds what
#                 remains, reusing every output of the first.
#   BEFORE        a shell command run before Snakemake starts (the GPU checks and the timing
#                 benchmarks that gate the study or must have the GPU to themselves); its
#                 output goes to RUN_DIR/before.log, its files under $BENCH; lines it writes
#                 to $RUN_ENV (RUN_DIR/env, shell `export` lines, e.g. ISAE_GROUPED=0 when
#                 the grouped check failed) are sourced before Snakemake runs.
#   AFTER         a shell command run once Snakemake has ended (timing benchmarks that must
#                 not share the GPU with the study); its output goes to RUN_DIR/after.log and
#                 the files it writes under $BENCH (RUN_DIR/bench) travel back with the run.
#
# Files in RUN_DIR: pid (this shell, the process group's leader), before.log, env, snakemake.log, phase1 (the
# time the first phase ended), rc and ended (Snakemake's exit code and end), after.log,
# bench/, done (everything ended).
set -u
run=$1
shift
echo $$ > "$run/pid"
export BENCH="$run/bench" RUN_ENV="$run/env"
mkdir -p "$BENCH"
if [ -n "${BEFORE:-}" ]; then
  bash -c "$BEFORE" > "$run/before.log" 2>&1
  echo "== BEFORE exit code $?" >> "$run/before.log"
fi
if [ -f "$RUN_ENV" ]; then
  echo "== environment from BEFORE: $(tr '\n' ' ' < "$RUN_ENV")" >> "$run/snakemake.log"
  # shellcheck disable=SC1090
  . "$RUN_ENV"
fi
rc=0
if [ -n "${FIRST_CONFIG:-}" ]; then
  echo "== phase 1 of 2: --config $FIRST_CONFIG" >> "$run/snakemake.log"
  "$@" --config "$FIRST_CONFIG" >> "$run/snakemake.log" 2>&1 || rc=$?
  date +%s > "$run/phase1"
  echo "== phase 2 of 2 (phase 1 exit code $rc): the whole config" >> "$run/snakemake.log"
fi
# The exit code that counts is the last phase's: it reruns what the first left undone.
rc=0
"$@" >> "$run/snakemake.log" 2>&1 || rc=$?
echo "$rc" > "$run/rc"
date +%s > "$run/ended"
if [ -n "${AFTER:-}" ]; then
  bash -c "$AFTER" > "$run/after.log" 2>&1
  echo "== AFTER exit code $?" >> "$run/after.log"
fi
date +%s > "$run/done"
