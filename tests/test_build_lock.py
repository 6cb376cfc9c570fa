"""DeepSpeed's JIT-built op through `bertscale pretrain` and `bertscale doctor` (issue 22 item 11,
and the newcomer's rebuilds):

- a stale build lock (the 0-byte `lock` a process killed while DeepSpeed built or loaded its CPU
  op leaves behind) is reported by `doctor`, naming the file, and `pretrain` removes it with one
  line and trains. Before the fix `pretrain` waited on it forever without a word (this test
  failed at its 240-second limit) and `doctor` said nothing;
- with no TORCH_EXTENSIONS_DIR, the op is built in (and loaded from) a folder of this Python
  environment, not the `~/.cache/torch_extensions` every environment shares: `doctor` names it,
  and a run leaves $HOME's cache untouched. Before the fix the run built the op there (21-35 s
  whenever another environment had used it last).

The locks here are in a private copy of the build cache: a lock in the shared one would stop
every other DeepSpeed start on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertscale import jitbuild
from launch import run_ranks
from pretrain_runs import manifest, pretrain_argv  # noqa: F401

pytestmark = pytest.mark.slow

OP = "deepspeed_shm_comm"
SHORT = ("train.steps=2", "schedule.warmup=1", "checkpoint.every=0", "eval.every=0",
         "eval.at_start=false", "train.global_batch_size=8", "train.micro_batch_size=8")


def private_extensions(tmp_path: Path) -> Path:
    """A copy of the build cache this session uses (the op's build, without any lock), so that
    a lock a test leaves or plants stops nobody else; empty when nothing is built yet (the
    first run then builds it, once)."""
    ext = tmp_path / "torch_extensions"
    built = jitbuild.cache_dir() / OP
    if built.is_dir():
        shutil.copytree(built, ext / OP, ignore=shutil.ignore_patterns(jitbuild.TORCH_LOCK))
    ext.mkdir(exist_ok=True)
    return ext


def doctor(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bertscale.cli", "doctor", "--no-wandb"],
                          env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_stale_build_lock_is_reported_and_removed_and_the_cache_is_per_environment(
        manifest, tmp_path):
    ext = private_extensions(tmp_path)
    lock = ext / OP / jitbuild.TORCH_LOCK
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - 120, time.time() - 120))   # a run killed two minutes ago
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}

    checked = doctor(env, tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    line = next((x for x in checked.stdout.splitlines() if str(lock) in x), checked.stdout)
    assert "warn" in line and "a DeepSpeed build lock no process" in line, line
    assert f"rm {lock}" in line
    assert lock.exists(), "doctor reports; it does not remove"

    (r,) = run_ranks(pretrain_argv(tmp_path / "run", manifest, *SHORT), 1, env=env,
                     timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"removed a stale DeepSpeed build lock, {lock}" in r.stderr, r.stderr[-3000:]
    assert not lock.exists()
    assert "done: 2 steps" in r.stdout

    # No TORCH_EXTENSIONS_DIR: this environment's own cache, never $HOME's shared one.
    home = tmp_path / "home"
    home.mkdir()
    env = {"TORCH_EXTENSIONS_DIR": "", "HOME": str(home)}
    expected = Path(sys.prefix) / "torch_extensions"
    if not os.access(sys.prefix, os.W_OK):
        pytest.skip(f"{sys.prefix} is not writable: the per-environment cache is under $HOME")
    checked = doctor(env, tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert f"{expected} (this Python environment's" in checked.stdout, checked.stdout
    (r,) = run_ranks(pretrain_argv(tmp_path / "run2", manifest, *SHORT), 1, env=env,
                     timeout=400, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (expected / OP / f"{OP}.so").is_file()
    assert not (home / ".cache" / "torch_extensions").exists()
