"""Who may write a run folder, and what happens when a launcher dies, through `bertscale pretrain`
on real Wikipedia shards: the run-folder lock (a second live trainer refused at once, a stale lock
never blocking a resume), workers dying with torchrun, and the preemption record the SLURM
scripts requeue on (slurm/requeue.sh, sourced and run here as the sbatch scripts do)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import free_port, run_ranks
from pretrain_runs import manifest, pretrain_argv  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
# A long run that commits often: the tests stop it long before its last step.
LIVE = ("train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=400", "checkpoint.every=2", "eval.every=0",
        "eval.at_start=false", "schedule.warmup=1")


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "w")
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(argv, env=e, stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_until(done, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    wait_until(lambda: text in log.read_text(), proc, log, repr(text), timeout)


def latest_step(run: Path) -> int:
    from bertscale.checkpoint import latest_committed  # reads what the trainer committed
    return latest_committed(run).step


@pytest.mark.slow
def test_second_writer_refused_and_stale_locks_never_block(manifest, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    argv = [sys.executable, *pretrain_argv(run, manifest, *LIVE)]
    first = start(argv, tmp_path / "first.log", env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"})
    try:
        wait_for(tmp_path / "first.log", "checkpoint step 2 committed", first)
        # 1. A second trainer (2 ranks, another job) on the live folder: refused at once, every
        # rank with the same one line naming the holder.
        t0 = time.monotonic()
        second = run_ranks(pretrain_argv(run, manifest, *LIVE), 2, check=False, timeout=300)
        for r in second:
            assert r.returncode == 2, r.stderr[-2000:]
            assert "Traceback" not in r.stderr
        lines = [next((x for x in r.stderr.splitlines() if "another `bertscale pretrain`" in x),
                      r.stderr[-2000:]) for r in second]
        assert lines[0] == lines[1]
        holder = f"host {socket.gethostname()}, pid {first.pid}, SLURM job 4242 (restart 0)"
        assert holder in lines[0], lines[0]
        print(f"second writer refused in {time.monotonic() - t0:.1f}s: {lines[0]}")
        assert first.poll() is None, "the refused trainer must not disturb the live one"

        # 2. The same SLURM job requeued (restart 1) while its previous run's lock is still held
        # (here: the old trainer frozen, as on a dead node whose NFS lock is not yet released):
        # it takes the lock over and resumes.
        first.send_signal(signal.SIGSTOP)
        step = latest_step(run)
        requeued = subprocess.run([*argv, "--resume", "require", "--stop-at-step", str(step + 1)],
                                  env={**os.environ, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"},
                                  capture_output=True, text=True, timeout=300)
        assert requeued.returncode == 0, requeued.stderr[-3000:]
        assert "taking over the lock of this job's previous run" in requeued.stderr
        assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in requeued.stdout
        assert not (run / "lock.json").exists(), "a trainer that ends removes its holder record"
    finally:
        first.kill()
        first.wait()

    # 3. A trainer killed with kill -9 leaves its holder record; its lock died with it.
    third = start(argv, tmp_path / "third.log")
    try:
        wait_until(lambda: latest_step(run) > step + 1, third, tmp_path / "third.log",
                   "a checkpoint after the resume")
    finally:
        third.kill()
        third.wait()
    assert json.loads((run / "lock.json").read_text())["pid"] == third.pid
    step = latest_step(run)
    resumed = subprocess.run([*argv, "--resume", "require", "--stop-at-step", str(step + 1)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in resumed.stdout
