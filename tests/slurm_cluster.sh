#!/usr/bin/env bash
# tests/slurm_cluster.sh BASE [NODES] -- bring up a real SLURM cluster on this one machine, for the
# SLURM tests (tests/test_slurm.py). Idempotent: run it again and it only starts what is missing
# (or restarts everything when the generated configuration changed).
#
#   * Debian's slurmctld / slurmd / slurm-client / munge (+ libpmix-dev, which holds the library
#     `srun --mpi=pmix` loads) are installed with apt when missing. That needs root and apt-get;
#     without them the script exits 3 with the reason (the tests skip, or fail on CI).
#   * A private munged (own key and socket under BASE/munge), one slurmctld, and NODES slurmd
#     daemons for the virtual nodes n1..nNODES (`slurmd -N nX` on distinct ports; Debian builds
#     SLURM with multiple-slurmd support). Every node advertises SLURM_TEST_CPUS CPUs.
#   * Waits until every node is idle. Prints `export SLURM_CONF=...` on stdout.
#
# Knobs (environment): SLURM_TEST_CPUS (per node, default 4), SLURM_TEST_MEM_MB (default 4000),
# SLURM_TEST_CTLD_PORT (6817), SLURM_TEST_NODE_PORT0 (17001: n1, n2 on the next ports),
# SLURM_TEST_WAIT_S (60), SLURM_TEST_ETC_HOSTS=1 to add "127.0.0.1 n1 n2 ..." to /etc/hosts when
# the names do not resolve (off by default: bertscale resolves unknown node names through
# `scontrol show node`'s NodeAddr, as it must on clusters whose DNS does not know them).
#
# Timing seen on a 2-core test machine: first bring-up with the apt install about 20 s, later ones
# about 1 s. Stop it with tests/slurm_stop.sh BASE.
set -euo pipefail

BASE=${1:?usage: slurm_cluster.sh BASE [NODES]}
NODES=${2:-2}
CPUS=${SLURM_TEST_CPUS:-4}
MEM_MB=${SLURM_TEST_MEM_MB:-4000}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
PORT0=${SLURM_TEST_NODE_PORT0:-17001}
WAIT_S=${SLURM_TEST_WAIT_S:-60}
HOST=$(hostname -s)
mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd)
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF
say() { echo "[slurm_cluster $(date +%T)] $*" >&2; }
T0=$(date +%s%N)

# A pid file names a live process of the expected command (not a zombie, not a reused pid).
alive() {
  local pid st
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ]
}

# ---- packages -----------------------------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
# Slurm's mpi/pmix plugin dlopen()s libpmix.so, which Debian ships only in libpmix-dev.
if ! ls /usr/lib/*/pmix2/lib/libpmix.so >/dev/null 2>&1; then need+=(libpmix-dev); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then say "not root: cannot install ${need[*]}"; exit 3; fi
  if ! command -v apt-get >/dev/null 2>&1; then say "no apt-get: cannot install ${need[*]}"; exit 3; fi
  say "installing ${need[*]}"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
         || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
              apt-get install -y -qq --no-install-recommends "${need[@]}"; }; } >"$BASE/apt.log" 2>&1; then
    tail -n 20 "$BASE/apt.log" >&2; say "apt-get could not install ${need[*]}"; exit 3
  fi
fi
if [ "$(id -u)" != 0 ]; then say "not root: slurmd must run as root to start jobs as any user"; exit 3; fi

# ---- configuration ------------------------------------------------------------------------------
read -r -d '' WANT <<EOF || true
# written by bertscale tests/slurm_cluster.sh; a local test cluster, not a template for production
ClusterName=bertscale-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job must wait to start again (120 s by default)
AuthInfo=socket=$BASE/munge/munge.socket,cred_expire=10
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/spool/%n
# One TmpFS per virtual node: Open MPI's session directories of two "nodes" must not collide.
TmpFS=$BASE/state/tmp/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# let the virtual nodes advertise more CPUs than the machine has
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=n[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORT0-$((PORT0 + NODES - 1)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

if [ -f "$CONF" ] && [ "$(cat "$CONF")" != "$WANT" ] && alive "$BASE/run/slurmctld.pid" slurmctld; then
  say "configuration changed: restarting the cluster"
  "$(dirname "$0")/slurm_stop.sh" "$BASE"
fi
mkdir -p "$BASE"/{etc,run,log,munge,state/ctld}
for i in $(seq 1 "$NODES"); do mkdir -p "$BASE/state/spool/n$i" "$BASE/state/tmp/n$i"; done
chmod 755 "$BASE" "$BASE/munge"        # munged wants o+x on every directory of its socket path
[ -f "$CONF" ] && [ "$(cat "$CONF")" = "$WANT" ] || printf '%s\n' "$WANT" >"$CONF"
if [ ! -s "$BASE/munge/munge.key" ]; then
  head -c 1024 /dev/urandom >"$BASE/munge/munge.key"
  chmod 400 "$BASE/munge/munge.key"
fi

if [ "${SLURM_TEST_ETC_HOSTS:-0}" = 1 ]; then
  for i in $(seq 1 "$NODES"); do
    getent hosts "n$i" >/dev/null || echo "127.0.0.1 n$i" >>/etc/hosts
  done
fi

# ---- daemons ------------------------------------------------------------------------------------
munged_bin=$(command -v munged || echo /usr/sbin/munged)
slurmctld_bin=$(command -v slurmctld || echo /usr/sbin/slurmctld)
slurmd_bin=$(command -v slurmd || echo /usr/sbin/slurmd)
if ! alive "$BASE/munge/munged.pid" munged; then
  say "starting munged"
  "$munged_bin" --socket="$BASE/munge/munge.socket" --key-file="$BASE/munge/munge.key" \
    --log-file="$BASE/munge/munged.log" --pid-file="$BASE/munge/munged.pid" \
    --seed-file="$BASE/munge/munged.seed"
fi
if ! alive "$BASE/run/slurmctld.pid" slurmctld; then
  say "starting slurmctld"
  "$slurmctld_bin" -i -f "$CONF"     # -i: ignore state left by an earlier cluster
fi
for i in $(seq 1 "$NODES"); do
  if ! alive "$BASE/run/slurmd-n$i.pid" slurmd; then
    say "starting slurmd n$i"
    "$slurmd_bin" -f "$CONF" -N "n$i"
  fi
done

# ---- wait until every node is idle --------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
  idle=$(grep -c ' idle$' <<<"$states" || true)
  [ "$idle" -ge "$NODES" ] && break
  # nodes left down or drained (by an earlier run or a test) come back
  for n in $(awk '$2 ~ /down|drain|drng|fail/ {print $1}' <<<"$states"); do
    scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
  done
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "nodes not idle after ${WAIT_S}s:"; echo "$states" >&2
    tail -n 30 "$BASE/log/slurmctld.log" >&2 || true
    exit 1
  fi
  sleep 0.3
done
say "cluster up: $NODES node(s) idle in $(( ($(date +%s%N) - T0) / 1000000 )) ms"
echo "export SLURM_CONF=$CONF"
