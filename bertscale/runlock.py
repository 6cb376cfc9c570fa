"""One writer per run folder, and how the last one stopped.

Rank 0 of `bertscale pretrain` holds an exclusive `flock` on `<run>/.lock` for the life of the
trainer and records itself in `<run>/lock.json` (host, pid, SLURM job id and restart count, start
time; written atomically). A second trainer on the same folder finds the lock taken and stops at
once, on every rank, with one line naming the holder (exit 2).

Nothing stale ever blocks a resume:
- The kernel drops a flock when its process dies, however it dies (`kill -9` included); the
  record it leaves behind is only read to name a holder whose lock is still held.
- A requeued SLURM job (same `SLURM_JOB_ID`, higher `SLURM_RESTART_COUNT`) takes over a lock that
  its own previous run still holds: SLURM ends a job's processes before it requeues it, so such a
  lock is left by a dead node that a network filesystem has not yet noticed.
- Likewise a worker group that torchrun restarted (same `TORCHELASTIC_RUN_ID`, torchrun's
  `--rdzv-id`, other than its default "none") takes over the lock of an earlier group of the same
  job: torchrun starts a group only after every agent of the new rendezvous stopped its workers,
  so the holder is on a node that left (died, or was cut off and can no longer commit).

Preemption record: when the trainer stops for preemption after committing a checkpoint, rank 0
writes `<run>/preempted.json` (step, signals, which rank got which signal, exit code); a trainer
that takes the lock removes the previous one. So the file exists exactly when the last run of this
folder stopped to be requeued, whatever the launcher made of its exit code (torchrun turns 75 into
1); slurm/requeue.sh reads it. A stop for Ctrl-C alone (exit 130) writes none: nothing to requeue.
Every rank also records it on its own node for `bertscale launch` (distributed.PREEMPTED_RECORD_ENV).

Limits: the lock is as good as the filesystem's flock. Local disks and NFSv4 (Linux turns flock
into a byte-range lock the server keeps, released when the client's lease expires, ~90 s after a
node dies) lock across nodes; Lustre does so only when mounted `-o flock` (`-o localflock` locks
within one node; with neither, flock fails and the trainer runs unlocked, with a warning); NFSv3
needs a working lockd. Only `bertscale pretrain` takes the lock: `bertscale export` and other
readers are not blocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale import distributed
from bertscale.errors import UserError
from bertscale.files import write_json_atomic
from bertscale.exitcodes import PREEMPTED_EXIT_CODE

LOCK_FILE = ".lock"
HOLDER_FILE = "lock.json"
PREEMPTED_FILE = "preempted.json"

# flock failing with these means "this filesystem cannot lock", not "someone holds it".
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _slurm_job() -> tuple[str | None, int]:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    return job, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _torchrun_job() -> str | None:
    """torchrun's rendezvous id, when it names one job (its default "none" names none)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def _me() -> dict[str, Any]:
    job, restart = _slurm_job()
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "slurm_restart_count": restart, "torchrun_job": _torchrun_job(),
            "torchrun_restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            "started": round(time.time(), 3)}


def _stale(holder: dict[str, Any] | None) -> str | None:
    """Why the live-looking lock of `holder` belongs to a dead earlier run of this very job
    (module docstring), or None."""
    if not holder:
        return None
    job, restart = _slurm_job()
    if job and holder.get("slurm_job_id") == job and \
            int(holder.get("slurm_restart_count") or 0) < restart:
        return "this job's previous run"
    run_id = _torchrun_job()
    if run_id and holder.get("torchrun_job") == run_id:
        return f"an earlier worker group of this torchrun job ({run_id})"
    return None


def describe(holder: dict[str, Any] | None) -> str:
    """"host h1, pid 123, SLURM job 42 (restart 0), since 2026-01-01 10:00:00" for the messages."""
    if not holder:
        return "a process that has not recorded itself yet"
    text = f"host {holder.get('host')}, pid {holder.get('pid')}"
    if holder.get("slurm_job_id"):
        text += f", SLURM job {holder['slurm_job_id']} (restart {holder.get('slurm_restart_count', 0)})"
    if holder.get("torchrun_job"):
        text += (f", torchrun job {holder['torchrun_job']} (worker restart "
                 f"{holder.get('torchrun_restart_count', 0)})")
    if holder.get("started"):
        text += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
    return text


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _flock_fresh(path: Path) -> int:
    """An fd holding LOCK_EX on the file now at `path` (retrying when the file was replaced
    between open and flock). Raises BlockingIOError when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@dataclass
class RunLock:
    """The run folder's lock as every rank sees it: rank 0 holds it (`fd`, None where the
    filesystem cannot lock); the other ranks' copies do nothing."""

    run_dir: Path
    main: bool = False
    fd: int | None = None

    def record_preemption(self, step: int, signals_by_rank: dict[int, list[str]]) -> None:
        """Rank 0: the run stopped for preemption with checkpoint `step` committed, because of
        these signals on these ranks (every rank's, gathered at that step)."""
        distributed.record_preempted_exit(step)  # every rank, for its node's launcher
        if not self.main:
            return
        job, restart = _slurm_job()
        signals = list(dict.fromkeys(n for got in signals_by_rank.values() for n in got))
        write_json_atomic(self.run_dir / PREEMPTED_FILE, {
            "step": step, "signals": signals,
            "signals_by_rank": {str(r): got for r, got in sorted(signals_by_rank.items())},
            "exit_code": PREEMPTED_EXIT_CODE,
            "time": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": job, "slurm_restart_count": restart})

    def release(self) -> None:
        if not self.main:
            return
        if (read_holder(self.run_dir) or {}).get("pid") == os.getpid():
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # closing the last fd drops the flock
        self.main, self.fd = False, None


def _take(run_dir: Path) -> RunLock | str:
    """Rank 0: the lock, or the one-line reason it cannot be had."""
    path = run_dir / LOCK_FILE
    try:
        fd = _flock_fresh(path)
    except BlockingIOError:
        holder = read_holder(run_dir)
        whose = _stale(holder)
        if whose:
            # Our own job before its requeue or restart: dead, its lock not yet released.
            print(f"warning: {run_dir}: taking over the lock of {whose} "
                  f"({describe(holder)})", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            return _take(run_dir)
        return (f"{run_dir}: another `bertscale pretrain` is writing this run folder "
                f"({describe(holder)}); wait for it to end or stop it, or use another --run-dir")
    except OSError as e:
        if e.errno not in _NO_LOCKING:
            return f"{path}: cannot lock the run folder ({e.strerror})"
        print(f"warning: {run_dir}: this filesystem does not support flock ({e.strerror}); "
              f"running without the run-folder lock (on Lustre, mount with -o flock)",
              file=sys.stderr, flush=True)
        fd = None
    write_json_atomic(run_dir / HOLDER_FILE, _me())
    (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)  # it described the previous run
    return RunLock(run_dir, True, fd)


def acquire(run_dir: Path, is_main: bool) -> RunLock:
    """Every rank calls it, after the process group starts: rank 0 takes the lock, and if it
    cannot, every rank raises the same UserError (no rank is left waiting in a collective)."""
    distributed.clear_preempted_record()  # a record of an earlier worker group is void now
    lock, problems = RunLock(run_dir), []
    if is_main:
        taken = _take(run_dir)
        if isinstance(taken, str):
            problems.append(taken)
        else:
            lock = taken
    problems = distributed.gather_problems(problems)
    if problems:
        raise UserError(problems[0])
    return lock
