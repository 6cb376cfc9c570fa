"""Checkpoints of a run in an object store: saved to node-local staging, uploaded while training
goes on, committed in the store last.

A save (`StoreCheckpointer.maybe_save`, collective, at the core checkpointer's cadence):

1. wait for this rank's upload of the previous checkpoint (and, on rank 0, its commit), then
   share every rank's outcome (one all-gather on the main thread): a failed upload stops the
   run on every rank with one line naming the store;
2. rank 0 deletes what a killed earlier upload of this same step left in the store;
3. the core save into the staging folder (every rank writes, fsyncs, a local marker: the
   trainer's own checkpoint, bertscale.training.checkpoint.checkpointer);
4. a background thread on every rank puts its own files (rank 0: the shared ones too) and then
   `uploaded/rank_R.json`; rank 0's thread waits for all `world` of those objects, puts the commit
   marker (the same JSON as the local one) LAST, then the run's records, then prunes the store
   to the newest `keep` commits. No collective runs in a thread.

The stall the loop sees is steps 1-3 (and 4 for a synchronous save); each save prints it and
records it in metrics.jsonl (kind "checkpoint": stall_s, wait_upload_s, save_s, sync, and
upload_step / upload_s / upload_mb_s: rank 0's upload of the checkpoint that finished during
this save, the previous one, or this one when it was synchronous).

Synchronous: the save of a preemption (exit 75), of the last step and of `--stop-at-step`
upload and commit before `maybe_save` returns, so the process exits only after its checkpoint
is committed in the store; `close` waits for an upload still running at any other exit.
`BERTSCALE_CHECKPOINT_UPLOAD=sync` makes every save synchronous (what the benchmark compares).

A killed upload is never a checkpoint: without every rank's `uploaded` object rank 0 writes no
marker, and the next start mirrors only what the store committed (store.RunStore.mirror).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bertscale.data import remote
from bertscale.errors import UserError
from bertscale.files import human_size
from bertscale.training.checkpoint.checkpointer import Checkpointer, rank_and_world
from bertscale.training.checkpoint.layout import Committed, tag_for
from bertscale.training.checkpoint.marker import COMMIT_FILE
from bertscale.training.checkpoint.store import (RECORD_FILES, UPLOADED_DIR, RunStore,
                                                 owner_rank)

UPLOAD_ENV = "BERTSCALE_CHECKPOINT_UPLOAD"
COMMIT_TIMEOUT_S = float(os.environ.get("BERTSCALE_UPLOAD_TIMEOUT", 3600))
"""How long rank 0 waits for the other ranks' `uploaded` objects of one checkpoint."""
_POLL_S = 0.5
PUT_TRIES = 3


