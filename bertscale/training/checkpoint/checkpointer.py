"""When a run saves, and the save itself: a checkpoint is complete or ignored.

Cadence (`Checkpointer.due`): every `every` steps, at a preemption (the step every rank agreed
on), at the step the run was asked to stop at (`stop_at`; None: none), and after the last step
with `at_end`; never twice
for one step (a resumed run does not re-save the step it resumed from). Policy: the weights must
be finite on every rank, else nothing is saved and the run stops (exit 3), so a committed
checkpoint is always one a resume can continue.

The save (`save`, collective): every rank first checks that its view of the checkpoint
filesystem has room for one more checkpoint, then writes its engine files (Engine.save) and its
RNG state, rank 0 the trainer state (each stateful component's own state dict under its name,
and the run's identity: bertscale.training.checkpoint.state); each rank fsyncs what it wrote;
then rank 0 writes the commit marker (bertscale.training.checkpoint.marker) naming the step and
the world size, and a last all-gather keeps any rank from exiting (and a launcher from killing
rank 0) before the commit exists. After each commit rank 0 deletes all but the newest `keep`
committed checkpoints.

A write that fails (a quota, a filesystem that reports no free space, another writer filling the
disk) is caught on the rank it happens to and shared: every rank raises the same one-line
UserError naming the folder and the space, the partial folder is removed (it was never
committed), and the newest committed checkpoint stays as it was.

Limits: fsync is what makes the commit meaningful on a local disk; on network filesystems it is
as strong as the filesystem's close-to-open semantics.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import fsync_path, human_size, torch_save_atomic
from bertscale.seeding import rng_state
from bertscale.training.agreement import stop_unless_weights_finite
from bertscale.training.checkpoint.layout import (Committed, bytes_on_disk, checkpoints_dir,
                                                  free_bytes, is_write_failure, latest_committed,
                                                  newest_committed_note, prune, read_commit,
                                                  space_problem, tag_for, universal_path)
from bertscale.training.checkpoint.marker import COMMIT_FILE, write_marker
from bertscale.training.checkpoint.state import TrainerState, write_state
from bertscale.training.engine import Engine
from bertscale.training.state import Stateful

FORMAT_VERSION = 1
"""Of the commit marker."""

# Bytes per parameter of a first checkpoint, before there is a previous one to measure: the
# module weights (fp32, or bf16/fp16) plus fp32 master weights and two Adam/LAMB moments.
_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class Cadence:
    every: int = 0          # save every N steps (0: only at the events below)
    at_end: bool = True     # save after the last step
    keep: int = 2           # committed checkpoints kept (at least 2)
    check_free_space: bool = True


class Checkpointer:
    """Saves the run's checkpoints at its cadence: the engine's files, each component's state
    and the run's identity."""

    def __init__(self, engine: Engine, run_dir: Path, cadence: Cadence, *,
                 components: Mapping[str, Stateful], identity: dict[str, Any], total_steps: int,
                 stop_at: int | None, last_saved: int | None, info: Callable[[str], None]):
        self.engine, self.run_dir, self.cadence = engine, run_dir, cadence
        self.components, self.identity = components, identity
        self.total, self.stop_at = total_steps, stop_at
        self.last_saved = last_saved
        self.info = info

    def due(self, step: int, *, preempted: bool) -> bool:
        c = self.cadence
        return bool(c.every and step % c.every == 0 or preempted
                    or (step == self.total and c.at_end) or step == self.stop_at)

    def maybe_save(self, step: int, *, preempted: bool) -> Committed | None:
        """After step `step`. Collective; raises StopTraining if the weights are not finite
        (nothing saved)."""
        if not self.due(step, preempted=preempted) or self.last_saved == step:
            return None
        stop_unless_weights_finite(self.engine, step, self.info)
        state = TrainerState({name: c.state_dict() for name, c in self.components.items()},
                             self.identity)
        saved = save(self.engine, self.run_dir, step, state, keep=self.cadence.keep,
                     check_free_space=self.cadence.check_free_space, log=self.info)
        self.last_saved = step
        return saved

    def close(self) -> None:
        """At the end of the run (any end). A local folder has nothing in flight; a store's
        checkpointer finishes its upload here (bertscale.training.checkpoint.upload)."""


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) for a single process without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def checkpoint_bytes_estimate(run_dir: Path, engine: Engine) -> int:
    """What the next checkpoint will take: the newest committed one's size, else an estimate
    from the parameter count (ZeRO-3 parameters report their full size as ds_numel)."""
    latest = latest_committed(run_dir)
    if latest is not None:
        return bytes_on_disk(latest.path)
    n = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    return n * _BYTES_PER_PARAM


