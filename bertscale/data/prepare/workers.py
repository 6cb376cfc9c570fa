"""Running a stage's tasks (units or shards) here or in a pool of `--workers` processes, with
their progress reported to this process."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from typing import Any

from bertscale.data.prepare.progress import Progress
from bertscale.data.prepare.shard_tasks import ShardTask, write_shard
from bertscale.data.prepare.units import UnitTask, process_unit

_PROGRESS_Q: Any = None  # a pool worker's queue to the parent's progress


def _pool_init(q: Any) -> None:
    global _PROGRESS_Q
    _PROGRESS_Q = q
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _unit_in_worker(task: UnitTask) -> dict[str, Any]:
    return process_unit(task, lambda b, n: _PROGRESS_Q.put((b, n)))


def run_tasks(tasks: list[UnitTask] | list[ShardTask], workers: int,
              progress: Progress | None) -> None:
    """Run unit or shard tasks here (one worker) or in a spawn pool."""
    _run_tasks(tasks, workers, progress)
    if progress is not None:
        progress.done("finished")


def _run_tasks(tasks: list[UnitTask] | list[ShardTask], workers: int,
               progress: Progress | None) -> None:
    units = bool(tasks) and isinstance(tasks[0], UnitTask)

    def task_done(info: dict[str, Any]) -> None:
        if progress is not None:
            progress.update(samples=0 if units else info["samples"], units=1)

    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            if isinstance(t, UnitTask):
                task_done(process_unit(t, progress.update if progress is not None else None))
            else:
                task_done(write_shard(t))
        return
    ctx = mp.get_context("spawn")  # never fork a process whose tokenizer threads are running
    q = ctx.Queue()
    fn = _unit_in_worker if units else write_shard
    with ctx.Pool(min(workers, len(tasks)), initializer=_pool_init, initargs=(q,)) as pool:
        pending = [pool.apply_async(fn, (t,)) for t in tasks]
        while pending or not q.empty():
            try:
                b, n = q.get(timeout=0.1)
                if progress is not None:
                    progress.update(b, n)
                continue
            except queue.Empty:
                pass
            still = []
            for p in pending:
                if p.ready():
                    task_done(p.get())  # re-raises a worker's exception here
                else:
                    still.append(p)
            pending = still