class Upload:
    """One checkpoint's upload on this rank, in a thread; rank 0's also commits it."""

    def __init__(self, store: RunStore, saved: Committed, *, rank: int, world: int, keep: int,
                 records: Mapping[str, bytes], log: Callable[[str], None]):
        self.store, self.saved, self.rank, self.world = store, saved, rank, world
        self.keep, self.records, self.log = keep, dict(records), log
        self.error: str | None = None
        self.relayed = False  # rank 0's error is another rank's, which that rank reports itself
        self.bytes = 0
        self.seconds = 0.0
        self.committed = False
        self._thread = threading.Thread(target=self._run, name=f"upload-{saved.tag}",
                                        daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Seconds this call waited."""
        t0 = time.monotonic()
        self._thread.join()
        return time.monotonic() - t0

    def _run(self) -> None:
        t0 = time.monotonic()
        base = self.store.tag_url(self.saved.tag)
        done = f"{base}/{UPLOADED_DIR}/rank_{self.rank}.json"
        try:
            fs = self.store.fs
            mine = sorted(p for p in self.saved.path.iterdir()
                          if p.is_file() and p.name != COMMIT_FILE and not p.name.startswith(".")
                          and owner_rank(p.name) == self.rank)
            for path in mine:
                _put_retrying(fs, path, f"{base}/{path.name}")
                self.bytes += path.stat().st_size
            self.seconds = time.monotonic() - t0
            fs.pipe_file(done, json.dumps({"files": [p.name for p in mine], "bytes": self.bytes,
                                           "seconds": round(self.seconds, 3)}).encode())
            if self.rank == 0:
                self._commit(fs, base)
        except _Failed as e:  # rank 0's commit: another rank failed, or never finished
            self.error, self.relayed = str(e), e.relayed
        except Exception as e:  # noqa: BLE001 - reported on the main thread, on every rank
            self.error = (f"checkpoint step {self.saved.step}: uploading to {base} failed on "
                          f"rank {self.rank}: {remote.reason(e)}")
            if self.rank != 0:  # rank 0 must not wait for this rank's files
                try:
                    self.store.fs.pipe_file(done.replace(".json", ".error.json"),
                                            json.dumps({"error": self.error}).encode())
                except Exception:  # noqa: BLE001 - the store is gone: rank 0 times out
                    pass

    def _commit(self, fs: Any, base: str) -> None:
        """Rank 0: every rank's `uploaded` object, then the marker, the records, the prune."""
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        pending = set(range(self.world))
        while pending:  # one listing per poll, whatever the number of ranks
            fs.invalidate_cache()
            try:
                names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/{UPLOADED_DIR}",
                                                              detail=False)}
            except FileNotFoundError:
                names = set()
            failed = sorted(n for n in names if n.endswith(".error.json"))
            if failed:
                said = json.loads(fs.cat_file(f"{base}/{UPLOADED_DIR}/{failed[0]}"))
                raise _Failed(said.get("error") or failed[0], relayed=True)
            pending -= {r for r in pending if f"rank_{r}.json" in names}
            if pending:
                if time.monotonic() > deadline:
                    raise _Failed(f"checkpoint step {self.saved.step}: rank(s) {sorted(pending)} "
                                  f"did not finish their upload to {base} within "
                                  f"{COMMIT_TIMEOUT_S:.0f} s; it is not committed")
                time.sleep(_POLL_S)
        fs.pipe_file(f"{base}/{COMMIT_FILE}", json.dumps(self.saved.marker, indent=2).encode())
        self.committed = True
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0.0
        self.log(f"checkpoint step {self.saved.step} committed in {base} (rank 0 put "
                 f"{human_size(self.bytes)} in {self.seconds:.1f}s, {rate:.0f} MB/s)")
        for name, data in self.records.items():
            fs.pipe_file(self.store.at(name), data)
        self.store.prune(self.keep, log=self.log)


def _put_retrying(fs: Any, path: Path, url: str) -> None:
    """One file, again from the start after an error a retry can fix (the store clients retry
    single requests; a multipart upload that failed as a whole, e.g. its completion answered
    after the client gave up, is retried here): PUT_TRIES tries."""
    for attempt in range(PUT_TRIES):
        try:
            fs.put_file(str(path), url)
            return
        except Exception as e:
            if attempt == PUT_TRIES - 1 or isinstance(e, PermissionError) or \
                    remote.http_status(e) in (401, 403):
                raise
            time.sleep(2 ** attempt)


class _Failed(Exception):
    """Rank 0 cannot commit: `relayed` when the cause is another rank's failed upload (its
    `rank_R.error.json`), which that rank reports itself."""

    def __init__(self, message: str, *, relayed: bool = False):
        super().__init__(message)
        self.relayed = relayed

    def __str__(self) -> str:
        return str(self.args[0])


def read_records(run_dir: Path) -> dict[str, bytes]:
    """The run's record files as they are now (read on the main thread, between the
    reporter's whole-line writes)."""
    out = {}
    for name in RECORD_FILES:
        try:
            out[name] = (run_dir / name).read_bytes()
        except FileNotFoundError:
            pass
    return out