def _write_partition(engine: Engine, root: Path, tag: str,
                     state: TrainerState) -> BaseException | None:
    """This rank's files of checkpoint `tag` (the engine's, its RNG state, rank 0's trainer
    state), fsynced; what failed, if anything. An engine whose save is collective joins its
    collectives even when its own write fails (Engine.save), so the others hear of it here
    rather than die on a collective this rank never joins."""
    rank, _ = rank_and_world()
    tag_dir = root / tag
    try:
        written = engine.save(root, tag)
        rng = tag_dir / f"rng_rank{rank}.pt"
        torch_save_atomic(rng_state(), rng)
        written.append(rng)
        if rank == 0:
            written.append(write_state(tag_dir, state))
        for p in written:
            fsync_path(p)
    except Exception as e:  # noqa: BLE001 - returned, shared with every rank, then raised
        return e
    return None


def _describe_failure(e: BaseException, root: Path) -> str:
    """One line for a failed write, with the free space as the failing rank saw it (one number,
    the same line on every rank)."""
    first = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}; {human_size(free_bytes(root))} free there"


def save(engine: Engine, run_dir: str | Path, step: int, state: TrainerState, *, keep: int,
         check_free_space: bool = True, log: Callable[[str], None] = print) -> Committed:
    """Save and commit checkpoint `step_<step>` (module docstring). Collective: every rank must
    call it."""
    from bertscale.distributed import barrier, gather_problems

    run_dir = Path(run_dir)
    rank, world = rank_and_world()
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    t0 = time.monotonic()
    needed = checkpoint_bytes_estimate(run_dir, engine)
    problem = space_problem(root, needed, f"checkpoint step {step}") if check_free_space else None
    problems = gather_problems([problem] if problem else [])
    if problems:
        raise UserError(problems[0] + newest_committed_note(run_dir))
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of an interrupted save of this same step (never committed): start clean, so
        # no stale partition of another world size sits beside the new files.
        if tag_dir.exists() and read_commit(tag_dir) is None:
            shutil.rmtree(tag_dir)
        shutil.rmtree(universal_path(root, tag), ignore_errors=True)
        tag_dir.mkdir()   # before any rank writes into it
    barrier()
    error = _write_partition(engine, root, tag, state)
    failure = _describe_failure(error, root) if error else None
    problems = gather_problems([failure] if failure else [])
    if problems:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        if error is not None and not is_write_failure(error, root):
            raise error  # not the filesystem: a fault of ours, with its traceback
        raise UserError(f"checkpoint step {step}: writing {tag_dir} failed ({problems[0]}); a "
                        f"checkpoint needs about {human_size(needed)}"
                        + newest_committed_note(run_dir))
    marker = {"tag": tag, "step": step, "world_size": world, "format": FORMAT_VERSION,
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    failure = None
    if rank == 0:
        try:
            write_marker(tag_dir, marker)
        except OSError as e:
            failure = f"checkpoint step {step}: committing {tag_dir} failed ({e})"
            (tag_dir / COMMIT_FILE).unlink(missing_ok=True)
    # Also the barrier that keeps every rank (and so the launcher) alive until the commit exists.
    problems = gather_problems([failure] if failure else [])
    if problems:
        raise UserError(problems[0] + newest_committed_note(run_dir))
    if rank == 0:
        prune(run_dir, keep, log=log)
        log(f"checkpoint step {step} committed at {tag_dir} ({time.monotonic() - t0:.1f}s)")
    return Committed(step, tag_dir, marker)
