#!/usr/bin/env bash
# Stop exactly the daemons that setup_slurm.sh started (PIDs recorded under
# $ISAE_SLURM_STATE/pids), in reverse order of their start, and leave the state
# directory in place for inspection (setup_slurm.sh removes it before the next start).
set -uo pipefail
STATE=${ISAE_SLURM_STATE:-/tmp/isae-slurm}
log() { echo "[teardown_slurm] $*" >&2; }
[[ -d $STATE/pids ]] || { log "nothing to stop ($STATE/pids absent)"; exit 0; }

for name in slurmd slurmctld slurmdbd mariadbd munged; do
  f=$STATE/pids/$name
  [[ -f $f ]] || continue
  pid=$(<"$f")
  # Only signal a process that is still the one we started: same executable name.
  if [[ -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm") == "$name"* ]]; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 80); do [[ -d /proc/$pid ]] || break; sleep 0.25; done
    if [[ -d /proc/$pid ]]; then log "$name (pid $pid) ignored TERM; sending KILL"; kill -KILL "$pid" 2>/dev/null; fi
    log "stopped $name (pid $pid)"
  else
    log "$name (pid $pid) is not running"
  fi
  rm -f "$f"
done
rmdir "$STATE/pids" 2>/dev/null || true
