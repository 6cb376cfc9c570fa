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


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


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
              timeout: float = 300, cwd: str | Path | None = None, check: bool = True) -> list[RankResult]:
    """Start `python argv...` once per rank and wait for all. With check=True a failing rank
    raises with every rank's stderr tail, so a test failure shows what went wrong."""
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
