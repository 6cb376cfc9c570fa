"""One writer per run folder in an object store: a lease in `<url>/lock.json`.

An object store has no flock, and conditional puts are not the same on every store (GCS's
`ifGenerationMatch=0`, Azure's `If-None-Match: *`, S3's only since 2024 and not on every
S3-compatible store) nor exposed alike through fsspec. So the lock is what every store gives: a
strongly consistent put and read-back (S3, GCS and Azure Blob all read their own and others'
writes at once).

Rank 0 of `bertscale pretrain` takes it:
1. read `lock.json`; a holder whose heartbeat is younger than the lease (`LEASE_S`, 60 s) and
   that is not stale (below) refuses the start, on every rank, with one line naming it (exit 2);
2. put its own record (a random token, host, pid, job ids, heartbeat), wait `SETTLE_S` (2 s),
   read it back: another trainer that put its record in the same moment wins if its put came
   last; this one then stops with the same one line.
3. a thread renews the heartbeat every `HEARTBEAT_S` (15 s) while the run lives; the run deletes
   the record at its end (if it still holds it).

A holder is stale (taken over at once, with a warning) when its heartbeat is older than the
lease, when it ran on this host and its process is gone (`kill -9` and a restart on the same
node), or when it is an earlier run of this very SLURM job or torchrun job (bertscale.runlock).
Limits: two starts more than `SETTLE_S` apart are ordered by step 1; closer ones by the last put
(a store serves one version of an object); a holder cut off from the store for longer than the
lease (its heartbeat failing) can be taken over while it still trains; clocks of the nodes must
agree within a few seconds (the heartbeat is the holder's clock).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from typing import Any

from bertscale import distributed, runlock
from bertscale.data import remote
from bertscale.errors import UserError

LOCK_OBJECT = "lock.json"
LEASE_S = 60.0
HEARTBEAT_S = 15.0
SETTLE_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Rank 0's lease on a store run location (the other ranks' copies do nothing)."""

    def __init__(self, url: str, main: bool):
        self.url, self.main = url, main
        self.path = remote.join(url, LOCK_OBJECT)
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        fs = remote.filesystem(self.url)
        fs.invalidate_cache()
        try:
            return json.loads(fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a damaged record holds nothing

    def _put(self) -> None:
        record = {**runlock._me(), "token": self.token, "heartbeat": round(time.time(), 3)}
        remote.filesystem(self.url).pipe_file(self.path, json.dumps(record).encode())

    def _stale(self, holder: dict[str, Any]) -> str | None:
        import socket
        age = time.time() - float(holder.get("heartbeat") or 0)
        if age > LEASE_S:
            return f"its heartbeat is {age:.0f}s old"
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid") or 0)):
            return "its process on this host is gone"
        return runlock._stale(holder)

    def take(self) -> str | None:
        """Rank 0: take the lease; the one-line reason when it cannot."""
        try:
            holder = self._read()
            if holder is not None:
                why = self._stale(holder)
                if why is None:
                    return _held(self.url, holder)
                print(f"warning: {self.url}: taking over the run lock of "
                      f"{runlock.describe(holder)} ({why})", file=sys.stderr, flush=True)
            self._put()
            time.sleep(SETTLE_S)
            holder = self._read()
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            return f"{self.url}: cannot take the run lock ({remote.reason(e)})"
        if not holder or holder.get("token") != self.token:
            return (f"{self.url}: another `bertscale pretrain` started on this run at the same "
                    f"time ({runlock.describe(holder)}) and holds it; use another --run-dir")
        self._thread = threading.Thread(target=self._beat, name="store-lock", daemon=True)
        self._thread.start()
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (self._read() or {}).get("token") == self.token:
                    self._put()
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    def release(self) -> None:
        if not self.main:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.token:
                remote.filesystem(self.url).rm_file(self.path)
        except Exception:  # noqa: BLE001 - a lease left behind expires
            pass
        self.main = False


def _held(url: str, holder: dict[str, Any]) -> str:
    return (f"{url}: another `bertscale pretrain` is writing this run "
            f"({runlock.describe(holder)}); wait for it to end or stop it, or use another "
            f"--run-dir")


def refuse_if_held(url: str) -> None:
    """Before a start touches anything (its staging copy included): one line when a live
    trainer holds the run's lease. Every rank checks, read-only; `acquire` then takes it."""
    lock = StoreLock(url, False)
    try:
        holder = lock._read()
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"{url}: cannot read the run lock ({remote.reason(e)})") from None
    if holder is not None and lock._stale(holder) is None:
        raise UserError(_held(url, holder))


def acquire(url: str, is_main: bool) -> StoreLock:
    """Every rank calls it after the process group starts: rank 0 takes the lease, and if it
    cannot, every rank raises the same UserError."""
    lock, problems = StoreLock(url, is_main), []
    if is_main:
        problem = lock.take()
        if problem:
            lock.main = False
            problems.append(problem)
    problems = distributed.gather_problems(problems)
    if problems:
        raise UserError(problems[0])
    return lock
