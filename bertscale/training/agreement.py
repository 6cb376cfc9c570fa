"""Decisions every rank must take together, or the ones that did not would wait forever in the
next collective: a data error met by one rank, a NaN/inf loss, non-finite weights, a preemption
signal delivered to one rank.

No decision waits on the GPU at every step. Each step's statistics stay on the device
(`Reads.add`) until a read (`Reads.read`): ONE all-reduce of the pending steps' statistics and
the preemption flags, and ONE copy to the host. The loop reads at the steps it logs, evaluates
or saves, after a skipped update, and at least every `check_every` steps; between reads the
host queues work ahead of the device. The flags are sums over every rank, so every rank takes the
same decision at the same step. What the deferral costs, and why it is safe:
- a NaN/inf loss is acted on at the next read; its line names the step it happened in, and
  nothing is saved after it (every save step reads first);
- a preemption signal is acted on at the next read, at most `check_every` steps late;
- a rank whose data failed keeps stepping on zero-weighted stand-ins until the read (`Feed`), so
  that no rank waits in a collective another never joins; the run then stops with the error.
The synchronous forms (`next_micro_batches`, `weights_finite`) remain for what is not per step:
the first step of a process, the eval pass and a save.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from bertscale import distributed
from bertscale.errors import UserError
from bertscale.training.checkpoint.layout import latest_committed
from bertscale.training.stats import StepRecord
from bertscale.exitcodes import INTERRUPTED_EXIT_CODE, NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE
from bertscale.training.stop import StopTraining

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bertscale.training.engine import Engine

Batch = dict[str, Any]
R = TypeVar("R", bound=StepRecord)
P = TypeVar("P")


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when `flag` is true on any. Collective; reads back (a sync)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return bool(t.item())


def next_micro_batches(batches: Iterator[Batch], n: int, *, step: int,
                       device: torch.device) -> list[Batch]:
    """The next `n` micro-batches of this rank. A data error (a damaged sample, a shard that
    cannot be read) met by one rank stops every rank at the same point with the same line (the
    first rank's), instead of the others waiting in the next collective. Collective, and a sync:
    for the eval pass and the first step of a process; the steps use `Feed`."""
    error = None
    try:
        fetched = [next(batches) for _ in range(n)]
    except UserError as e:
        fetched, error = [], str(e)
    if any_rank(error is not None, device):
        found = distributed.gather_problems([error] if error else [])
        raise UserError(f"step {step + 1}: {found[0]}")
    return fetched


def weights_finite(model: nn.Module, device: torch.device) -> bool:
    """Every rank's weights are finite (ZeRO-3 keeps only this rank's partition in ds_tensor; the
    others hold full copies). Collective."""
    import torch

    checks = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters()]
    # One read back per device the partitions live on (an offloaded partition is on the CPU).
    ok = all(bool(torch.stack([c for c in checks if c.device == d]).all())
             for d in {c.device for c in checks})
    return not any_rank(not ok, device)


def stop_unless_weights_finite(engine: Engine, step: int, info: Callable[[str], None]) -> None:
    """Before a save: StopTraining (exit 3, nothing saved) unless every rank's weights are
    finite. Collective."""
    if not weights_finite(engine.module, engine.device):
        info(f"error: step {step}: weights are not finite; not saving a checkpoint")
        raise StopTraining(NONFINITE_EXIT_CODE)


class Feed:
    """This rank's micro-batches, step after step, with no collective per step.

    A data error (a damaged sample, a shard that cannot be read) is kept for the next read, which
    stops every rank with it (`Reads`); until then this rank steps on its last micro-batches again
    with weight 0 (`real` False): the same shapes, so the same collectives as every other rank,
    and no gradient. The first step of a process has nothing to step on, so it agrees at once."""

    def __init__(self, batches: Iterator[Batch], n: int, device: torch.device):
        self.batches, self.n, self.device = batches, n, device
        self.last: list[Batch] | None = None
        self.error: str | None = None   # this rank's data error, until the read reports it

    def next(self, step: int) -> tuple[list[Batch], bool]:
        """The micro-batches of the update that would become step `step + 1`, and whether they
        are real (False: zero-weighted stand-ins after a data error on this rank)."""
        if self.last is None:
            self.last = next_micro_batches(self.batches, self.n, step=step, device=self.device)
            return self.last, True
        if self.error is None:
            try:
                self.last = [next(self.batches) for _ in range(self.n)]
                return self.last, True
            except UserError as e:
                self.error = str(e)
        return self.last, False


@dataclass
class Attempt(Generic[P]):
    """One optimizer update whose statistics are still on the device."""

    step: int               # the step it became (applied) or would have become (skipped)
    applied: bool
    sums: torch.Tensor      # this rank's record, packed, not reduced
    seen: list[tuple[torch.Tensor, torch.Tensor]]  # (finite?, sample ids) per micro-batch
    info: P                 # the client's host-side facts about it (update, counters)


@dataclass
class Read(Generic[R, P]):
    """What a read found: each pending attempt with its record summed over the ranks, whether
    any rank had been signalled to stop, and the wall time the attempts took (both ends of it wait
    for the device, so it is the device's time)."""

    attempts: list[tuple[Attempt[P], R]]
    preempted: bool
    seconds: float
    applied: list[R] = field(default_factory=list)   # the applied steps' records


class Reads(Generic[R, P]):
    """The pending attempts since the last read, and the read that decides on them. `record` is
    the client's record class (a StepRecord: its flags are what the read decides on)."""

    def __init__(self, record: type[R], device: torch.device, *, check_every: int, rank: int,
                 run_dir: Path, info: Callable[[str], None], feed: Feed | None = None,
                 hint: str = ""):
        self.record, self.device, self.check_every = record, device, check_every
        self.feed, self.rank, self.run_dir, self.info = feed, rank, run_dir, info
        self.hint = hint   # what the NaN/inf line suggests
        self.pending: list[Attempt[P]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """The next read times the attempts from now (after an eval or a save: not theirs)."""
        self.t0 = time.perf_counter()

    def add(self, attempt: Attempt[P]) -> None:
        self.pending.append(attempt)

    def due(self, step: int) -> bool:
        """The check cadence: every `check_every` steps. (The loop also reads at its log, eval
        and save steps and after a skipped update.)"""
        return step % self.check_every == 0

    def read(self) -> Read[R, P]:
        """Collective. Sum the pending attempts' records and the preemption flags over the
        ranks (one all-reduce), read them back (one copy), and stop every rank at the first
        attempt whose data failed (UserError, exit 2) or whose loss was NaN/inf (StopTraining,
        exit 3), naming its step."""
        import torch
        import torch.distributed as dist

        pending, self.pending = self.pending, []
        rows = [a.sums for a in pending]
        # The flag travels in the last row: the read is the step boundary where ranks agree.
        rows[-1] = rows[-1] + self.record.pack(
            self.device, preempted=1.0 if distributed.local_preemption_flag() else 0.0)
        reduced = torch.stack(rows)                                           # (n, F)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(reduced)
        stats = self.record.unpack_rows(reduced)
        seconds = time.perf_counter() - self.t0
        for attempt, s in zip(pending, stats):
            if s.data_error:
                error = self.feed.error if self.feed is not None else None
                found = distributed.gather_problems([error] if error else [])
                raise UserError(f"step {attempt.step}: {found[0]}")
            if s.nonfinite:
                self._stop_nonfinite(attempt, s)
        return Read(list(zip(pending, stats)), bool(stats[-1].preempted), seconds,
                    [s for a, s in zip(pending, stats) if a.applied])

    def _stop_nonfinite(self, attempt: Attempt[P], stats: R) -> None:
        bad_ids = [i for ok, ids in attempt.seen if not bool(ok) for i in ids.tolist()]
        if bad_ids:
            print(f"[rank {self.rank}] step {attempt.step}: non-finite loss; batch sample_ids "
                  f"{bad_ids}", file=sys.stderr, flush=True)
        latest = latest_committed(self.run_dir)
        self.info(f"error: step {attempt.step}: loss is NaN/inf in {int(stats.nonfinite)} "
                  f"micro-batch(es) (sample ids on stderr of the rank(s) that saw it){self.hint}; stopping "
                  f"without saving. Newest committed checkpoint: {latest.path if latest else 'none'}")
        raise StopTraining(NONFINITE_EXIT_CODE)


class Preemption:
    """After the step a signal arrived (on any rank) and its checkpoint is committed: exit 75 so
    that a SLURM script requeues the job, or, when every signal was Ctrl-C (SIGINT), exit 130
    with nothing to requeue. At the last step there is nothing left to requeue: the run ends
    normally. `record(step, signals_by_rank)` keeps the preemption for requeue wrappers (the
    run lock's preempted.json, the launcher's node-local record)."""

    def __init__(self, record: Callable[[int, dict[int, list[str]]], None], total_steps: int,
                 info: Callable[[str], None]):
        self.record, self.total, self.info = record, total_steps, info

    def maybe_exit(self, step: int, preempted: bool) -> None:
        if not preempted or step >= self.total:
            return
        # The step's all-reduce says only that some rank was signalled; which ranks, and with
        # what, travels here, once, at the step that stops the run. Collective.
        by_rank = signals_by_rank()
        names = sorted({name for got in by_rank.values() for name in got})
        if names == ["SIGINT"]:
            self.info(f"interrupted (SIGINT): checkpoint step {step} committed; exiting with "
                      f"code {INTERRUPTED_EXIT_CODE}; the same command resumes")
            raise StopTraining(INTERRUPTED_EXIT_CODE)
        self.info(f"preempted ({describe_signals(by_rank)}): checkpoint step {step} committed; "
                  f"exiting with code {PREEMPTED_EXIT_CODE} to be requeued")
        self.record(step, by_rank)
        raise StopTraining(PREEMPTED_EXIT_CODE)


def signals_by_rank() -> dict[int, list[str]]:
    """{rank: the signal names it received, in order, each once} for the ranks that received
    any, on every rank. Collective (an all-gather of a few names): call it only where every
    rank does, at the step the ranks agreed to stop."""
    import torch.distributed as dist

    mine = list(dict.fromkeys(distributed.signal_names()))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {0: mine} if mine else {}
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {r: got for r, got in enumerate(gathered) if got}


def describe_signals(by_rank: dict[int, list[str]]) -> str:
    """"SIGTERM" when every rank got it, "SIGUSR1 on rank 1", "SIGTERM on ranks 0, 2"."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ranks_of: dict[str, list[int]] = {}
    for rank, got in sorted(by_rank.items()):
        for name in got:
            ranks_of.setdefault(name, []).append(rank)
    parts = [name if len(ranks) == world else
             f"{name} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
             for name, ranks in ranks_of.items()]
    return ", ".join(parts) or "a signal"
