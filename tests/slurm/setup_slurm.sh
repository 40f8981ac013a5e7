#!/usr/bin/env bash
# Install (if missing) and start a private single-node Slurm with accounting on this host.
#
# Everything lives under $ISAE_SLURM_STATE (default /tmp/isae-slurm): its own munged,
# MariaDB, slurmdbd, slurmctld and slurmd, on their own socket and ports, so that nothing
# in /etc is edited and the system's own daemons (if any) are left alone.  The PIDs of
# the daemons started here are written to $STATE/pids/; teardown_slurm.sh stops exactly
# those.  Source $STATE/env.sh to point sbatch/sacct/sinfo at this cluster.
#
# Accounting (slurmdbd + MariaDB) is not optional: the Snakemake SLURM executor polls job
# states with sacct, which returns nothing under accounting_storage/none.
#
# Usage (as root):  bash tests/slurm/setup_slurm.sh
set -euo pipefail

STATE=${ISAE_SLURM_STATE:-/tmp/isae-slurm}
ACCOUNT=${ISAE_SLURM_TEST_ACCOUNT:-isae-test}
CLUSTER=isae
PARTITION=${ISAE_SLURM_TEST_PARTITION:-debug}
# Ports away from Slurm's and MariaDB's defaults so a real installation can coexist.
CTLD_PORT=${ISAE_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${ISAE_SLURM_SLURMD_PORT:-16818}
DBD_PORT=${ISAE_SLURM_DBD_PORT:-16819}
DB_PORT=${ISAE_SLURM_DB_PORT:-13306}
DB_PASS=isae-slurm-test

log() { echo "[setup_slurm] $*" >&2; }
die() { echo "[setup_slurm] ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# --- 1. packages: install only what is missing ----------------------------------------
need=()
for pair in munged:munge mariadbd:mariadb-server slurmdbd:slurmdbd slurmctld:slurmctld \
            slurmd:slurmd sbatch:slurm-client sacct:slurm-client; do
  bin=${pair%%:*}; pkg=${pair##*:}
  command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || need+=("$pkg")
done
if ((${#need[@]})); then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  log "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  log "packages already installed"
fi
export PATH=/usr/sbin:/usr/bin:$PATH

# --- 2. stale state from an earlier run: stop our own daemons, start afresh -----------
if [[ -d $STATE/pids ]]; then
  log "found state of an earlier run in $STATE; tearing it down first"
  ISAE_SLURM_STATE=$STATE bash "$(dirname "$0")/teardown_slurm.sh"
fi
rm -rf "$STATE"
mkdir -p "$STATE"/{etc,log,pids,run,munge,key,spool/ctld,spool/d,mysql}
# The key is private; the socket directory must be searchable by job users.
chmod 700 "$STATE/key"
chmod 711 "$STATE" "$STATE/munge"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $CTLD_PORT $SLURMD_PORT $DBD_PORT $DB_PORT; do
  port_free "$p" || die "port $p on 127.0.0.1 is in use; set ISAE_SLURM_*_PORT to free ones"
done

NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2/1024*0.8)}' /proc/meminfo)

# start_daemon NAME CMD...: run CMD in its own session, record its PID
start_daemon() {
  local name=$1; shift
  setsid "$@" >"$STATE/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name"
  log "started $name (pid $!)"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    timeout 10 "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "timed out after ${secs}s waiting for $what (logs in $STATE/log)"
}

# --- 3. munge: a private key and socket -------------------------------------------------
dd if=/dev/urandom of="$STATE/key/munge.key" bs=1 count=1024 status=none
chmod 400 "$STATE/key/munge.key"
MUNGE_SOCK=$STATE/munge/munge.sock
# --force: munged refuses to run as root / under /tmp (sticky, world-writable) otherwise.
start_daemon munged munged --foreground --force --socket="$MUNGE_SOCK" \
  --key-file="$STATE/key/munge.key" --log-file="$STATE/log/munged.log" \
  --pid-file="$STATE/run/munged.pid" --seed-file="$STATE/munge/munged.seed"
wait_for 20 munged bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"

# --- 4. MariaDB: a private data directory on 127.0.0.1:$DB_PORT ------------------------
mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
  --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
  || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
DB_SOCK=$STATE/run/mysqld.sock
start_daemon mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
  --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
  --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
  --innodb-buffer-pool-size=64M --skip-log-bin
wait_for 60 mariadbd mariadb --no-defaults --socket="$DB_SOCK" -uroot -e 'select 1'
mariadb --no-defaults --socket="$DB_SOCK" -uroot <<SQL
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# --- 5. Slurm configuration -----------------------------------------------------------------
cat > "$STATE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
chmod 600 "$STATE/etc/slurmdbd.conf"

# Container-friendly choices: no cgroup plugins (proctrack/linuxproc, task/none); job
# accounting by /proc sampling.  KillWait is short so that the time-limit test is quick.
cat > "$STATE/etc/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For auth/munge this names the munge socket used to talk to slurmdbd.
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
# Store sbatch --comment: the executor writes rule_<name>_wildcards_<...> there.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=60
DefMemPerCPU=1000
# One stand-in GPU (gres backed by /dev/null, see gres.conf) so that the test can check
# that GPU requests reach Slurm as gres/gpu allocations on a machine without a GPU.
GresTypes=gpu
# One CPU more than the host has, so that the time-limit test's sleeping job (which holds
# one CPU for minutes and uses none) can run beside the workflow's jobs; config_overrides
# makes slurmd accept the configured count.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$((CPUS + 1)) RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

cat > "$STATE/etc/gres.conf" <<CONF
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
CONF

# The executor's job step (snakemake-executor-plugin-slurm-jobstep) runs the rule through
# `srun` with every SLURM_* variable removed, SLURM_CONF included, so inside a job srun
# would look for /etc/slurm/slurm.conf. Rather than write to /etc, jobs find this srun
# first on PATH (sbatch --export=ALL carries PATH into the job).
mkdir -p "$STATE/bin"
printf '#!/bin/sh\nSLURM_CONF=%s exec /usr/bin/srun "$@"\n' "$STATE/etc/slurm.conf" > "$STATE/bin/srun"
chmod 755 "$STATE/bin/srun"

cat > "$STATE/env.sh" <<ENV
# source me: points the Slurm client commands at the private test cluster
export SLURM_CONF=$STATE/etc/slurm.conf
export PATH=$STATE/bin:\$PATH:/usr/sbin
export ISAE_SLURM_TEST_ACCOUNT=$ACCOUNT
export ISAE_SLURM_TEST_PARTITION=$PARTITION
ENV
export SLURM_CONF=$STATE/etc/slurm.conf

# --- 6. slurmdbd, cluster/account/user, then slurmctld and slurmd ---------------------
start_daemon slurmdbd slurmdbd -D
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -i add account "$ACCOUNT" Description="isae slurm test" Organization=isae >/dev/null
sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null

start_daemon slurmctld slurmctld -D -f "$SLURM_CONF"
wait_for 60 slurmctld scontrol ping
start_daemon slurmd slurmd -D -f "$SLURM_CONF" -N "$NODE"
wait_for 60 "node $NODE idle" bash -c "sinfo -h -n '$NODE' -o %t | grep -qx idle"
log "cluster $CLUSTER up: node $NODE ($((CPUS + 1)) CPUs, ${MEM_MB} MB), partition $PARTITION, account $ACCOUNT"
log "use it with: source $STATE/env.sh"
