# slurm/requeue.sh -- sourced by slurm/pretrain.sbatch: did the trainer stop to be requeued?
#
#   bertscale_clear_preempted RUN_DIR                  before a training step: forget older records
#   bertscale_should_requeue RC RUN_DIR STOP_REQUESTED status 0 = requeue (the reason on stdout)
#
# The trainer stopped for preemption with a checkpoint committed when its exit code is 75
# (BERTSCALE_PREEMPT_EXIT), or -- whatever code a launcher made of that (torchrun turns a worker's
# 75 into 1) -- when RUN_DIR/preempted.json exists: rank 0 writes it at that exit, and a trainer
# that starts removes it. A step that failed after the job was asked to stop (STOP_REQUESTED=1)
# is requeued too: it was killed before it could checkpoint, and the last committed checkpoint is
# intact. Anything else (done, bad input, NaN) is not requeued.

bertscale_clear_preempted() {
  rm -f "$1/preempted.json"
}

bertscale_should_requeue() {
  local rc=$1 run_dir=$2 stop_requested=${3:-0}
  if [ "$rc" = "${BERTSCALE_PREEMPT_EXIT:-75}" ]; then
    echo "the trainer exited $rc: preempted after committing a checkpoint"
  elif [ -f "$run_dir/preempted.json" ]; then
    echo "$run_dir/preempted.json: preempted after committing a checkpoint (the launcher exited $rc)"
  elif [ "$rc" != 0 ] && [ "$stop_requested" = 1 ]; then
    echo "stopped (exit $rc) after a stop was requested, before it could checkpoint"
  else
    return 1
  fi
}
