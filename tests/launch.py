"""Run a Python script as N real ranks on this machine (loopback, gloo), as torchrun would.

Each rank is a separate process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set, so the code under test discovers its environment exactly as in production.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run in front of `-m module args...`: the module as `python -m` would run it, then, at exit,
# after every exit handler of the code under test has run (atexit calls this one last), a line
# naming the threads the process still has. What the interpreter's teardown would then have to
# end: a process group's threads there abort the process now and then (bertscale.distributed,
# "Ending"). A line in the test's output, not a helper of the product.
EXIT_WATCH = """
import atexit, os, runpy, sys
def _threads():
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip()
                   for t in os.listdir("/proc/self/task"))
    print("threads at exit: " + " ".join(names), file=sys.stderr, flush=True)
atexit.register(_threads)
assert sys.argv[1] == "-m", sys.argv
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
# Threads of torch.distributed's gloo / NCCL process groups and their TCP store.
GROUP_THREADS = ("gloo", "pt_gloo", "pt_nccl", "pt_tcpstore")


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def group_threads_at_exit(self) -> list[str]:
        """Under `watch_exit`: the process-group threads still there when the rank exited."""
        line = next(x for x in self.stderr.splitlines() if x.startswith("threads at exit: "))
        return [n for n in line.split(": ", 1)[1].split() if n.startswith(GROUP_THREADS)]


def start_ranks(argv: list[str], world_size: int, *, env: dict[str, str] | None = None,
                cwd: str | Path | None = None, stdout: object = subprocess.PIPE,
                stderr: object = subprocess.PIPE) -> list[subprocess.Popen]:
    """Start `python argv...` once per rank, as a launcher would, and return at once. `stdout`
    / `stderr`: what Popen takes, or a callable rank -> file."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        e = dict(os.environ)
        e.update(env or {})
        e.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                 LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, cwd=cwd, text=True,
                                      stdout=stdout(rank) if callable(stdout) else stdout,
                                      stderr=stderr(rank) if callable(stderr) else stderr))
    return procs


def run_ranks(argv: list[str], world_size: int, *, env: dict[str, str] | None = None,
              timeout: float = 300, cwd: str | Path | None = None, check: bool = True,
              watch_exit: bool = False) -> list[RankResult]:
    """Start `python argv...` once per rank and wait for all. With check=True a failing rank
    raises with every rank's stderr tail, so a test failure shows what went wrong. With
    `watch_exit` (argv: `-m module ...`) each rank reports its threads at exit (EXIT_WATCH)."""
    if watch_exit:
        argv = ["-c", EXIT_WATCH, *argv]
    procs = start_ranks(argv, world_size, env=env, cwd=cwd)
    results = []
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            results.append(RankResult(rank, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    if check and any(r.returncode for r in results):
        detail = "\n".join(f"--- rank {r.rank} exit {r.returncode}\n{r.stderr[-3000:]}" for r in results)
        raise AssertionError(f"ranks failed:\n{detail}")
    return results
