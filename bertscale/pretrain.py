"""`bertscale pretrain`: BERT's masked-LM + next-sentence pretraining through DeepSpeed ZeRO.

`train` is the run as an outline; each part it names lives in bertscale.pretraining:

    plan.py          everything validated before any process group (`build_plan`)
    build.py         shard check, run-folder files, the engine factory, the loaders
    step.py          `train_step`: micro-batches with gradient accumulation, the step's named
                     statistics (stats.py) summed on the device, no host sync
    update.py        the optimizer update, skipped updates and the loss-scale stop
    metrics.py       throughput, model FLOPs, TFLOP/s and MFU between reads
    evaluator.py     the held-out eval and its cadence
    checkpointer.py  when to save, and what the trainer state holds
    agreement.py     the decisions every rank takes together at a read: ONE all-reduce and ONE
                     host copy of the pending steps' statistics (NaN/inf loss, data errors,
                     preemption); finite weights before a save
    faults.py        the `[debug]` fault injection the failure tests use, and the sync check
    reporter.py      rank 0's terminal, metrics.jsonl, W&B, TensorBoard

Resuming is bertscale.resume.restore, the one path: it builds the engine, loads it, and hands
each stateful component (the loop's counters, the loader's data position) its saved state.

The host never waits for the GPU inside a step: the loop reads the statistics back at its log,
eval and save steps, after a skipped update and every `train.check_every` steps, and takes its
decisions there (agreement.py says what that defers, and why nothing unsafe is saved).

One launcher-agnostic entrypoint: `torchrun`, `deepspeed`, `mpirun` and `srun` all work, see
bertscale.distributed. Exit codes: 0 done; 2 bad input (before anything ran); 3 the loss or the
weights became NaN/inf (nothing saved from that step on); 75 preempted after committing a checkpoint
(SLURM scripts requeue on it); 130 Ctrl-C: after committing a checkpoint at the next read, or at
once on a second Ctrl-C.

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

from pathlib import Path
from typing import Any

from bertscale import checkpoint as ckpt_lib
from bertscale import distributed, runlock
from bertscale import resume as resume_lib
from bertscale.config import PretrainRecipe
from bertscale.pretraining import build
from bertscale.pretraining.agreement import Attempt, Feed, Preemption, Read, Reads
from bertscale.pretraining.checkpointer import Checkpointer
from bertscale.pretraining.evaluator import Evaluator
from bertscale.pretraining.faults import DebugHooks, SyncCheck
from bertscale.pretraining.metrics import StepMetrics
from bertscale.pretraining.plan import (DEEPSPEED_CONFIG_DIR, Plan, build_plan, deepspeed_config,
                                        resolve_deepspeed_config)
from bertscale.pretraining.reporter import Reporter
from bertscale.pretraining.step import train_step
from bertscale.pretraining.update import StopTraining, TrainState, Updater
from bertscale.seeding import seed_all

# The plan's names are this command's public API too (tests and tools import them from here).
__all__ = ["DEEPSPEED_CONFIG_DIR", "Plan", "build_plan", "deepspeed_config",
           "resolve_deepspeed_config", "run", "train"]


# ================================================================================ the run


def _build_model(plan: Plan) -> tuple[Any, Any]:
    """The model (same initial weights on every rank: seeded identically first) and its
    optimizer; the weights of `train.init_from` if the run starts from them."""
    from bertscale import optim, perf
    from bertscale.model import BertForPreTraining
    from bertscale.parallelize import FastPaths, apply_fast_paths

    recipe, t = plan.recipe, plan.recipe.train
    seed_all(t.seed)
    fast = recipe.fast
    perf.set_tf32(fast.tf32)
    model = BertForPreTraining(plan.model_config)
    apply_fast_paths(model, FastPaths(
        unpad=fast.unpad, checkpoint_activations=fast.checkpoint_activations, compile=fast.compile))
    if plan.init_from is not None:
        plan.init_from.load_into(model)  # a bertscale run's or a Hugging Face folder's weights
    ckpt_lib.mark_universal(model)
    optimizer = optim.build_optimizer(recipe.optimizer, model)
    return model, optimizer


def train(plan: Plan) -> int:
    """Train from the plan's start to `plan.stop_at`; the exit code (module docstring)."""
    recipe, env, t = plan.recipe, plan.env, plan.recipe.train
    distributed.init(env)
    distributed.install_signal_handlers()
    # One writer per run folder: a second live trainer stops here, on every rank (exit 2).
    run_lock = runlock.acquire(plan.run_dir, env.is_main)
    build.check_shards(plan)
    build.write_run_files(plan)

    model, optimizer = _build_model(plan)
    from bertscale.model import count_parameters
    n_params = count_parameters(model)  # now: ZeRO-3 moves the parameters out of the module
    # The components that save and restore their own state: the loop's counters and the
    # loader's data position (the only place the position is kept).
    state, loader = TrainState(), build.train_loader(plan)
    (engine, scheduler), start = resume_lib.restore(
        plan.resume_from, plan.ds_config, build.engine_builder(plan, model, optimizer),
        {"train": state, "data": loader}, rank=env.rank, world_size=env.world_size, seed=t.seed,
        check_free_space=recipe.checkpoint.check_free_space)

    reporter = Reporter(plan, state.step)
    metrics = StepMetrics(plan, engine.device)
    reporter.start(plan, step=state.step, consumed_samples=loader.consumed_samples, start=start,
                   n_params=n_params, mfu=metrics.describe())
    hooks = DebugHooks(recipe.debug, model, active=env.is_main)
    updater = Updater(engine, scheduler, state.skips, precision=plan.precision,
                      max_skips_in_a_row=t.max_loss_scale_skips, info=reporter.info)
    evaluator = Evaluator(plan, engine, reporter, lambda: build.eval_loader(plan))
    checkpointer = Checkpointer(plan, engine, model, train_state=state, loader=loader, info=reporter.info,
                                last_saved=state.step if start.resumed_from is not None else None)
    preemption = Preemption(run_lock, t.steps, reporter.info)
    sync_check = SyncCheck(recipe.debug.forbid_host_syncs, engine.device, reporter.warn)

    exit_code = 0
    try:
        evaluator.maybe_run_at_start(state.step)
        engine.train()
        feed = Feed(iter(loader), plan.grad_accum, engine.device)
        reads = Reads(feed, engine.device, check_every=t.check_every, rank=env.rank,
                      run_dir=plan.run_dir, info=reporter.info)
        while state.step < plan.stop_at:
            # Queued for the device, not waited for (the first step of a process agrees on its
            # data at once, see agreement.Feed).
            with sync_check.guard(on=feed.last is not None):
                micro_batches, real = feed.next(state.step)
                sums, seen = train_step(engine, micro_batches, step=state.step, hooks=hooks,
                                        vocab_size=plan.manifest.vocab_size, real=real)
            update = updater.apply(state.step)
            state.step += update.applied
            reads.add(Attempt(state.step if update.applied else state.step + 1, update, sums, seen,
                              loader.consumed_samples, state.skips.total))
            if update.applied and not (reads.due(state.step) or reporter.logs(state.step)
                                       or evaluator.due(state.step)
                                       or checkpointer.due(state.step, preempted=False)):
                continue
            # A read: every rank stops here at the first step whose loss was NaN/inf or whose
            # data failed, before anything is saved.
            read = reads.read()
            _report(read, reporter, metrics, engine)
            updater.stop_if_collapsed(state.step, update)
            if update.applied:  # after a skip, a preemption flag waits for the next applied step
                evaluator.maybe_run(state.step)
                checkpointer.maybe_save(state.step, preempted=read.preempted)
                preemption.maybe_exit(state.step, read.preempted)
            reads.restart_clock()
        reporter.finished(state.step, loader.consumed_samples)
        if sync_check.summary():
            reporter.info(sync_check.summary())
    except StopTraining as stop:  # said why already; every rank stops at the same step
        exit_code = stop.exit_code
    finally:
        reporter.close()
        loader.close()
    distributed.barrier()
    run_lock.release()
    distributed.shutdown()
    return exit_code


