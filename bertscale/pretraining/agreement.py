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
    """After the step a signal arrived (on any rank) and its checkpoint is committed, exit 75 so
    that a SLURM script requeues the job. At the last step there is nothing left to requeue: the
    run ends normally."""

    def __init__(self, run_lock: Any, total_steps: int, info: Any):
        self.run_lock, self.total, self.info = run_lock, total_steps, info

    def maybe_exit(self, step: int, preempted: bool) -> None:
        if not preempted or step >= self.total:
            return
        names = ",".join(distributed.signal_names()) or "a signal on another rank"
        self.info(f"preempted ({names}): checkpoint step {step} committed; exiting "
                  f"with code {distributed.PREEMPTED_EXIT_CODE} to be requeued")
        self.run_lock.record_preemption(step, distributed.signal_names())  # for requeue wrappers
        raise StopTraining(distributed.PREEMPTED_EXIT_CODE)