class StoreCheckpointer(Checkpointer):
    """The core checkpointer on the staging folder, its checkpoints uploaded and committed in
    the store (module docstring)."""

    def __init__(self, *args: Any, store: RunStore,
                 record: Callable[[str, int, Mapping[str, float]], None] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.store, self.record = store, record
        self.background = os.environ.get(UPLOAD_ENV, "background") != "sync"
        self.upload: Upload | None = None
        self.last_stall: float | None = None

    def _finish(self) -> tuple[float, Upload | None]:
        """Wait for the upload in flight, then share every rank's outcome (collective)."""
        from bertscale.distributed import gather_problems

        waited, upload = 0.0, self.upload
        if upload is not None:
            waited = upload.wait()
            self.upload = None
        mine = upload.error if upload and not upload.relayed else None
        problems = gather_problems([mine] if mine else [])
        if problems:
            raise UserError(problems[0] + self._newest_note())
        return waited, upload

    def _newest_note(self) -> str:
        try:
            commits = self.store.committed()
        except Exception:  # noqa: BLE001 - the store may be what failed
            return ""
        return (f". The newest checkpoint committed in the store is step {commits[-1].step}"
                if commits else ". No checkpoint of this run is committed in the store yet")

    def maybe_save(self, step: int, *, preempted: bool) -> Committed | None:
        if not self.due(step, preempted=preempted) or self.last_saved == step:
            return None
        rank, world = rank_and_world()
        t0 = time.monotonic()
        waited, previous = self._finish()
        if rank == 0:
            self.store.discard_uncommitted(tag_for(step))
        saved = super().maybe_save(step, preempted=preempted)
        if saved is None:
            return None
        if rank != 0 and os.environ.get("LOCAL_RANK", "0") == "0":
            self.store.prune_staging(self.cadence.keep)  # another node's staging copy
        t_saved = time.monotonic()
        sync = (not self.background or preempted or step == self.total
                or step == self.stop_at)
        records = read_records(self.run_dir) if rank == 0 else {}
        self.upload = Upload(self.store, saved, rank=rank, world=world, keep=self.cadence.keep,
                             records=records, log=self.info)
        if sync:
            _, previous = self._finish()
        stall = time.monotonic() - t0
        self.last_stall = stall
        how = ("uploaded and committed" if sync else "uploading in the background")
        self.info(f"checkpoint step {step}: the loop stalled {stall:.2f}s (waiting for the "
                  f"previous upload {waited:.2f}s, local save {t_saved - t0 - waited:.2f}s); "
                  f"{how} to {self.store.tag_url(saved.tag)}")
        values = {"stall_s": round(stall, 3), "wait_upload_s": round(waited, 3),
                  "save_s": round(t_saved - t0 - waited, 3), "sync": float(sync)}
        if previous is not None and previous.seconds > 0:  # this save's when synchronous
            values.update(upload_step=previous.saved.step, upload_s=round(previous.seconds, 3),
                          upload_mb_s=round(previous.bytes / previous.seconds / 1e6, 2))
        if self.record is not None and rank == 0:
            self.record("checkpoint", step, values)
        return saved

    def close(self) -> None:
        """At the end of the run (any end): the upload still running finishes and commits,
        then rank 0 puts the final records. Collective."""
        rank, _ = rank_and_world()
        if self.upload is not None:
            upload = self.upload
            upload.wait()
            self.upload = None
            if upload.error:
                self.info(f"error: {upload.error}{self._newest_note()}")
        if rank == 0:
            for name, data in read_records(self.run_dir).items():
                try:
                    self.store.fs.pipe_file(self.store.at(name), data)
                except Exception as e:  # noqa: BLE001 - the checkpoints are what counts
                    self.info(f"warning: could not upload {name} to {self.store.url}: "
                              f"{remote.reason(e)}")

