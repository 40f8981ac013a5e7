#!/usr/bin/env bash
# The whole study on the lent GPU machine, from a clean copy of the repository, in a few
# calls of the device tool (each at most 10 minutes; the machine is given back 30 s after a
# call ends, so the calls follow each other). benchmarks/device/README.md gives the sequence.
#
#   run_study.sh stage                     install the carried wheels (.whl/), stash the model
#                                          pieces this call brought (.gpu/model-*), unpack the
#                                          model once all have arrived, check the imports
#   run_study.sh start CONFIG... [-- ARGS]  stage, then start Snakemake on the config file(s),
#                                          detached (setsid), in a copy of the repository;
#                                          ARGS go to snakemake. Returns at once.
#   run_study.sh status                    jobs done / total, elapsed time, the log's tail
#   run_study.sh wait [SECONDS]            return when the run ends or after SECONDS (540)
#   run_study.sh watch [SECONDS]           wait, collecting into $OUT every minute, so that a
#                                          call cut short still brings the latest results back
#   run_study.sh collect [DIR]             results, benchmark files, logs and RUN.md into DIR
#                                          (default $OUT): at most 8 files of <= 16 MiB
#   run_study.sh stop                      stop the run this script started
#   run_study.sh stamp                     here, before the calls: record the commit (.gpu/STAMP)
#   run_study.sh --cpu-smoke [--plain]     here, on the CPU: all of the above on a tiny config
#
# Environment: PYTHON (default python3), ISAE_DEVICE (state folder, default /tmp/isae-device),
# CORES (default: all), RESULTS (results folder of the config, default results), PYCACHE=0
# (no bytecode cache: see study_env), MODEL=none
# (start without the language model, for targets on the synthetic sets only); for start,
# BEFORE (a command run before Snakemake), FIRST_CONFIG (a --config string for a first,
# smaller Snakemake phase) and AFTER (a command
# run once Snakemake has ended, its files under $BENCH): session.sh says more. wait and
# watch follow the whole session, AFTER included.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
PY=${PYTHON:-python3}
DEV=${ISAE_DEVICE:-/tmp/isae-device}
SITE=$DEV/site
BIN=$DEV/bin
RUN=$DEV/run
WORK=$DEV/repo
RESULTS=${RESULTS:-results}

die() { echo "run_study.sh: error: $*" >&2; exit 2; }
say() { echo "run_study.sh: $*"; }

study_env() {
  # $1: the source tree whose src/ the run imports.
  export PYTHONPATH="$SITE:$1/src${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$BIN:$PATH"
  # Nothing can be fetched there: fail at once instead of retrying the Hub.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  # The image sets PYTHONDONTWRITEBYTECODE and its packages carry no bytecode, so every job
  # compiled torch's sources again: importing torch and torch._dynamo (which torch.optim
  # pulls in) took 9 s a job, 3 s with a cache (an H100, 2026-12-07). An installed package
  # keeps its bytecode; the run keeps its own. PYCACHE=0: every job compiles, as the runs
  # before 2026-12-07 did (for a like-for-like comparison with them).
  if [ "${PYCACHE:-1}" != 0 ]; then
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX="$DEV/pycache"
  fi
}

# ---------------------------------------------------------------------------- stage