def _report(read: Read, reporter: Reporter, metrics: StepMetrics, engine: Any) -> None:
    """The records of a read: each skipped update, and the last applied step (a record and a
    line when it is a log step; the progress bar in any case)."""
    for attempt, stats in read.attempts:
        if not attempt.update.applied:  # not a step, but its samples were read
            reporter.skipped(attempt.step - 1, metrics.skipped(
                stats, attempt.update, consumed_samples=attempt.consumed_samples,
                skipped_steps=attempt.skipped_steps))
    last, stats = read.attempts[-1]
    if last.update.applied:
        reporter.train_step(last.step, metrics.train(
            stats, last.update, window=read.applied, seconds=read.seconds, engine=engine,
            consumed_samples=last.consumed_samples, skipped_steps=last.skipped_steps))


# ================================================================================ the entry point


def run(recipe: PretrainRecipe, *, run_dir: str | Path | None = None, resume: str = "auto",
        stop_at_step: int | None = None) -> int:
    """Validate, then train. The Python entry point behind `bertscale pretrain`."""
    env = distributed.discover()
    distributed.require_usable_gpus()
    run_dir = Path(run_dir or recipe.run_dir or Path("runs") / recipe.name)
    plan = build_plan(recipe, env, run_dir, resume, stop_at_step)
    try:
        return train(plan)
    finally:
        distributed.shutdown()  # also when an error that every rank agreed on ends the run
