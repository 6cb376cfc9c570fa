"""In-job elastic membership through `bertscale launch --nnodes 1:2` (torchrun's c10d rendezvous,
`--max-restarts`), two "nodes" on 127.0.0.1 with an elastic PyTorchJob's environment
(PET_RDZV_ENDPOINT, PET_NNODES=1:2, PET_RDZV_ID).

1. A node dies (`kill -9` of its launcher, torchrun agent and worker) mid-run: the survivor's
   worker loses its peer, torchrun restarts it (no requeue, no new job), the rendezvous closes
   with the one node left, and the worker resumes from the newest committed checkpoint at world
   size 1 (a universal conversion, gradient accumulation doubled to keep the global batch 8). The
   losses of every step equal an uninterrupted 2-rank run's (fp32, dropout off): the steps before
   the resume point exactly (same ranks), the steps after it within 1e-4 (1 rank sums in another
   order). With dropout off the loss of a step is a function of its samples, so a repeated or
   skipped sample would move it by orders of magnitude more (tests/test_resume_matrix.py): this is
   the check that the sample stream continues with no repeat and no gap; the trainer's counter of
   consumed samples is checked too. Steps after the last committed checkpoint are redone.
2. The run-folder lock under torchrun restarts: an earlier worker group's rank 0 that still holds
   the lock (frozen with SIGSTOP: a dead node whose network-filesystem lock is not yet released)
   is taken over by the next group of the same torchrun job (same --rdzv-id), which resumes. On
   main this failed: the new rank 0 stopped with "another `bertscale pretrain` is writing this
   run folder" (exit 2), and torchrun's restarts ran out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch import free_port
from pretrain_runs import cached, manifest, pretrain, records, train_losses  # noqa: F401

pytestmark = pytest.mark.slow

STEPS, G = 14, 8
SETS = (f"train.steps={STEPS}", f"train.global_batch_size={G}", "train.micro_batch_size=2",
        "checkpoint.every=2", "eval.every=0", "eval.at_start=false", "schedule.warmup=1",
        "data.verify_sha256=false", "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0")


def node_env(port: int, run_id: str) -> dict[str, str]:
    """An elastic PyTorchJob worker's environment (training-operator v1.9 elastic.go); the
    rendezvous host is 127.0.0.1. last_call_timeout: how long a rendezvous that has its minimum
    waits for more nodes (torchrun's default, 30 s, only makes the test slower)."""
    return {**os.environ, "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_BACKEND": "c10d",
            "PET_NNODES": "1:2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_ID": run_id,
            "PET_RDZV_CONF": "last_call_timeout=5", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1"}


def start_node(run: Path, manifest: Path, env: dict[str, str], log: Path,
               *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "bertscale", "launch", "pretrain", "tiny_ci", "--run-dir",
            str(run), "--set", f"data.manifest={json.dumps(str(manifest))}", *extra]
    for s in SETS:
        argv += ["--set", s]
    return subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return time.monotonic()
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen (exit {proc.poll()}):\n{log.read_text()[-4000:]}")


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> dict[int, float]:
    def build():
        run = tmp_path_factory.mktemp("elastic_ref") / "run"
        pretrain(run, manifest, 2, *SETS)
        return train_losses(run)
    return cached("elastic_membership_reference", build)


def test_a_node_dies_and_the_survivor_continues_alone(manifest, reference, tmp_path):
    run = tmp_path / "run"
    env = node_env(free_port(), "bert-elastic")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [start_node(run, manifest, env, logs[0])]
    time.sleep(1)  # node 0 hosts the rendezvous store
    nodes.append(start_node(run, manifest, env, logs[1]))
    doomed: list[psutil.Process] = []
    try:
        both = "2 rank(s), ZeRO-2 fp32, global batch 8 = 2 x 2 accumulation x 2"
        texts = lambda: logs[0].read_text() + logs[1].read_text()  # noqa: E731
        deadline = time.monotonic() + 300
        while "checkpoint step 4 committed" not in texts() and time.monotonic() < deadline:
            assert all(n.poll() is None for n in nodes), texts()[-4000:]
            time.sleep(0.2)
        assert both in texts(), texts()[-4000:]
        # Node 1 dies (node 0 hosts torchrun's rendezvous store, the one node a c10d job cannot
        # lose): its launcher, torchrun agent and worker at once, as with a lost machine.
        victim, survivor = 1, 0
        doomed = tree(nodes[victim])
        assert len(doomed) >= 3, doomed
        kill_all(doomed)
        killed = time.monotonic()
        rc = nodes[survivor].wait(timeout=400)
        done = time.monotonic()
    finally:
        kill_all(doomed)
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    text = logs[survivor].read_text()
    assert rc == 0, text[-5000:]
    assert "1 rank(s), ZeRO-2 fp32, global batch 8 = 2 x 4 accumulation x 1" in text, text[-5000:]
    resumed = [line for line in text.splitlines() if line.startswith("resumed from ")]
    assert len(resumed) == 1 and "converted from 2 ranks through a universal checkpoint" in \
        resumed[0], text[-5000:]
    resume_step = int(resumed[0].split("(step ")[1].split(",")[0])
    assert resume_step >= 4
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        rel = 1e-6 if step <= resume_step else 1e-4
        assert losses[step] == pytest.approx(reference[step], rel=rel), \
            f"step {step}: {losses[step]} vs the uninterrupted run's {reference[step]}"
    last = records(run, "train")[-1]
    assert last["step"] == STEPS and last["consumed_samples"] == STEPS * G
    print(f"node 1 killed after checkpoint 4; the survivor resumed from step {resume_step} at "
          f"world size 1 and finished {done - killed:.1f}s after the kill; losses = the "
          f"uninterrupted run's (steps 1-{resume_step} exact, then within 1e-4)")


def test_a_new_worker_group_takes_over_the_lock_of_a_frozen_one(manifest, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_node(run, manifest, node_env(port, "bert-lock"), first_log)
    frozen: list[psutil.Process] = []
    second = None
    try:
        wait_for(first_log, "checkpoint step 2 committed", first)
        procs = tree(first)
        # The worker: not the launcher (`bertscale launch`) nor its torchrun agent
        # (`python -m bertscale.launch`).
        worker = next(p for p in procs if "pretrain" in p.cmdline()
                      and not {"launch", "bertscale.launch"} & set(p.cmdline()))
        worker.suspend()                         # holds the run-folder lock, forever silent
        frozen = [worker]
        kill_all([p for p in procs if p.pid != worker.pid])   # its node's launcher and agent
        first.wait()
        holder = json.loads((run / "lock.json").read_text())
        assert holder["pid"] == worker.pid and holder["torchrun_job"] == "bert-lock"
        second = start_node(run, manifest, node_env(port, "bert-lock"), second_log,
                            "--stop-at-step", "4")
        rc = second.wait(timeout=400)
    finally:
        kill_all(frozen)
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = second_log.read_text()
    assert rc == 0, text[-4000:]
    assert "taking over the lock of an earlier worker group of this torchrun job (bert-lock)" \
        in text, text[-4000:]
    assert "resumed from" in text and records(run, "train")[-1]["step"] == 4
