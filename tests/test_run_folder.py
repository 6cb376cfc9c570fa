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
    from bertscale.training.checkpoint.layout import latest_committed  # reads what the trainer committed
    return latest_committed(run).step


@pytest.mark.slow
def test_second_writer_refused_and_stale_locks_never_block(manifest, tmp_path):
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
        assert lines[0] == lines[1].replace("error: [rank 1] ", "error: ")  # the CLI tags ranks > 0
        holder = f"host {socket.gethostname()}, pid {first.pid}, SLURM job 4242 (restart 0)"
        assert holder in lines[0], lines[0]
        print(f"second writer refused in {time.monotonic() - t0:.1f}s: {lines[0]}")
        assert first.poll() is None, "the refused trainer must not disturb the live one"

        # 2. The same SLURM job requeued (restart 1) while its previous run's lock is still held
        # (here: the old trainer frozen, as on a dead node whose NFS lock is not yet released):
        # it takes the lock over and resumes.
        first.send_signal(signal.SIGSTOP)
        step = latest_step(run)
        requeued = start([*argv, "--resume", "require"], tmp_path / "requeued.log",
                         env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"})
        try:
            wait_until(lambda: latest_step(run) > step, requeued, tmp_path / "requeued.log",
                       "a checkpoint after the takeover")
        finally:
            # 3. ... and dies with kill -9: its lock goes with it, its holder record stays.
            requeued.kill()
            requeued.wait()
        text = (tmp_path / "requeued.log").read_text()
        assert "taking over the lock of this job's previous run" in text
        assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in text
    finally:
        first.kill()
        first.wait()

    assert json.loads((run / "lock.json").read_text())["pid"] == requeued.pid
    step = latest_step(run)
    resumed = subprocess.run([*argv, "--resume", "require", "--stop-at-step", str(step + 1)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in resumed.stdout
    assert not (run / "lock.json").exists(), "a trainer that ends removes its holder record"


# ------------------------------------------------------------------ workers and their launcher


def torchrun(run: Path, manifest: Path, log: Path, *sets: str) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m bertscale.commands.pretrain tiny_ci ...` on loopback."""
    return start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                  *pretrain_argv(run, manifest, *LIVE, *sets)], log)


def requeue_decision(rc: int, run: Path, stop_requested: int = 0) -> subprocess.CompletedProcess:
    """slurm/requeue.sh's decision, sourced and called the way slurm/pretrain.sbatch does."""
    return subprocess.run(["bash", "-c", '. "$0"; bertscale_should_requeue "$@"',
                           str(REPO / "slurm" / "requeue.sh"), str(rc), str(run), str(stop_requested)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_the_record_requeues(manifest, tmp_path):
    """torchrun forwards SIGTERM; the ranks commit a checkpoint and exit 75, which torchrun reports
    as 1: the run folder's preempted.json is what makes slurm/requeue.sh requeue. A resumed run
    that ends normally leaves no record, and the same exit code 1 then does not requeue."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = torchrun(run, manifest, log)
    try:
        wait_for(log, "checkpoint step 2 committed", proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 1, text[-3000:]  # torchrun's code for a worker's 75
    assert "preempted (SIGTERM)" in text, text[-3000:]
    record = json.loads((run / "preempted.json").read_text())
    step = latest_step(run)
    assert record["step"] == step and record["signals"] == ["SIGTERM"] and record["exit_code"] == 75
    decision = requeue_decision(rc, run)
    assert decision.returncode == 0 and "preempted.json" in decision.stdout, decision

    resumed = run_ranks(pretrain_argv(run, manifest, *LIVE, extra=("--stop-at-step", str(step + 1))), 2,
                        timeout=300)
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in resumed[0].stdout
    assert not (run / "preempted.json").exists()
    assert requeue_decision(1, run).returncode == 1
    assert requeue_decision(1, run, stop_requested=1).returncode == 0  # killed before a checkpoint


@pytest.mark.slow
def test_workers_die_with_a_killed_torchrun(manifest, tmp_path):
    """`kill -9` of torchrun: its workers get the parent-death signal (SIGTERM), take the
    preemption path (commit a checkpoint, record it, exit) and stop committing."""
    import psutil

    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = torchrun(run, manifest, log)
    workers: list[psutil.Process] = []
    try:
        wait_for(log, "checkpoint step 2 committed", proc)
        workers = [p for p in psutil.Process(proc.pid).children() if "bertscale.commands.pretrain" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        t0 = time.monotonic()
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=90)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        for p in workers:
            if p.is_running():
                p.kill()
    assert not alive, f"workers {[p.pid for p in alive]} still running {waited:.0f}s after torchrun died"
    print(f"workers exited {waited:.1f}s after kill -9 of torchrun")
    step = latest_step(run)
    assert json.loads((run / "preempted.json").read_text())["step"] == step
    time.sleep(2)
    assert latest_step(run) == step, "nothing commits after the workers are gone"


@pytest.mark.slow
def test_workers_die_with_torchrun_killed_during_their_start_up(manifest, tmp_path):
    """`kill -9` of torchrun one second after its workers appear, while they are still importing
    torch: both workers are gone within seconds (the parent-death signal is armed when the
    bertscale package is imported). Before the fix it was armed after `distributed.init`: the
    workers went on to wait for a rendezvous nobody would join, sleeping with ppid 1 for the
    init timeout (1800 s), and this test failed at its 20-second limit. The workers may die
    while holding DeepSpeed's build lock: they get a private copy of the build cache."""
    import psutil

    from test_build_lock import private_extensions

    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    env = {"TORCH_EXTENSIONS_DIR": str(private_extensions(tmp_path))}
    proc = start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                  *pretrain_argv(run, manifest, *LIVE)], log, env=env)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            workers = [p for p in psutil.Process(proc.pid).children()
                       if "bertscale.commands.pretrain" in " ".join(p.cmdline())]
            time.sleep(0.05)
        time.sleep(1.0)
        assert not (run / "lock.json").exists(), "too late: the workers are past their start-up"
        t0 = time.monotonic()
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=20)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        for p in workers:
            if p.is_running():
                p.kill()
    assert not alive, f"workers {[p.pid for p in alive]} still there {waited:.0f} s after torchrun died"
    print(f"workers gone {waited:.1f} s after kill -9 of torchrun")


def test_a_launcher_dead_before_the_prctl_is_noticed(tmp_path):
    """What the command cannot show on demand, with library calls in real processes:
    1. importing `bertscale` arms the signal: a worker started with torchrun's variables by a
       middle process (the "launcher") that exits once the worker has imported it is ended by
       SIGTERM from the kernel, with no handler of its own installed;
    2. the race: the launcher died between the moment the worker read its parent and the prctl
       (stood in for by a changed `_PARENT_AT_START`): arming notices it and sends the signal
       itself, which after `install_signal_handlers` sets the preemption flag."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, time\n"
        "import bertscale\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
        "print('still running')\n"
    )
    ready, out = tmp_path / "ready", tmp_path / "out"
    launcher = (
        "import subprocess, sys, time, os\n"
        f"p = subprocess.Popen([sys.executable, {str(worker)!r}, {str(ready)!r}],"
        f" stdout=open({str(out)!r}, 'w'), env={{**os.environ, 'TORCHELASTIC_RUN_ID': 'x'}})\n"
        f"while not os.path.exists({str(ready)!r}) or not open({str(ready)!r}).read():\n"
        "    time.sleep(0.05)\n"
    )
    subprocess.run([sys.executable, "-c", launcher], check=True, timeout=120)
    import psutil
    pid = int(ready.read_text())
    deadline = time.monotonic() + 20
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the orphaned worker is still running"
        time.sleep(0.05)
    assert "still running" not in (out.read_text() if out.exists() else "")

    race = subprocess.run([sys.executable, "-c",
                           "from bertscale import distributed\n"
                           "distributed.install_signal_handlers()\n"
                           "distributed._PARENT_AT_START = -1\n"
                           "distributed.die_with_launcher()\n"
                           "print('flag', distributed.local_preemption_flag(), "
                           "distributed.signal_names())\n"],
                          env={**os.environ, "TORCHELASTIC_RUN_ID": "x"}, capture_output=True,
                          text=True, timeout=120)
    assert race.stdout.strip() == "flag True ['SIGTERM']", race
