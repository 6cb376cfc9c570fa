"""One fine-tuning run (one learning rate, one seed) as an outline over the trainer core
(bertscale.training), the same core pretraining runs on:

    engine       TorchEngine: DDP over the ranks, AdamW with warmup + linear decay, gradient
                 clipping, fp16 loss scaling (training.torch_engine)
    components   the loop's counters ("train"), the data position ("data": finetune.data.
                 GlobalBatches) and the recent losses ("losses"), each saving its own state
    checkpoints  committed checkpoints in the run folder (training.checkpoint): every
                 `checkpoint.every` steps and at a preemption; a run that finds one continues
                 from it (the same world size: bit for bit, every rank's RNG restored)
    reads        each step's loss and gradient norm stay on the device until a read (every
                 `train.check_every` steps, and at every logged or checkpointed step): one
                 all-reduce and one host copy, where every rank decides together on a NaN/inf
                 loss (one line, exit 3, nothing saved) and a preemption signal (checkpoint,
                 exit 75; Ctrl-C: 130) (training.agreement, training.stop)

A step is one global batch (`train.batch_size` examples over all ranks): every rank draws the
same shuffled order and takes its contiguous share, and its loss is weighted by its share, so
the averaged gradient is the gradient of the global batch's mean loss (uneven last batches
included) and W ranks train the same model as one process does. Rank 0 keeps the single-process
dropout stream; the others draw their own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bertscale.devices import to_device
from bertscale.distributed import record_preempted_exit
from bertscale.errors import UserError
from bertscale.finetune.data import Batch, Feature, GlobalBatches, collate, total_steps
from bertscale.finetune.models import apply_fast_paths
from bertscale.finetune.recipe import FinetuneRecipe
from bertscale.finetune.runtime import Runtime
from bertscale.parallelize import FastPaths
from bertscale.reporting import MetricSinks, Progress
from bertscale.seeding import seed_all
from bertscale.training import reporter
from bertscale.training.agreement import Attempt, Preemption, Read, Reads
from bertscale.training.checkpoint.checkpointer import Cadence, Checkpointer
from bertscale.training.checkpoint.layout import checkpoints_dir, latest_committed
from bertscale.training.checkpoint.resume import ResumePoint, restore
from bertscale.training.checkpoint.state import read_state
from bertscale.training.engine import Update
from bertscale.training.state import Stateful, TrainState
from bertscale.training.stats import StepRecord
from bertscale.training.torch_engine import TorchEngine, TorchFactory, adamw

LossFn = Callable[[nn.Module, Batch], Tensor]
LAST = 20
"""The closing line and results.json report the mean loss of the last LAST steps."""


@dataclass(frozen=True)
class FinetuneStats(StepRecord):
    """One step, summed over the ranks (after the flags every rank decides on)."""

    loss: float = 0.0       # each rank's share-weighted loss: the sum / W is the global batch's
    grad_norm: float = 0.0  # rank 0's (the same on every rank after DDP's averaging)


@dataclass
class RunSpec:
    """One run of a grid: its folder, its name in progress lines, its learning rate and seed,
    and where its numbers go."""

    folder: Path
    name: str
    lr: float
    seed: int
    sinks: MetricSinks


class Losses:
    """The losses of the last steps, kept with every checkpoint (the progress line's mean and the
    run's closing numbers continue across a resume)."""

    def __init__(self, keep: int):
        self.keep, self.values = keep, list[float]()

    def add(self, loss: float) -> None:
        self.values = (self.values + [loss])[-self.keep:]

    def mean(self, n: int) -> float:
        last = self.values[-max(n, 1):]
        return sum(last) / len(last)

    def state_dict(self) -> dict[str, Any]:
        return {"last": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [float(v) for v in state["last"]][-self.keep:]


class RunReporter(reporter.Reporter):
    """Rank 0's progress bar (plain lines in a log) and the run's metric records: one per step,
    written at the read that brings its numbers back."""

    def __init__(self, run: RunSpec, total: int, every: int, rt: Runtime):
        self.bar = Progress(f"{run.name} train", total, "steps", mode=rt.progress, every=every,
                            enabled=rt.is_main)
        super().__init__(run.sinks, main=rt.is_main, stream=sys.stderr)
        self.every, self.world_size = every, rt.world_size
        self.shown: dict[str, float] = {}

    def info(self, msg: str) -> None:
        self.bar.note(msg)

    def warn(self, msg: str) -> None:
        self.bar.note(f"warning: {msg}")

    def logs(self, step: int) -> bool:
        """A plain progress line's step: its loss must be read back."""
        return bool(self.every) and step % self.every == 0

    def tick(self, step: int) -> None:
        """A step between reads: the count and the ETA move, the numbers are the last read's."""
        self.bar.update(step, **self.shown)

    def steps(self, read: Read[FinetuneStats, Update], losses: Losses) -> None:
        for attempt, s in read.attempts:
            loss = s.loss / self.world_size
            losses.add(loss)
            self.record("train", attempt.step, {"loss": loss, "lr": attempt.info.lr,
                                                "grad_norm": s.grad_norm})
        self.shown = {"loss": losses.mean(self.every), "lr": read.attempts[-1][0].info.lr}
        self.bar.update(read.attempts[-1][0].step, **self.shown)


def run_identity(recipe: FinetuneRecipe, run: RunSpec, total: int,
                 num_examples: int) -> dict[str, Any]:
    """What a run's checkpoint must match to be continued (the grid's other settings are its
    folder's, settings.json)."""
    return {"lr": run.lr, "seed": run.seed, "total_steps": total,
            "batch_size": recipe.train.batch_size, "examples": num_examples}


def fit(model: nn.Module, features: Sequence[Feature], loss_fn: LossFn, recipe: FinetuneRecipe,
        run: RunSpec, rt: Runtime, pad_id: int = 0) -> dict[str, Any]:
    """Train `model` in place for one run of the grid; returns {"steps", "loss_last_step",
    "loss_last20_mean", "seconds", "resumed_from_step"}, the losses being the global batch's.
    Raises StopTraining (exit 3, 75 or 130) when the run must end early."""
    t, c = recipe.train, recipe.checkpoint
    if not features:
        raise UserError("the training set is empty")
    if t.batch_size < rt.world_size:
        raise UserError(f"train.batch_size {t.batch_size} is the global batch and cannot be "
                        f"shared by {rt.world_size} ranks; use at least {rt.world_size}")
    total = total_steps(t.epochs, t.batch_size, len(features), t.max_steps)
    apply_fast_paths(model, FastPaths(unpad=recipe.fast.unpad, compile=recipe.fast.compile,
                                      checkpoint_activations=recipe.fast.checkpoint_activations))
    model.to(rt.device)
    state, losses = TrainState(), Losses(max(LAST, recipe.logging.every))
    batches = GlobalBatches(len(features), t.batch_size, run.seed, rank=rt.rank,
                            world_size=rt.world_size)
    components: dict[str, Stateful] = {"train": state, "data": batches, "losses": losses}
    identity = run_identity(recipe, run, total, len(features))
    engine, start = restore(
        _resume_point(run, identity, rt), TorchFactory(lambda: _engine(model, recipe, run, total,
                                                                       rt)),
        components, rank=rt.rank, world_size=rt.world_size, seed=run.seed)
    if start.resumed_from is None and rt.rank > 0:
        seed_all(run.seed + 7919 * rt.rank)  # its own dropout masks; rank 0 keeps one process's
    report = RunReporter(run, total, recipe.logging.every, rt)
    if start.resumed_from is not None:
        report.info(f"{run.name}: resuming from the step-{start.step} checkpoint in "
                    f"{checkpoints_dir(run.folder)}")
    report.rewind(start.step)   # one record per step, also after a run killed before a save
    saver = Checkpointer(engine, run.folder, Cadence(c.every, False, c.keep, c.check_free_space),
                         components=components, identity=identity, total_steps=total,
                         stop_at=None, last_saved=start.step if start.resumed_from else None,
                         info=report.info)
    preemption = Preemption(lambda step, _: record_preempted_exit(step), total, report.info)
    reads: Reads[FinetuneStats, Update] = Reads(
        FinetuneStats, engine.device, check_every=t.check_every, rank=rt.rank,
        run_dir=run.folder, info=report.info,
        hint=f"; try a smaller learning rate than {run.lr:g}, or fp32")
    engine.train()
    while state.step < total:
        sums, seen = train_step(engine, features, batches.next(), loss_fn, pad_id)
        update = engine.update()
        state.step += 1              # a step is a batch of the epochs, also when fp16 skipped it
        state.skips.record(update.applied)
        if rt.rank == 0 and update.grad_norm is not None:
            sums = sums + FinetuneStats.pack(engine.device, grad_norm=update.grad_norm)
        reads.add(Attempt(state.step, True, sums, seen, update))
        if not (reads.due(state.step) or report.logs(state.step) or state.step == total
                or saver.due(state.step, preempted=False)):
            report.tick(state.step)
            continue
        read = reads.read()          # NaN/inf loss: every rank stops here (exit 3)
        report.steps(read, losses)
        if state.step < total:       # the last step is followed by the run's results, not a resume
            saver.maybe_save(state.step, preempted=read.preempted)
            preemption.maybe_exit(state.step, read.preempted)
        reads.restart_clock()
    engine.close()  # DDP's hold on the process group (the model stays, for predictions)
    n = min(len(losses.values), LAST)
    seconds = report.bar.close(f"loss {losses.mean(n):.4f} (mean of the last {n} steps)")
    return {"steps": state.step, "loss_last_step": losses.values[-1],
            "loss_last20_mean": losses.mean(n), "seconds": seconds,
            "resumed_from_step": start.step}


def train_step(engine: TorchEngine, features: Sequence[Feature], share: tuple[list[int], float],
               loss_fn: LossFn, pad_id: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Forward and backward of this rank's share of one global batch, its loss weighted by the
    share. Returns this rank's packed FinetuneStats (on the device, not reduced) and (finite?,
    example indices) for the report of a NaN/inf loss. No host sync."""
    mine, weight = share
    batch = to_device(collate([features[j] for j in mine], pad_id), engine.device)
    with engine.autocast():
        loss = loss_fn(engine.net, batch) * weight
    engine.backward(loss)
    loss = loss.detach()
    finite = torch.isfinite(loss)
    return (FinetuneStats.pack(engine.device, loss=loss, nonfinite=~finite),
            [(finite, torch.tensor(mine))])


def _engine(model: nn.Module, recipe: FinetuneRecipe, run: RunSpec, total: int,
            rt: Runtime) -> TorchEngine:
    t = recipe.train
    optimizer, scheduler = adamw(model, lr=run.lr, weight_decay=t.weight_decay, warmup=t.warmup,
                                 total_steps=total, device=rt.device)
    return TorchEngine(model, optimizer, scheduler, device=rt.device, amp_dtype=rt.amp_dtype,
                       max_grad_norm=t.max_grad_norm, world_size=rt.world_size)


def _resume_point(run: RunSpec, identity: dict[str, Any], rt: Runtime) -> ResumePoint | None:
    """The run's newest committed checkpoint if it was saved for these settings; one saved for
    others is removed (the run starts over)."""
    latest = latest_committed(run.folder)
    if latest is None:
        return None
    state = read_state(latest)
    if state.run == identity:
        return ResumePoint(latest, state)
    rt.log(f"note: {latest.path} was saved for other settings ({state.run}); starting this run "
           f"from step 0")
    rt.barrier()   # every rank has read it before rank 0 removes it
    if rt.is_main:
        import shutil
        shutil.rmtree(checkpoints_dir(run.folder), ignore_errors=True)
    return None
