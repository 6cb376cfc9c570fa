"""DeepSpeed's JIT-built ops: a build cache per Python environment, and a build lock that a killed
process cannot leave behind.

DeepSpeed compiles its CPU shared-memory comm op (which `init_distributed` loads on the CPU
accelerator) on first use, through torch's cpp_extension, into `$TORCH_EXTENSIONS_DIR/<op>/`
(default `~/.cache/torch_extensions/<python>_<accelerator>/<op>/`). Two traps, both met here:

- That default is shared by every environment of one Python version, and a build records the
  absolute paths of the environment that made it: each switch of environment rebuilds the op
  (21-35 s). `cache_dir()` gives each environment its own folder instead:
  `<sys.prefix>/torch_extensions` when the environment is writable (a venv, a conda env, a
  container's Python), else `~/.cache/torch_extensions/env-<hash of sys.prefix>`.
  `TORCH_EXTENSIONS_DIR`, when set, wins.
- torch guards each build, and each later load (which re-runs ninja's up-to-date check), with a
  bare lock file, `<op>/lock`, made with O_EXCL and removed when done. A process killed in
  between (kill -9, a launcher's SIGTERM during start-up, Ctrl-C) leaves it, and every later
  start then waits on it forever, printing nothing. `load_ops()` loads the op while holding a
  kernel lock (flock on `<cache>/.bertscale-build.lock`, released when its holder dies, however
  it dies), so bertscale processes take turns; a torch lock found while holding it was left by
  a dead process unless a process on this machine is building in that folder (ninja or the
  compiler working there). A lock nobody works under for `STALE_AFTER_S` is removed, with one
  line saying so. `stale_locks()` is what `bertscale doctor` reports.

Limits: on a shared filesystem, a build by another program (not bertscale, which takes turns)
running on another machine is invisible from here and its lock would be taken as stale. Local
ranks load the op one after the other (each load is ninja's up-to-date check, well under a
second once built).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

TORCH_LOCK = "lock"
"""The name of torch's build lock in an op's folder (torch.utils.file_baton.FileBaton)."""
OUR_LOCK = ".bertscale-build.lock"
STALE_AFTER_S = 10.0
"""How long a torch lock must sit with nobody building under it to be taken as stale (the
Python work before and after ninja, under the lock, takes well under a second)."""


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where DeepSpeed's ops are built: TORCH_EXTENSIONS_DIR, else one folder per Python
    environment (the module docstring says which)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    key = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"env-{key}"


def use_environment_cache() -> Path:
    """Point torch's extension builds (this process and its children) at `cache_dir()` (an
    empty TORCH_EXTENSIONS_DIR counts as unset: torch would build in the current folder)."""
    path = cache_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


@dataclass(frozen=True)
class Lock:
    path: Path
    age_s: float
    builders: tuple[int, ...]
    """Processes on this machine working in the lock's folder (a live build)."""

    @property
    def stale(self) -> bool:
        return not self.builders and self.age_s >= STALE_AFTER_S

    def advice(self) -> str:
        return (f"{self.path}: a DeepSpeed build lock no process on this machine works under "
                f"({self.age_s:.0f} s old), left by a process killed while building or loading "
                f"the op; every DeepSpeed start waits on it forever: remove it (rm {self.path})")


def _working_in(folder: Path) -> tuple[int, ...]:
    """Pids of the processes whose working directory is `folder` or below (ninja and the
    compiler run there during a build). Linux (/proc); elsewhere none are seen."""
    pids = []
    target = str(folder.resolve())
    try:
        entries = os.listdir("/proc")
    except OSError:
        return ()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:       # gone, or another user's
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            pids.append(int(entry))
    return tuple(pids)


def torch_locks(root: Path) -> list[Lock]:
    """torch's build locks in the op folders under `root` (an extensions folder: with
    TORCH_EXTENSIONS_DIR, `<root>/<op>/lock`; torch's default root has one more level)."""
    found = []
    now = time.time()
    for lock in [*root.glob(f"*/{TORCH_LOCK}"), *root.glob(f"*/*/{TORCH_LOCK}")]:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        found.append(Lock(lock, max(age, 0.0), _working_in(lock.parent)))
    return found


def stale_locks(*roots: Path) -> list[Lock]:
    """The stale torch build locks under `roots` (for `bertscale doctor`)."""
    return [lock for root in dict.fromkeys(roots) if root.is_dir()
            for lock in torch_locks(root) if lock.stale]


@contextlib.contextmanager
def build_turn(root: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold this cache's kernel lock; inside, no torch lock under `root` is stale: each is
    waited for while a process builds under it, and removed (said with `say`) once nobody has
    for STALE_AFTER_S."""
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / OUR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:   # a read-only cache of prebuilt ops: nobody builds, nobody leaves a lock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)    # the kernel drops it when this process dies
        said: set[Path] = set()
        while True:
            locks = torch_locks(root)
            if not locks:
                break
            for lock in locks:
                if lock.stale:
                    try:
                        lock.path.unlink()
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        from bertscale.errors import UserError
                        raise UserError(f"{lock.advice()} ({e.strerror})") from None
                    say(f"removed a stale DeepSpeed build lock, {lock.path} ({lock.age_s:.0f} s "
                        f"old, no process building there): left by a process killed while it "
                        f"built or loaded the op")
                elif lock.builders and lock.path not in said and lock.age_s > 10:
                    said.add(lock.path)
                    say(f"waiting for the DeepSpeed build in {lock.path.parent} (pid "
                        f"{', '.join(map(str, lock.builders))})")
            time.sleep(0.25)
        yield
    finally:
        os.close(fd)   # releases the flock


def load_ops(say: Callable[[str], None]) -> None:
    """Build (once per environment) or load the op DeepSpeed's process group uses on this
    accelerator, taking turns with other bertscale processes and clearing a stale build lock
    first. DeepSpeed keeps the loaded op, so `init_distributed` does not load it again."""
    root = use_environment_cache()   # the user's TORCH_EXTENSIONS_DIR when set
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return   # as deepspeed.comm.torch.build_shm_op: no such op on this accelerator
    with build_turn(root, say):
        if not (root / builder.name / f"{builder.name}.so").is_file():
            say(f"building DeepSpeed's {builder.name} op in {root} (once per environment; "
                f"about half a minute)")
        builder.load()