install_wheels() {
  local wheels=("$repo"/.whl/*.whl)
  if [ -e "${wheels[0]}" ]; then
    local sig
    sig=$(cd "$repo/.whl" && ls -l -- *.whl | md5sum | cut -c1-32)
    if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$sig" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
      echo "$sig" > "$SITE/.wheels"
      say "installed ${#wheels[@]} wheels into $SITE"
    else
      say "wheels already installed in $SITE"
    fi
  elif [ -f "$SITE/.wheels" ]; then
    say "wheels already installed in $SITE (none carried this call)"
  else
    die "no wheels: carry .whl (made here by benchmarks/device/fetch_wheels.sh)"
  fi
}

unpack_model() {
  # 0: model ready; 3: pieces still missing (both fine for stage, not for start).
  local rc=0
  bash "$here/unpack_model.sh" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 3 ] || exit "$rc"
  return "$rc"
}

check_imports() {
  (study_env "$repo"
   "$PY" - <<'EOF'
import importlib, importlib.metadata as m, platform
for name in ("snakemake", "transformer_lens.model_bridge", "isae.cli.main", "torch"):
    importlib.import_module(name)
v = {n: m.version(n) for n in ("snakemake", "transformer-lens", "torch", "transformers")}
print("run_study.sh: imports ok: python", platform.python_version(),
      ", ".join(f"{k} {x}" for k, x in v.items()))
EOF
  ) || die "the study's packages do not import (see above); check .whl against the image"
}

cmd_stage() {
  mkdir -p "$SITE" "$BIN" "$RUN"
  install_wheels
  local model=0
  if [ "${MODEL:-}" = none ]; then model=3; else unpack_model || model=$?; fi
  # `isae` on PATH for Snakemake's shell rules: the interpreter that holds torch.
  printf '#!/bin/sh\nexec "%s" -m isae "$@"\n' "$(command -v "$PY")" > "$BIN/isae"
  chmod +x "$BIN/isae"
  check_imports
  return "$model"
}

# ---------------------------------------------------------------------------- start

running() { [ -f "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; }

commit_line() {
  # The stamp made here (run_study.sh stamp), checked against the run's own copy ($WORK)
  # file by file; without one, the commit of the caller's tree. The stamp comes first: the
  # device tool's copy may hold a stale .git of an earlier session (seen: a commit with
  # "103 tracked files modified").
  if [ -f "$repo/.gpu/STAMP" ]; then
    "$PY" "$here/tree_stamp.py" check "$WORK" "$repo/.gpu/STAMP"
  elif git -C "$repo" rev-parse HEAD >/dev/null 2>&1; then
    local dirty
    dirty=$(git -C "$repo" status --porcelain --untracked-files=no | wc -l)
    echo "$(git -C "$repo" rev-parse HEAD) ($([ "$dirty" = 0 ] && echo clean || echo "$dirty tracked files modified"))"
  else
    echo "unknown: no .git and no .gpu/STAMP (run 'run_study.sh stamp' here and carry .gpu/STAMP)"
  fi
}

cmd_start() {
  local configs=() extra=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
    configs+=("$1"); shift
  done
  [ ${#configs[@]} -gt 0 ] || die "start needs a config file, e.g. start config/gpu.yaml"
  running && die "a run is already going (pid $(cat "$RUN/pid")); 'status', 'wait' or 'stop' it"
  local rel=()
  for c in "${configs[@]}"; do
    [ -f "$repo/$c" ] || [ -f "$c" ] || die "config file $c not found"
  done
  local model=0
  cmd_stage || model=$?
  # MODEL=none: targets that need no language model (the synthetic sets) start without it.
  [ "$model" = 0 ] || [ "${MODEL:-}" = none ] \
    || die "the model is not complete yet: carry the missing .gpu/model-* piece (or MODEL=none)"
  # The run works in its own copy: later calls re-copy the caller's tree over $repo, and the
  # run must not see that.
  rm -rf "$WORK.tmp" && mkdir -p "$WORK.tmp"
  (cd "$repo" && tar --exclude=./.whl --exclude=./.gpu --exclude=./.git --exclude="./$RESULTS" \
     --exclude=./logs --exclude=./.snakemake -cf - .) \
    | tar -C "$WORK.tmp" -xf -
  if [ -d "$WORK" ]; then
    # Keep what an earlier run made (Snakemake reruns only what changed).
    for keep in "$RESULTS" logs .snakemake; do
      [ -e "$WORK/$keep" ] && mkdir -p "$(dirname "$WORK.tmp/$keep")" && mv "$WORK/$keep" "$WORK.tmp/$keep"
    done
    rm -rf "$WORK"
  fi
  mv "$WORK.tmp" "$WORK"
  rm -rf "$RUN"/{rc,ended,done,phase1,started,pid,pycache,isae-env,config-*,snakemake.log,before.log,env,after.log,bench}
  local i=0
  for c in "${configs[@]}"; do
    local src="$repo/$c"; [ -f "$src" ] || src=$c
    i=$((i + 1)); cp "$src" "$RUN/config-$i.yaml"
    rel+=("$RUN/config-$i.yaml")
  done
  printf '%s\n' "${configs[*]}" > "$RUN/configs"
  commit_line > "$RUN/commit"
  cat "$SITE/.model-line" 2>/dev/null > "$RUN/model" || true
  local cores=${CORES:-$(nproc)}
  local cmd=("$PY" -m snakemake --configfile "${rel[@]}" --cores "$cores" --scheduler greedy
             --workflow-profile workflow/profiles/local "${extra[@]}")
  printf '%q ' "${cmd[@]}" > "$RUN/command"
  date +%s > "$RUN/started"
  (
    study_env "$WORK"
    echo "${PYTHONPYCACHEPREFIX:-off (every job compiles its imports)}" > "$RUN/pycache"
    # The library's switches (ISAE_GROUPED, ...) change what a run measures.
    env | grep '^ISAE_' | grep -v '^ISAE_DEVICE=' | sort > "$RUN/isae-env" || true
    cd "$WORK"
    # A new session (the run outlives this call: the tool ends the call's own processes);
    # its shell records its own pid, which is also its process group for `stop`.
    # BEFORE, FIRST_CONFIG and AFTER (session.sh) pass through the environment.
    setsid nohup bash "$WORK/benchmarks/device/session.sh" "$RUN" "${cmd[@]}" \
      < /dev/null > /dev/null 2>&1 &
  )
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -f "$RUN/pid" ] && break; sleep 0.5; done
  [ -f "$RUN/pid" ] || die "the run did not start (no pid file in $RUN)"
  say "started (pid $(cat "$RUN/pid")) in $WORK: $(cat "$RUN/command")"
  say "commit: $(cat "$RUN/commit")"
  sleep 5
  cmd_status
}

# ---------------------------------------------------------------------------- status

cmd_status() {
  [ -f "$RUN/started" ] || die "no run started in $DEV"
  local now start end state
  now=$(date +%s); start=$(cat "$RUN/started")
  if [ -f "$RUN/rc" ]; then
    end=$(cat "$RUN/ended"); state="finished, exit code $(cat "$RUN/rc")"
    [ -f "$RUN/done" ] || { running && state="$state; AFTER running: $(tail -n 1 "$RUN/after.log" 2>/dev/null)"; }
  elif running; then
    end=$now; state="running"
    if [ -f "$RUN/before.log" ] && ! grep -q "BEFORE exit code" "$RUN/before.log"; then
      state="running BEFORE: $(grep '^== ' "$RUN/before.log" | tail -n 1)"
    fi
  else
    end=$now; state="not running and no exit code (killed?)"
  fi
  local prog
  prog=$(grep -E '^[0-9]+ of [0-9]+ steps' "$RUN/snakemake.log" 2>/dev/null | tail -1 || true)
  local failed
  failed=$(grep -c '^Error in rule' "$RUN/snakemake.log" 2>/dev/null || true)
  echo "== $state; elapsed $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s; ${prog:-0 steps done}; failed jobs: ${failed:-0}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total --format=csv,noheader \
      | sed 's/^/== GPU: /' || true
  fi
  echo "== last lines of $RUN/snakemake.log:"
  tail -n "${TAIL:-15}" "$RUN/snakemake.log" 2>/dev/null || true
}

progress_line() {
  echo "[$(date +%H:%M:%S)] $(grep -E '^[0-9]+ of [0-9]+ steps' "$RUN/snakemake.log" 2>/dev/null | tail -1 || echo 'starting')$*"
}

cmd_wait() {
  local limit=${1:-540} t0=$SECONDS last=-60
  [ -f "$RUN/started" ] || die "no run started in $DEV"
  while [ ! -f "$RUN/done" ] && running && [ $((SECONDS - t0)) -lt "$limit" ]; do
    if [ $((SECONDS - last)) -ge 60 ]; then
      last=$SECONDS
      progress_line
    fi
    sleep 5
  done
  cmd_status
}

cmd_watch() {
  # wait, but bring back what the run has made every minute or so: each round collects into
  # a scratch folder and renames the files into $OUT, so a call cut short (the session's
  # device time spent) still returns the latest complete archives.
  local limit=${1:-540} t0=$SECONDS out=${OUT:-}
  [ -n "$out" ] || die "watch needs \$OUT (the device tool's output folder)"
  [ -f "$RUN/started" ] || die "no run started in $DEV"
  while :; do
    cmd_wait "${WATCH_EVERY:-60}" > /dev/null
    progress_line "; collected into $out"
    local tmp
    tmp=$(mktemp -d)
    if cmd_collect "$tmp" > /dev/null 2>&1; then
      for f in "$tmp"/*; do
        cp "$f" "$out/.$(basename "$f").tmp" && mv "$out/.$(basename "$f").tmp" "$out/$(basename "$f")"
      done
    fi
    rm -rf "$tmp"
    [ -f "$RUN/done" ] && break
    running || break
    # leave room for one more round (wait + collect) inside the limit
    [ $((SECONDS - t0 + ${WATCH_EVERY:-60} + 30)) -lt "$limit" ] || break
  done
  cmd_status
}

cmd_stop() {
  running || { say "no run is going"; return 0; }
  # setsid made the run's shell a process-group leader: end that group, nothing else.
  kill -TERM -- "-$(cat "$RUN/pid")" && say "sent TERM to the run's process group $(cat "$RUN/pid")"
}

cmd_collect() {
  local out=${1:-${OUT:-}}
  [ -n "$out" ] || die "collect needs a folder (or \$OUT)"
  [ -d "$WORK" ] || die "no run folder $WORK"
  # The run's environment, so that RUN.md reads the versions the run imported.
  study_env "$WORK"
  "$PY" "$here/collect_run.py" --repo "$WORK" --run "$RUN" --out "$out" --results "$RESULTS" \
    --python "$(command -v "$PY")"
}

cmd_stamp() {
  mkdir -p "$repo/.gpu"
  "$PY" "$here/tree_stamp.py" make "$repo" "$repo/.gpu/STAMP"
}

# ---------------------------------------------------------------------------- CPU smoke

cmd_cpu_smoke() {
  # Here, without a GPU: a scratch copy of the repository as the device tool makes it,
  # the wheels and the model pieces carried in, then stage with one piece (must wait for
  # the other), start with both, wait, status and collect, with the tiny smoke.yaml.
  # Default: an interpreter that sees only a stand-in for the device image (image_env.py)
  # and what is carried, so a wheel missing from the set fails here as it would there.
  # --plain: this machine's own environment instead.
  local plain=0
  [ "${1:-}" = "--plain" ] && plain=1
  local scratch=${SMOKE_DIR:-/tmp/isae-cpu-smoke}
  local base=${PYTHON:-python3}
  rm -rf "$scratch" && mkdir -p "$scratch/repo" "$scratch/out"
  (cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$scratch/repo")
  local pyver
  pyver=$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  say "smoke: wheels for Python $pyver"
  PYTHON=$base bash "$here/fetch_wheels.sh" --python "$pyver" --dest "$scratch/repo/.whl" | tail -1
  (cd "$scratch/repo" && PYTHON=$base bash benchmarks/device/pack_model.sh)
  "$base" "$here/tree_stamp.py" make "$repo" "$scratch/repo/.gpu/STAMP"
  local py=$base pp=""
  if [ "$plain" = 0 ]; then
    "$base" -m venv "$scratch/venv"
    "$base" "$here/image_env.py" "$scratch/image"
    py=$scratch/venv/bin/python
    pp=$scratch/image
  fi
  local dev=$scratch/device
  run() { (cd "$scratch/repo" && PYTHON=$py ISAE_DEVICE=$dev PYTHONPATH=$pp CORES=2 \
             bash benchmarks/device/run_study.sh "$@"); }
  # Call 1 brings the wheels and the first piece; call 2 the second piece.
  mv "$scratch/repo/.gpu/model-b" "$scratch/model-b"
  local rc=0
  run stage || rc=$?
  [ "$rc" = 3 ] || die "smoke: stage with one piece should wait for the other (exit $rc)"
  rm -rf "$scratch/repo/.whl" "$scratch/repo/.gpu/model-a"
  mv "$scratch/model-b" "$scratch/repo/.gpu/model-b"
  run start config/config.yaml benchmarks/device/smoke.yaml
  run wait 3000
  run status | head -1
  run collect "$scratch/out"
  ls -l "$scratch/out"
  local n
  n=$(find "$scratch/out" -type f | wc -l)
  [ "$n" -le 8 ] || die "smoke: $n files to bring back, more than 8"
  local listing
  listing=$(tar -tzf "$scratch/out/results.tar.gz")
  grep -qx RUN.md <<< "$listing" || die "smoke: no RUN.md in the archive"
  grep -q "tables/T1.md" <<< "$listing" || die "smoke: no T1.md in the archive"
  grep -q "matches the stamp" "$scratch/out/RUN.md" || die "smoke: RUN.md does not tie the run to the stamp"
  [ "$(cat "$dev/run/rc")" = 0 ] || die "smoke: the study failed (see $dev/run/snakemake.log)"
  say "smoke passed: $scratch/out"
}

# ---------------------------------------------------------------------------- main

mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
  stage) cmd_stage ;;
  start) cmd_start "$@" ;;
  status) cmd_status ;;
  wait) cmd_wait "$@" ;;
  watch) cmd_watch "$@" ;;
  stop) cmd_stop ;;
  collect) cmd_collect "$@" ;;
  stamp) cmd_stamp ;;
  --cpu-smoke) cmd_cpu_smoke "$@" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
