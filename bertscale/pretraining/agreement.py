"""Decisions every rank must take together, or the ones that did not would wait forever in the
next collective: a data error met by one rank, non-finite weights on one rank, a preemption
signal delivered to one rank.

Each is a flag all-reduced at a fixed point of the step (the preemption flag travels in the
step's own all-reduce, bertscale.pretraining.stats.StepStats.preempted), so every rank stops at
the same step with the same message.
"""

from __future__ import annotations

from typing import Any, Iterator

from bertscale import distributed
from bertscale.errors import UserError
from bertscale.pretraining.update import StopTraining


def _any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is true on any. Collective."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def next_micro_batches(batches: Iterator[dict[str, Any]], n: int, *, step: int,
                       device: Any) -> list[dict[str, Any]]:
    """The next `n` micro-batches of this rank. A data error (a damaged sample, a shard that
    cannot be read) met by one rank stops every rank at the same point with the same line (the
    first rank's), instead of the others waiting in the next collective. Collective."""
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

    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in model.parameters())
    return not _any_rank(not ok, device)


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
