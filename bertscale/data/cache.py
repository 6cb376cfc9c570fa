"""The node-level shard cache and the background prefetcher for remote shards.

One cache folder per node (``data.cache_dir``; it must be on a node-local disk: the locks are
``flock`` locks, which network filesystems do not all honour), shared by every rank and loader
worker of the node:

- a shard is fetched once per node: its fetcher holds an exclusive lock on ``NAME.lock``; any
  other process (or thread) that wants the shard blocks on that lock, then finds the file and
  maps it;
- a download streams into ``NAME.part-PID-TID`` while hashing, and is renamed into place (after
  fsync) only when its size and sha256 equal the manifest's, so a shard in the cache under its own
  name is complete and verified; a download cut off midway leaves only a ``.part`` file, which the
  next holder of the shard's lock deletes before it retries;
- a cached shard is reused as long as its size matches (after a requeue nothing is refetched);
  every sample still carries a CRC-32 that the loader checks on each read;
- with a size bound (``data.cache_limit_gb``), the least recently used shards (by the time a
  process last mapped them) are deleted to make room before a download starts, never one of the
  current or next shuffle window of the process making room and never one whose lock is held.
  Room is reserved under one cache-wide lock by creating the ``.part`` file at its full size, so
  concurrent downloads cannot together overshoot the bound. A deleted file that another process
  has mapped stays readable for it (POSIX unlink). Limits: the bound counts file sizes only (not
  the lock files), the protected windows are those of the process making room (ranks of one job
  are at most a step apart, so theirs are the same or adjacent), and if the protected shards alone
  exceed the bound the cache goes over it, with a warning, rather than stop training.

The prefetcher (`ShardFetcher`): when the loader enters a shuffle window it asks for the shards of
that window and the next one; a thread pool (``data.fetch_concurrency`` downloads per process)
fetches them into the cache while the current window trains. Transient errors (connections
reset, timeouts, 5xx, a short read) are retried ``data.fetch_retries`` times with exponential
backoff; a missing object, refused credentials or a sha256 mismatch fail at once. A failure is
raised, as a `UserError` naming the object, when the loader next yields a batch. The fetch
threads are daemons: a preempted job exits without waiting for transfers in flight (each leaves a
``.part`` that the next fetch of that shard removes).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from bertscale.data import remote
from bertscale.errors import UserError
from bertscale.files import fsync_path

log = logging.getLogger("bertscale.data")

CHUNK = 1 << 22


@dataclass(frozen=True)
class FetchSettings:
    """How remote shards are cached and fetched (the recipe's data.cache_* / fetch_* fields)."""

    cache_dir: Path | None = None
    limit_bytes: int = 0
    """0: no bound."""
    prefetch: bool = True
    concurrency: int = 4
    retries: int = 5
    backoff_s: float = 0.5
    """First retry's delay; doubled per retry."""

    @classmethod
    def of(cls, data: Any) -> "FetchSettings":
        """From a recipe's [data] section (bertscale.config.DataSection)."""
        return cls(cache_dir=data.cache_dir, limit_bytes=int(data.cache_limit_gb * 1e9),
                   prefetch=data.prefetch, concurrency=data.fetch_concurrency,
                   retries=data.fetch_retries)


def default_cache_root() -> Path:
    root = os.environ.get("BERTSCALE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "bertscale") / "shards"


class _Corrupt(Exception):
    """The object was read whole but its sha256 is not the manifest's: no retry helps."""


@contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


class NodeCache:
    """Verified whole shards in one node-local folder; see the module docstring."""

    def __init__(self, root: Path, limit_bytes: int = 0):
        self.root = Path(root)
        self.limit = limit_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._warned = False

    def path(self, key: str) -> Path:
        return self.root / key

    def cached(self, key: str, size: int) -> Path | None:
        path = self.path(key)
        try:
            if path.stat().st_size == size:
                return path
        except FileNotFoundError:
            pass
        return None

    def touch(self, path: Path) -> None:
        """Mark a shard as used now (the eviction order)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            pass

    def fetch(self, key: str, location: str, size: int, sha256: str, *,
              protect: Callable[[], frozenset[Path]] = frozenset, retries: int = 5,
              backoff_s: float = 0.5) -> Path:
        """The cached shard, downloading it first if no process of this node has. `protect`
        gives the shards that must not be evicted; it is asked when room is made, not when the
        fetch was queued (the windows may have moved on since)."""
        dst = self.path(key)
        name = dst.name
        if self.cached(key, size):
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        with _flock(dst.with_name(name + ".lock")):
            if self.cached(key, size):  # fetched by another process while we waited
                return dst
            for stale in dst.parent.glob(name + ".part-*"):  # left by a process that died
                stale.unlink(missing_ok=True)
            for attempt in range(retries + 1):
                try:
                    self._download(location, dst, size, sha256, protect)
                    return dst
                except _Corrupt as e:
                    raise UserError(f"shard {name} fetched from {location}: {e} (corrupt or "
                                    f"another run's)") from None
                except Exception as e:  # noqa: BLE001 - classified below, one line either way
                    if remote.is_permanent(e) or attempt == retries:
                        tries = f" after {attempt + 1} attempts" if attempt else ""
                        raise UserError(f"shard {name}: cannot fetch {location}{tries}: "
                                        f"{remote.reason(e)}") from None
                    delay = backoff_s * 2 ** attempt
                    log.warning("shard %s: fetching %s failed (%s); retry %d of %d in %.1fs",
                                name, location, remote.reason(e), attempt + 1, retries, delay)
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def _download(self, location: str, dst: Path, size: int, sha256: str,
                  protect: Callable[[], frozenset[Path]]) -> None:
        tmp = dst.with_name(f"{dst.name}.part-{os.getpid()}-{threading.get_ident()}")
        try:
            self._reserve(tmp, size, lambda: protect() | {dst})
            h = hashlib.sha256()
            got = 0
            with remote.open_read(location) as src, open(tmp, "r+b") as out:
                while True:
                    b = src.read(CHUNK)
                    if not b:
                        break
                    got += len(b)
                    if got > size:
                        raise _Corrupt(f"more than the manifest's {size} bytes")
                    h.update(b)
                    out.write(b)
                out.flush()
                os.fsync(out.fileno())
            if got < size:  # a connection closed early without an error: transient
                raise ConnectionError(f"the transfer ended after {got} of {size} bytes")
            if h.hexdigest() != sha256:
                raise _Corrupt(f"sha256 {h.hexdigest()[:16]}… differs from the manifest's "
                               f"{sha256[:16]}…")
            # Under the cache-wide lock: a scan that counts the cache (`_reserve`) must not list
            # the folder between the two names and miss the shard under both.
            with _flock(self.root / ".lock"):
                os.replace(tmp, dst)
            fsync_path(dst.parent)
        finally:
            tmp.unlink(missing_ok=True)

    # -- the size bound ----------------------------------------------------------------------

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        out = []
        for p in self.root.rglob("*"):
            if p.name.endswith(".lock") or p.parent.name == "manifests" or p.name == ".lock":
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.is_file():
                out.append((p, st))
        return out

    def usage(self) -> int:
        """Bytes held (complete shards, and downloads in flight at their final size)."""
        return sum(st.st_size for _, st in self._entries())

    def _reserve(self, tmp: Path, size: int, protect: Callable[[], frozenset[Path]]) -> None:
        """Create `tmp` at its full size, first evicting least recently used shards if the bound
        would be passed; under the cache-wide lock, so reservations do not race."""
        with _flock(self.root / ".lock"):
            if self.limit:
                keep = protect()
                entries = self._entries()
                used = sum(st.st_size for _, st in entries)
                victims = sorted((st.st_mtime, p, st.st_size) for p, st in entries
                                 if ".part-" not in p.name and p not in keep)
                for _, p, n in victims:
                    if used + size <= self.limit:
                        break
                    with _flock(p.with_name(p.name + ".lock"), blocking=False) as free:
                        if free:
                            p.unlink(missing_ok=True)
                            used -= n
                if used + size > self.limit and not self._warned:
                    self._warned = True
                    log.warning("shard cache %s: the shards in use need %.2f GB, more than "
                                "data.cache_limit_gb = %.2f; going over the bound",
                                self.root, (used + size) / 1e9, self.limit / 1e9)
            with open(tmp, "wb") as f:
                f.truncate(size)


class _DaemonPool:
    """Background fetch threads that never hold up the process's exit (a preempted job must
    leave within its grace time; a download cut off leaves a .part that the next one removes).
    concurrent.futures' pool joins its threads at exit, which would wait for every transfer."""

    def __init__(self, workers: int):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for k in range(workers):
            threading.Thread(target=self._work, name=f"bertscale-fetch-{k}", daemon=True).start()
        self.workers = workers

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        self.jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                fut.set_exception(e)

    def shutdown(self) -> None:
        """Drop queued fetches; the ones in flight finish (or die with the process)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in range(self.workers):
            self.jobs.put(None)


class ShardFetcher:
    """Remote shards of one split of a manifest -> paths in the node cache, with prefetch."""

    def __init__(self, manifest, split: str, settings: FetchSettings, rank: int = 0):
        self.manifest = manifest
        self.split = split
        self.infos = manifest.shards[split]
        self.settings = settings
        self.rank = rank
        self.cache = NodeCache(settings.cache_dir or default_cache_root(), settings.limit_bytes)
        self.protected: frozenset[Path] = frozenset()
        self.futures: dict[int, Future] = {}
        self.pool: _DaemonPool | None = None
        self.wait_s = 0.0
        """Seconds this process's reads waited for a shard to arrive."""
        self.lock = threading.Lock()

    def key(self, i: int) -> str:
        return f"{self.manifest.fingerprint[:16]}/{self.split}/{self.infos[i].name}"

    def _fetch(self, i: int) -> Path:
        info = self.infos[i]
        return self.cache.fetch(self.key(i), self.manifest.shard_location(self.split, i),
                                info.bytes, info.sha256, protect=lambda: self.protected,
                                retries=self.settings.retries, backoff_s=self.settings.backoff_s)

    def _prefetch(self, i: int) -> Path | None:
        """A queued background fetch, skipped if the windows moved past shard i before it ran:
        fetching it then could only push the windows' own shards out of the bound."""
        if self.cache.path(self.key(i)) not in self.protected:
            return None
        return self._fetch(i)

    def path(self, i: int) -> Path:
        """Shard i in the cache, waiting for it if it is not there yet."""
        info = self.infos[i]
        got = self.cache.cached(self.key(i), info.bytes)
        if got is None:
            start = time.perf_counter()
            with self.lock:
                fut = self.futures.get(i)
            if fut is not None:
                fut.result()  # raises what the background fetch met
            got = self._fetch(i)  # at once if the fetch above put it there (or evicted: again)
            self.wait_s += time.perf_counter() - start
        self.cache.touch(got)
        return got

    def ahead(self, current: list[int], following: list[int]) -> None:
        """The loader entered a window: keep these shards, and fetch them in the background
        (the current window's first). Each rank starts at another shard, so the ranks of a node
        download different shards at once rather than queue on the same lock."""
        self.protected = frozenset(self.cache.path(self.key(i)) for i in (*current, *following))
        if not self.settings.prefetch:
            return
        if self.pool is None:
            self.pool = _DaemonPool(self.settings.concurrency)
        for group in (current, following):
            k = self.rank % len(group) if group else 0
            for i in group[k:] + group[:k]:
                with self.lock:
                    if i not in self.futures:
                        self.futures[i] = self.pool.submit(self._prefetch, i)
        with self.lock:  # forget finished fetches outside the two windows (refetch if evicted)
            keep = set(current) | set(following)
            for i in [i for i, f in self.futures.items() if i not in keep and f.done()
                      and (f.cancelled() or f.exception() is None)]:
                del self.futures[i]

    def check(self) -> None:
        """Raise the first background fetch that failed for good."""
        with self.lock:
            done = [f for f in self.futures.values() if f.done() and not f.cancelled()]
        for f in done:
            e = f.exception()
            if e is not None:
                raise e

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def worker_copy(self) -> "ShardFetcher":
        """For a DataLoader worker (forked or spawned): no pool, no futures of the parent's; it
        reads synchronously through the cache while the parent process prefetches."""
        copy = ShardFetcher(self.manifest, self.split,
                            dataclasses.replace(self.settings, prefetch=False), self.rank)
        copy.cache = self.cache
        return copy

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(futures={}, pool=None, lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
