"""`bertscale pretrain`: BERT's masked-LM + next-sentence pretraining through DeepSpeed ZeRO, as an
outline over the trainer core (bertscale.training). Each part `train` names lives beside it:

    plan.py          everything validated before any process group (`build_plan`)
    build.py         shard check, run-folder files, the model, the engine factory, the loaders
    step.py          `train_step`: micro-batches with gradient accumulation, the step's named
                     statistics (stats.py) summed on the device, no host sync
    update.py        the optimizer update, skipped updates and the loss-scale stop
    metrics.py       throughput, model FLOPs, TFLOP/s and MFU between reads
    evaluator.py     the held-out eval and its cadence
    checkpointer.py  what a checkpoint records about the run, and its cadence
    faults.py        the `[debug]` fault injection the failure tests use, and the sync check
    reporter.py      rank 0's terminal, metrics.jsonl, W&B, TensorBoard

and the core gives the rest: the DeepSpeed engine (training.deepspeed_engine), the decisions
every rank takes together at a read (training.agreement: ONE all-reduce and ONE host copy of the
pending steps' statistics: NaN/inf loss, data errors, preemption), the commit-marker checkpoints
and the one resume path (training.checkpoint), the exit codes (training.stop).

The host never waits for the GPU inside a step: the loop reads the statistics back at its log,
eval and save steps, after a skipped update and every `train.check_every` steps, and takes its
decisions there (training.agreement says what that defers, and why nothing unsafe is saved).

One launcher-agnostic entrypoint: `torchrun`, `deepspeed`, `mpirun` and `srun` all work, see
bertscale.distributed. Exit codes (bertscale.training.stop): 0 done; 2 bad input (before anything
ran); 3 the loss or the weights became NaN/inf (nothing saved from that step on); 75 preempted
after committing a checkpoint (SLURM scripts requeue on it); 130 Ctrl-C: after committing a
checkpoint at the next read, or at once on a second Ctrl-C.

Honest limits:
- The batch geometry is global_batch = micro x accumulation x world size exactly; no dropping.
- fp16 needs a GPU (DeepSpeed refuses it on the CPU); on the CPU train in fp32 or bf16 (bf16 is
  emulated on CPUs without native bf16 and is many times slower there).
- With ZeRO-Offload the optimizer is the recipe's torch optimizer running on the CPU partitions,
  not DeepSpeed's CPU Adam kernel: correct, slower than DeepSpeed's own offload path.
- Model FLOPs (for TFLOP/s and MFU) are bertscale.perf's one count: matmuls on the real
  (non-padding) tokens only, attention over each sequence's real length, the MLM head at the
  masked positions; embeddings, norms, softmax and padding are not counted. MFU is against
  `logging.peak_tflops`, else the CUDA device's datasheet peak (bertscale.perf.datasheet_peak).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bertscale import distributed, runlock, storelock
from bertscale.config import PretrainRecipe
from bertscale.pretraining import build
from bertscale.pretraining.checkpointer import checkpointer
from bertscale.pretraining.evaluator import Evaluator
from bertscale.pretraining.faults import DebugHooks, SyncCheck
from bertscale.pretraining.metrics import StepMetrics
from bertscale.pretraining.plan import Plan, build_plan
from bertscale.pretraining.reporter import Reporter
from bertscale.pretraining.stats import StepStats
from bertscale.pretraining.step import train_step
from bertscale.pretraining.update import Updater
from bertscale.seeding import seed_all
from bertscale.training.agreement import Attempt, Feed, Preemption, Read, Reads
from bertscale.training.checkpoint.resume import restore
from bertscale.training.checkpoint.store import RunStore, store_url
from bertscale.training.deepspeed_engine import DeepSpeedEngine
from bertscale.training.engine import Update
from bertscale.training.state import TrainState
from bertscale.training.stop import StopTraining


class Counters:
    """The host's counters after an update, for its records (skip and step records)."""

    def __init__(self, update: Update, consumed_samples: int, skipped_steps: int):
        self.update, self.consumed_samples, self.skipped_steps = (update, consumed_samples,
                                                                  skipped_steps)


def train(plan: Plan) -> int:
    """Train from the plan's start to `plan.stop_at`; the exit code (module docstring)."""
    distributed.init(plan.env)
    distributed.install_signal_handlers()
    with _sole_writer(plan) as run_lock:
        build.check_shards(plan)
        build.write_run_files(plan)
        return _train(plan, run_lock)  # `run` then ends the process groups, on every path


@contextmanager
def _sole_writer(plan: Plan) -> Iterator[runlock.RunLock]:
    """One writer per run folder: a second live trainer stops here, on every rank (exit 2); a
    run folder in an object store takes a lease there too (bertscale.storelock). Released once
    every rank is through; after an error, the process's end lets go of them."""
    run_lock = runlock.acquire(plan.run_dir, plan.env.is_main)
    store_lock = storelock.acquire(plan.store.url, plan.env.is_main) if plan.store else None
    yield run_lock
    distributed.barrier()
    run_lock.release()
    if store_lock is not None:
        store_lock.release()


