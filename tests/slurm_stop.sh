#!/usr/bin/env bash
# tests/slurm_stop.sh BASE -- stop the cluster tests/slurm_cluster.sh started under BASE: cancel
# its jobs, stop the slurmd daemons, slurmctld and munged by the pids in their pid files (TERM,
# then KILL after 10 s), and remove the controller and node state so the next start is fresh.
# Idempotent; stops only processes named in BASE's pid files.
set -uo pipefail

BASE=${1:?usage: slurm_stop.sh BASE}
[ -d "$BASE" ] || exit 0
BASE=$(cd "$BASE" && pwd)
export SLURM_CONF=$BASE/etc/slurm.conf
say() { echo "[slurm_stop $(date +%T)] $*" >&2; }
running() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ]
}
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && running "$pid"
}
stop() {   # stop PIDFILE COMMAND
  local pid
  if ! alive "$1" "$2"; then rm -f "$1"; return 0; fi
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then say "$2 ($pid) ignores TERM: KILL"; kill -KILL "$pid" 2>/dev/null; fi
  rm -f "$1"
}

if alive "$BASE/run/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
for f in "$BASE"/run/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd; done
stop "$BASE/run/slurmctld.pid" slurmctld
stop "$BASE/munge/munged.pid" munged
rm -rf "$BASE/state"
say "stopped"
