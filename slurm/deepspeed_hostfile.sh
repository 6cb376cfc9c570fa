#!/bin/bash
# slurm/deepspeed_hostfile.sh -- run `bertscale` through DeepSpeed's own launcher (`deepspeed`),
# with a hostfile built from the SLURM allocation, for sites that prefer it to one srun task per GPU.
# Use it as a batch script (arguments are `bertscale` arguments) or run it inside an allocation:
#
#   sbatch --nodes=4 slurm/deepspeed_hostfile.sh pretrain bert_large_phase1 --run-dir runs/large
#   salloc --nodes=2 --gpus-per-node=8 slurm/deepspeed_hostfile.sh doctor --run-dir runs/large
#
# It writes one line per allocated node, "<node> slots=<GPUs per node>", then starts the launcher:
#   BERTSCALE_DS_MODE=srun (default): one `deepspeed --no_ssh --node_rank=<n>` per node through
#       srun; each starts that node's processes. Needs neither ssh nor pdsh between nodes.
#   BERTSCALE_DS_MODE=pdsh | openmpi | mvapich | slurm: one `deepspeed --launcher <mode>` on the
#       first node, which reaches the others itself (pdsh: passwordless ssh to every node).
# The processes get RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the launcher,
# which is how bertscale discovers its place (the same code as under torchrun). This path does not
# requeue on preemption; slurm/pretrain.sbatch does.
#
#SBATCH --job-name=bertscale-ds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Knobs (environment variables):
#   BERTSCALE_SLOTS     processes (GPUs) per node      (SLURM_GPUS_ON_NODE, else GPUs nvidia-smi lists, else 1)
#   BERTSCALE_DS_MODE   srun | pdsh | openmpi | mvapich | slurm                                  (srun)
#   BERTSCALE_HOSTFILE  where to write the hostfile    ($SLURM_SUBMIT_DIR/hostfile-<job id>)
#   BERTSCALE_DS_ARGS   more launcher arguments, e.g. "--include n1:0,1"                        ()
#   BERTSCALE_DEEPSPEED the deepspeed launcher command                                          (deepspeed)
#   MASTER_PORT         rendezvous port on the first node                 (20000 + job id % 20000)
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 BERTSCALE-SUBCOMMAND [ARGS...]" >&2; exit 2; }
: "${SLURM_JOB_ID:?run inside a SLURM allocation (sbatch or salloc)}"
DEEPSPEED=${BERTSCALE_DEEPSPEED:-deepspeed}
MODE=${BERTSCALE_DS_MODE:-srun}
HOSTFILE=${BERTSCALE_HOSTFILE:-${SLURM_SUBMIT_DIR:-$PWD}/hostfile-$SLURM_JOB_ID}
if [ -n "${BERTSCALE_SLOTS:-}" ]; then SLOTS=$BERTSCALE_SLOTS
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "$SLURM_GPUS_ON_NODE" -gt 0 ]; then SLOTS=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then SLOTS=$(nvidia-smi -L | wc -l)
else SLOTS=1
fi
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
tmp=$HOSTFILE.tmp.$$
for n in "${NODES[@]}"; do echo "$n slots=$SLOTS"; done >"$tmp"
mv "$tmp" "$HOSTFILE"

first=${NODES[0]}
if getent hosts "$first" >/dev/null 2>&1; then MASTER_ADDR=$first
else MASTER_ADDR=$(scontrol show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
echo "[deepspeed_hostfile.sh] ${#NODES[@]} node(s) x $SLOTS slot(s), hostfile $HOSTFILE, rendezvous $MASTER_ADDR:$MASTER_PORT, mode $MODE"

# --no_local_rank: bertscale reads LOCAL_RANK from the environment, not a --local_rank argument.
common=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
        --no_local_rank --module)
# shellcheck disable=SC2086
if [ "$MODE" = srun ]; then
  # One launcher per node; SLURM_NODEID is this node's index in the allocation = its line in the
  # hostfile. The single quotes keep it for the remote shell to expand.
  exec srun --nodes="${#NODES[@]}" --ntasks="${#NODES[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec "$0" --no_ssh --node_rank="$SLURM_NODEID" "$@"' \
    "$DEEPSPEED" "${common[@]}" ${BERTSCALE_DS_ARGS:-} bertscale.cli "$@"
else
  exec "$DEEPSPEED" --launcher "$MODE" "${common[@]}" ${BERTSCALE_DS_ARGS:-} bertscale.cli "$@"
fi
