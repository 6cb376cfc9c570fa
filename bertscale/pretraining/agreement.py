"""Decisions every rank must take together, or the ones that did not would wait forever in the
next collective: a data error met by one rank, a NaN/inf loss, non-finite weights, a preemption
signal delivered to one rank.

No decision waits on the GPU at every step. Each step's statistics stay on the device
(`Reads.add`) until a read (`Reads.read`): ONE all-reduce of the pending steps' statistics and
the preemption flags, and ONE copy to the host. The loop reads at the steps it logs, evaluates
or saves, after a skipped update, and at least every `train.check_every` steps; between reads the
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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from bertscale import distributed
from bertscale.errors import UserError
from bertscale.pretraining.stats import StepStats
from bertscale.pretraining.update import StopTraining, Update


def _any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is true on any. Collective; reads back (a sync)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def next_micro_batches(batches: Iterator[dict[str, Any]], n: int, *, step: int,
                       device: Any) -> list[dict[str, Any]]:
    """The next `n` micro-batches of this rank. A data error (a damaged sample, a shard that
    cannot be read) met by one rank stops every rank at the same point with the same line (the
    first rank's), instead of the others waiting in the next collective. Collective, and a sync:
    for the eval pass and the first step of a process; the steps use `Feed`."""
    error = None
    try:
        fetched = [next(batches) for _ in range(n)]
    except UserError as e:
        fetched, error = [], str(e)
    if _any_rank(error is not None, device):
        found = distributed.gather_problems([error] if error else [])
        raise UserError(f"step {step + 1}: {found[0]}")
    return fetched


def weights_finite(model: Any, device: Any) -> bool:
    """Every rank's weights are finite (ZeRO-3 keeps only this rank's partition in ds_tensor; the
    others hold full copies). Collective."""
    import torch

    checks = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters()]
    # One read back per device the partitions live on (an offloaded partition is on the CPU).
    ok = all(bool(torch.stack([c for c in checks if c.device == d]).all())
             for d in {c.device for c in checks})
    return not _any_rank(not ok, device)


class Feed:
    """This rank's micro-batches, step after step, with no collective per step.

    A data error (a damaged sample, a shard that cannot be read) is kept for the next read, which
    stops every rank with it (`Reads`); until then this rank steps on its last micro-batches again
    with weight 0 (`real` False): the same shapes, so the same collectives as every other rank,
    and no gradient. The first step of a process has nothing to step on, so it agrees at once."""

    def __init__(self, batches: Iterator[dict[str, Any]], n: int, device: Any):
        self.batches, self.n, self.device = batches, n, device
        self.last: list[dict[str, Any]] | None = None
        self.error: str | None = None   # this rank's data error, until the read reports it

    def next(self, step: int) -> tuple[list[dict[str, Any]], bool]:
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
class Attempt:
    """One optimizer update whose statistics are still on the device."""

    step: int               # the step it became (applied) or would have become (skipped)
    update: Update
    sums: Any               # this rank's StepStats, packed, not reduced
    seen: list[tuple[Any, Any]]  # (finite?, sample_ids) per micro-batch: the NaN report's ids
    consumed_samples: int   # the host's counters after this update
    skipped_steps: int


@dataclass
class Read:
    """What a read found: each pending attempt with its statistics summed over the ranks, whether
    any rank had been signalled to stop, and the wall time the attempts took (both ends of it wait
    for the device, so it is the device's time)."""

    attempts: list[tuple[Attempt, StepStats]]
    preempted: bool
    seconds: float
    applied: list[StepStats] = field(default_factory=list)   # the applied steps' statistics


class Reads:
    """The pending attempts since the last read, and the read that decides on them."""

    def __init__(self, feed: Feed, device: Any, *, check_every: int, rank: int, run_dir: Path,
                 info: Callable[[str], None]):
        self.feed, self.device, self.check_every = feed, device, check_every
        self.rank, self.run_dir, self.info = rank, run_dir, info
        self.pending: list[Attempt] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """The next read times the attempts from now (after an eval or a save: not theirs)."""
        self.t0 = time.perf_counter()

    def add(self, attempt: Attempt) -> None:
        self.pending.append(attempt)

    def due(self, step: int) -> bool:
        """The check cadence: every `check_every` steps. (The loop also reads at its log, eval
        and save steps and after a skipped update.)"""
        return step % self.check_every == 0

    def read(self) -> Read:
        """Collective. Sum the pending attempts' statistics and the preemption flags over the
        ranks (one all-reduce), read them back (one copy), and stop every rank at the first
        attempt whose data failed (UserError, exit 2) or whose loss was NaN/inf (StopTraining,
        exit 3), naming its step."""
        import torch
        import torch.distributed as dist

        pending, self.pending = self.pending, []
        rows = [a.sums for a in pending]
        # The flag travels in the last row: the read is the step boundary where ranks agree.
        rows[-1] = rows[-1] + StepStats.pack(
            self.device, preempted=1.0 if distributed.local_preemption_flag() else 0.0)
        reduced = torch.stack(rows)                                           # (n, F)
        dist.all_reduce(reduced)
        stats = StepStats.unpack_rows(reduced)
        seconds = time.perf_counter() - self.t0
        for attempt, s in zip(pending, stats):
            if s.data_error:
                found = distributed.gather_problems([self.feed.error] if self.feed.error else [])
                raise UserError(f"step {attempt.step}: {found[0]}")
            if s.nonfinite:
                self._stop_nonfinite(attempt, s)
        return Read(list(zip(pending, stats)), bool(stats[-1].preempted), seconds,
                    [s for a, s in zip(pending, stats) if a.update.applied])

    def _stop_nonfinite(self, attempt: Attempt, stats: StepStats) -> None:
        import sys

        from bertscale import checkpoint as ckpt_lib

        bad_ids = [i for ok, ids in attempt.seen if not bool(ok) for i in ids.tolist()]
        if bad_ids:
            print(f"[rank {self.rank}] step {attempt.step}: non-finite loss; batch sample_ids "
                  f"{bad_ids}", file=sys.stderr, flush=True)
        latest = ckpt_lib.latest_committed(self.run_dir)
        self.info(f"error: step {attempt.step}: loss is NaN/inf in {int(stats.nonfinite)} "
                  f"micro-batch(es) (sample ids on stderr of the rank(s) that saw it); stopping "
                  f"without saving. Newest committed checkpoint: {latest.path if latest else 'none'}")
        raise StopTraining(distributed.NONFINITE_EXIT_CODE)


class Preemption:
    """After the step a signal arrived (on any rank) and its checkpoint is committed: exit 75 so
    that a SLURM script requeues the job, or, when every signal was Ctrl-C (SIGINT), exit 130
    with nothing to requeue. At the last step there is nothing left to requeue: the run ends
    normally."""

    def __init__(self, run_lock: Any, total_steps: int, info: Any):
        self.run_lock, self.total, self.info = run_lock, total_steps, info

    def maybe_exit(self, step: int, preempted: bool) -> None:
        if not preempted or step >= self.total:
            return
        # The step's all-reduce says only that some rank was signalled; which ranks, and with
        # what, travels here, once, at the step that stops the run. Collective.
        by_rank = signals_by_rank()
        names = sorted({name for got in by_rank.values() for name in got})
        if names == ["SIGINT"]:
            self.info(f"interrupted (SIGINT): checkpoint step {step} committed; exiting with "
                      f"code {distributed.INTERRUPTED_EXIT_CODE}; the same command resumes")
            raise StopTraining(distributed.INTERRUPTED_EXIT_CODE)
        self.info(f"preempted ({describe_signals(by_rank)}): checkpoint step {step} committed; "
                  f"exiting with code {distributed.PREEMPTED_EXIT_CODE} to be requeued")
        self.run_lock.record_preemption(step, by_rank)  # for requeue wrappers
        raise StopTraining(distributed.PREEMPTED_EXIT_CODE)


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
