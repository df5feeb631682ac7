#!/usr/bin/env bash
# Stop the development cluster started by up.sh, by PID, in reverse start order. State stays under
# $RS_SLURM_DIR (job ids keep counting, accounting keeps its history); `down.sh --wipe` removes it.
set -euo pipefail

DIR="${RS_SLURM_DIR:-/tmp/rs-slurm}"

stop() {  # stop <pid file>: TERM, wait up to 15 s, then KILL
  local pidfile="$1" pid
  [[ -s "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
}

for daemon in slurmd slurmctld slurmdbd mariadbd; do
  stop "$DIR/run/$daemon.pid"
done
stop "$DIR/munge/munged.pid"
# Job steps that outlived slurmd (no cgroups here to reap them).
pkill -f "slurmstepd: \[" 2>/dev/null || true
if [[ "${1:-}" == "--wipe" ]]; then
  rm -rf "$DIR"
fi
echo "[dev-cluster] down${1:+ ($1)}" >&2