def _train(plan: Plan, run_lock: runlock.RunLock) -> int:
    """The run in the folder `train` holds: the model and its engine (fresh or restored), the
    loop's parts, the loop; the exit code."""
    recipe, env, t = plan.recipe, plan.env, plan.recipe.train
    model, optimizer = build.model(plan)
    from bertscale.model import count_parameters
    n_params = count_parameters(model)  # now: ZeRO-3 moves the parameters out of the module
    # The components that save and restore their own state: the loop's counters and the
    # loader's data position (the only place the position is kept).
    state, loader = TrainState(), build.train_loader(plan)
    engine, start = restore(plan.resume_from, build.engine_factory(plan, model, optimizer),
                            {"train": state, "data": loader}, rank=env.rank,
                            world_size=env.world_size, seed=t.seed)
    if start.resumed_from is None:
        seed_all(t.seed + 1 + env.rank)  # each rank its own dropout stream

    reporter = Reporter(plan, state.step)
    metrics = StepMetrics(plan, engine.device)
    reporter.start(plan, step=state.step, consumed_samples=loader.consumed_samples, start=start,
                   n_params=n_params, mfu=metrics.describe())
    hooks = DebugHooks(recipe.debug, model, active=env.is_main)
    updater = Updater(engine, state.skips, max_skips_in_a_row=t.max_loss_scale_skips,
                      info=reporter.info)
    evaluator = Evaluator(plan, engine, reporter, lambda: build.eval_loader(plan))
    saver = checkpointer(plan, engine, state=state, loader=loader, info=reporter.info,
                         last_saved=state.step if start.resumed_from is not None else None,
                         record=reporter.record)
    preemption = Preemption(run_lock.record_preemption, t.steps, reporter.info)
    sync_check = SyncCheck(recipe.debug.forbid_host_syncs, engine.device, reporter.warn)

    exit_code = 0
    try:
        evaluator.maybe_run_at_start(state.step)
        engine.train()
        feed = Feed(iter(loader), plan.grad_accum, engine.device)
        reads: Reads[StepStats, Counters] = Reads(
            StepStats, engine.device, check_every=t.check_every, rank=env.rank,
            run_dir=plan.run_dir, info=reporter.info, feed=feed)
        while state.step < plan.stop_at:
            # Queued for the device, not waited for (the first step of a process agrees on its
            # data at once, see agreement.Feed).
            with sync_check.guard(on=feed.last is not None):
                micro_batches, real = feed.next(state.step)
                sums, seen = train_step(engine, micro_batches, step=state.step, hooks=hooks,
                                        vocab_size=plan.manifest.vocab_size, real=real)
            update = updater.apply(state.step)
            state.step += update.applied
            reads.add(Attempt(state.step if update.applied else state.step + 1, update.applied,
                              sums, seen, Counters(update, loader.consumed_samples,
                                                   state.skips.total)))
            if update.applied and not (reads.due(state.step) or reporter.logs(state.step)
                                       or evaluator.due(state.step)
                                       or saver.due(state.step, preempted=False)):
                continue
            # A read: every rank stops here at the first step whose loss was NaN/inf or whose
            # data failed, before anything is saved.
            read = reads.read()
            _report(read, reporter, metrics, engine)
            updater.stop_if_collapsed(state.step, update)
            if update.applied:  # after a skip, a preemption flag waits for the next applied step
                evaluator.maybe_run(state.step)
                saver.maybe_save(state.step, preempted=read.preempted)
                preemption.maybe_exit(state.step, read.preempted)
            reads.restart_clock()
        reporter.finished(state.step, loader.consumed_samples)
        summary = sync_check.summary()
        if summary:
            reporter.info(summary)
    except StopTraining as stop:  # said why already; every rank stops at the same step
        exit_code = stop.exit_code
    finally:
        reporter.close()
        loader.close()
        saver.close()  # a store run: the upload in flight commits, the final records go up
        engine.close()  # its hold on the process groups, which end after the run
    return exit_code


def _report(read: Read[StepStats, Counters], reporter: Reporter, metrics: StepMetrics,
            engine: DeepSpeedEngine) -> None:
    """The records of a read: each skipped update, and the last applied step (a record and a
    line when it is a log step; the progress bar in any case)."""
    for attempt, stats in read.attempts:
        if not attempt.applied:  # not a step, but its samples were read
            reporter.skipped(attempt.step - 1, metrics.skipped(
                stats, attempt.info.update, consumed_samples=attempt.info.consumed_samples,
                skipped_steps=attempt.info.skipped_steps))
    last, stats = read.attempts[-1]
    if last.applied:
        reporter.train_step(last.step, metrics.train(
            stats, last.info.update, window=read.applied, seconds=read.seconds, engine=engine,
            consumed_samples=last.info.consumed_samples, skipped_steps=last.info.skipped_steps))


def run(recipe: PretrainRecipe, *, run_dir: str | Path | None = None, resume: str = "auto",
        stop_at_step: int | None = None) -> int:
    """Validate, then train. The Python entry point behind `bertscale pretrain`."""
    env = distributed.discover()
    distributed.require_usable_gpus()
    location = run_dir or recipe.run_dir or Path("runs") / recipe.name
    url = store_url(location)
    store = None
    if url is not None:
        # The store is the run folder; the trainer works on this node's staging copy of it
        # (bertscale.training.checkpoint.store). Checked on every rank: one line, exit 2.
        store = RunStore(url)
        store.check()
        storelock.refuse_if_held(url)  # before the staging copy is touched
        store.mirror()
        if env.is_main:
            print(f"run folder {url} (staging on this node: {store.staging})", flush=True)
        location = store.staging
    plan = build_plan(recipe, env, Path(location), resume, stop_at_step)
    if store is not None:
        plan.store = store
        store.prepare_resume(plan.resume_from, env.world_size,
                             check_free_space=recipe.checkpoint.check_free_space)
    try:
        return train(plan)
    finally:
        distributed.shutdown()  # also when an error that every rank agreed on ends the run
