#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for development and tests:
# munged, mariadbd + slurmdbd (accounting: submitit reads job states through sacct), slurmctld, slurmd.
#
#   slurm/dev-cluster/up.sh            # idempotent: installs Debian packages if missing, starts what is down
#   export SLURM_CONF=$RS_SLURM_DIR/etc/slurm.conf   # printed at the end; sbatch/sacct/sinfo need it
#   slurm/dev-cluster/down.sh          # stops every daemon by its PID file
#
# Everything (config, state, spool, logs, PID files, the database) lives under $RS_SLURM_DIR
# (default /tmp/rs-slurm). Runs as root, without systemd or cgroups (see ../README.md for the limits).
# Partitions: `debug` (default, low priority, preemptible: REQUEUE) and `high` (preempts `debug`).
# The node advertises RS_SLURM_CPUS CPUs (default: twice the real count), so that jobs a test stalls
# on purpose (sleeping, waiting for a signal) do not keep the others queued.
set -euo pipefail

DIR="${RS_SLURM_DIR:-/tmp/rs-slurm}"
HOST="$(hostname -s)"
DB_PORT="${RS_SLURM_DB_PORT:-3399}"
export SLURM_CONF="$DIR/etc/slurm.conf"
# munge's default socket: Slurm's clients (sacctmgr, sacct via slurmdbd) only look there.
SOCKET=/run/munge/munge.socket.2

log() { echo "[dev-cluster] $*" >&2; }
running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for <seconds> <what> <command...>
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  while ((SECONDS < deadline)); do timeout 5 "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  log "timed out waiting for $what; logs are in $DIR/log"; return 1
}

install_packages() {
  local missing=()
  for bin in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd \
             mariadbd:mariadb-server; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin##*:}")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  # Keep postinst scripts from starting the distribution's own daemons.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

write_configs() {
  mkdir -p "$DIR"/{etc,log,run,state,spool,munge,mysql}  # munge/: owned by the munge user, its own log and PID
  chmod 755 "$DIR"
  local cpus sockets cores threads boards mem
  read -r cpus boards sockets cores threads mem < <(slurmd -C | awk '
    /NodeName/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
    END { print v["CPUs"], v["Boards"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
  cpus=${RS_SLURM_CPUS:-$((2 * cpus))}; boards=1; sockets=1; cores=$cpus; threads=1
  mem=$((mem * 9 / 10))
  cat >"$DIR/etc/slurm.conf" <<EOF
# Written by slurm/dev-cluster/up.sh — a single-node development cluster.
ClusterName=rsdev
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
MinJobAge=300
KillWait=5
SchedulerParameters=sched_interval=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
SlurmdParameters=config_overrides   # trust the advertised CPUs (RS_SLURM_CPUS) over what slurmd detects
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=$HOST Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
  running "$DIR/munge/munged.pid" && return 0
  mkdir -p "$(dirname "$SOCKET")"
  chown munge:munge "$DIR/munge" "$(dirname "$SOCKET")"
  chmod 700 "$DIR/munge"
  if [[ ! -s "$DIR/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  runuser -u munge -- munged --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
    --force
  wait_for 10 munged munge -n --socket="$SOCKET"
}

start_mariadb() {
  running "$DIR/run/mariadbd.pid" && return 0
  if [[ ! -d "$DIR/mysql/mysql" ]]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
      >"$DIR/log/mariadb-install.log" 2>&1
  fi
  nohup mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" \
    --pid-file="$DIR/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &
  wait_for 30 mariadbd mariadb --socket="$DIR/run/mysqld.sock" -uroot -e "select 1"
  mariadb --socket="$DIR/run/mysqld.sock" -uroot <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
  running "$DIR/run/slurmdbd.pid" && return 0
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster rsdev >/dev/null 2>&1 || true
}

start_slurm() {
  if ! running "$DIR/run/slurmctld.pid"; then
    slurmctld -f "$SLURM_CONF"
  fi
  if ! running "$DIR/run/slurmd.pid"; then
    slurmd -f "$SLURM_CONF"
  fi
  wait_for 60 "the node to be idle" bash -c "sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'"
}

install_packages
write_configs
start_munge
start_mariadb
start_slurmdbd
start_slurm
log "up: $(sinfo -h -o '%P %a %D %T' | tr '\n' ';')"
echo "export SLURM_CONF=$SLURM_CONF"
