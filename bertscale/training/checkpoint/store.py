"""A run folder in an object store (`--run-dir s3://…`, `gs://…`, `az://…`): the store is the
truth, a node-local staging folder is the trainer's working copy of it.

    <url>/checkpoints/step_N/<files>            every rank's checkpoint files, as on a disk
    <url>/checkpoints/step_N/uploaded/rank_R.json  rank R's files are all in the store
                                                (rank_R.error.json: why not)
    <url>/checkpoints/step_N/commit.json        THE commit marker, put last by rank 0 once every
                                                rank's `uploaded` object says so
    <url>/checkpoints/step_N_universal/         never in the store: each node converts its own
    <url>/metrics.jsonl, recipe.json, deepspeed_config.json, vocab.txt
                                                the run's records, uploaded with each commit and
                                                at the end
    <url>/lock.json                             the run lock (a lease, store_lock.py)

The trainer itself only ever sees the staging folder (a local run folder: the same checkpointer,
the same resume path); this module makes that folder agree with the store before a run starts
(`mirror`, `pull`), and bertscale.training.checkpoint.upload sends what the run saves.

Staging: `$BERTSCALE_STAGING_DIR/<run>-<hash>`, default `$BERTSCALE_CACHE/staging/...` else
`~/.cache/bertscale/staging/...`; one per node (the ranks of a node share it, under a file lock),
on a node-local disk with room for two checkpoints (the one being uploaded and the next).

Credentials and endpoints are the data path's (bertscale.data.remote; docs/data.md).

Limits: a local file of the newest committed checkpoint is reused when its size equals the
object's (it was written or downloaded by this node for that very commit: a staging folder is
never shared by two runs); anything else is downloaded again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale.data import remote
from bertscale.errors import ConfigError, UserError
from bertscale.training.checkpoint.layout import (STATE_FILE, UNIVERSAL_SUFFIX, VOCAB_FILE,
                                                  checkpoints_dir, tag_for)
from bertscale.training.checkpoint.marker import COMMIT_FILE

STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
UPLOADED_DIR = "uploaded"
RECORD_FILES = ("metrics.jsonl", "recipe.json", "deepspeed_config.json", VOCAB_FILE)
# argparse's and the recipe's Path("s3://b/r") is "s3:/b/r": the same URL, one slash lost.
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")
_TAG = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"(?:^|_)(?:zero_pp_rank|rng_rank)_?(\d+)(?:_|\.)")


def store_url(location: str | Path | None) -> str | None:
    """The object-store URL that the run location names (also written as a Path, which folds
    its "//" into "/"), None for a local folder. Another URL scheme is refused."""
    if location is None:
        return None
    text = str(location)
    m = _COLLAPSED.match(text)
    if m and m.group(1).lower() in STORE_SCHEMES + ("http", "https", "file", "hdfs"):
        text = text.replace(":/", "://", 1)
    if "://" not in text:
        return None
    if remote.scheme(text) not in STORE_SCHEMES or not text.split("://", 1)[1].strip("/"):
        raise ConfigError(f"--run-dir {text}: a run folder is a local path or an object-store "
                          f"URL (s3://BUCKET/PATH, gs://BUCKET/PATH, az://CONTAINER/PATH)")
    return text.rstrip("/")


def owner_rank(name: str) -> int:
    """Which rank writes (and uploads) a checkpoint file: the one its name says
    (zero_pp_rank_R_…, rng_rankR.pt), else rank 0 (model states, the trainer state)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


def default_staging_root() -> Path:
    if os.environ.get("BERTSCALE_STAGING_DIR"):
        return Path(os.environ["BERTSCALE_STAGING_DIR"])
    cache = os.environ.get("BERTSCALE_CACHE")
    return Path(cache) / "staging" if cache else Path.home() / ".cache" / "bertscale" / "staging"


@dataclass(frozen=True)
class RemoteCommit:
    step: int
    marker: dict[str, Any]


class RunStore:
    """A run location in an object store and this node's staging copy of it."""

    def __init__(self, url: str, staging: Path | None = None):
        self.url = url
        path = url.split("://", 1)[1]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", path).strip("-")[-60:]
        digest = hashlib.sha256(url.encode()).hexdigest()[:10]
        self.staging = (staging or default_staging_root()) / f"{slug}-{digest}"

    # -- paths ----------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        return remote.filesystem(self.url)

    def at(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def tag_url(self, tag: str) -> str:
        return self.at("checkpoints", tag)

    # -- before anything: is the store there, and can we write it? ------------------------

    def check(self) -> None:
        """One line (UserError) when the bucket does not exist, the store cannot be reached or
        the credentials cannot write: every rank checks on its own, before the process group,
        so every rank stops with the same line and nothing is written anywhere."""
        remote.require_bucket(self.url, "run folder")
        probe = self.at(".bertscale-probe", f"{socket.gethostname()}-{os.getpid()}")
        try:
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"run folder {self.url}: cannot write to the store: "
                            f"{remote.reason(e)}") from None

    # -- what the store holds -------------------------------------------------------------

    def committed(self) -> list[RemoteCommit]:
        """The store's committed checkpoints, oldest first (a step_N with its commit marker;
        the marker must name its folder, as on a disk)."""
        fs = self.fs
        fs.invalidate_cache()
        found = []
        for path in fs.glob(self.at("checkpoints", "step_*", COMMIT_FILE)):
            tag = path.rstrip("/").split("/")[-2]
            m = _TAG.match(tag)
            if not m:
                continue
            url = self.at("checkpoints", tag, COMMIT_FILE)
            try:
                marker = json.loads(fs.cat_file(url))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{url}: commit marker is not valid JSON ({e}); delete that "
                                f"checkpoint folder to resume from the one before") from None
            if not isinstance(marker, dict) or marker.get("tag") != tag:
                raise UserError(f"{url}: commit marker does not name this checkpoint")
            found.append(RemoteCommit(int(m.group(1)), marker))
        return sorted(found, key=lambda c: c.step)

    def objects(self, tag: str) -> dict[str, int]:
        """name -> size of the checkpoint files of `tag` in the store (not the markers)."""
        fs = self.fs
        fs.invalidate_cache()
        base = self.tag_url(tag)
        try:
            entries = fs.ls(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "file" and name != COMMIT_FILE:
                out[name] = int(e.get("size") or 0)
        return out

    # -- the staging copy -----------------------------------------------------------------

    @contextmanager
    def node_lock(self) -> Iterator[None]:
        """The ranks of one node take turns on its staging folder."""
        self.staging.mkdir(parents=True, exist_ok=True)
        with open(self.staging / ".staging.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def mirror(self) -> RemoteCommit | None:
        """Make the staging folder agree with the store before the plan reads it: the newest
        checkpoint committed IN THE STORE is the only one kept (its marker and trainer state
        fetched; the engine files come with `pull`), every other local checkpoint folder goes
        (a local commit whose upload never committed is not a checkpoint of this run), and the
        run's records come from the store (metrics.jsonl unless this node's is longer: it was
        rank 0's node and holds the records since the last commit)."""
        try:
            commits = self.committed()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"run folder {self.url}: cannot list its checkpoints: "
                            f"{remote.reason(e)}") from None
        newest = commits[-1] if commits else None
        with self.node_lock():
            local = checkpoints_dir(self.staging)
            keep = {tag_for(newest.step), tag_for(newest.step) + UNIVERSAL_SUFFIX} if newest else set()
            if local.is_dir():
                for p in local.iterdir():
                    if p.name not in keep:
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            if newest is not None:
                tag = tag_for(newest.step)
                folder = local / tag
                folder.mkdir(parents=True, exist_ok=True)
                self._get(self.at("checkpoints", tag, STATE_FILE), folder / STATE_FILE)
                from bertscale.files import write_json_atomic
                write_json_atomic(folder / COMMIT_FILE, newest.marker)
            for name in RECORD_FILES:
                mine = self.staging / name
                try:
                    if name == "metrics.jsonl" and mine.exists() and \
                            mine.stat().st_size >= self.fs.info(self.at(name))["size"]:
                        continue  # this node's is longer: it has the records since the commit
                    self._get(self.at(name), mine)
                except FileNotFoundError:
                    pass
        return newest

    def pull(self, tag: str) -> int:
        """Download checkpoint `tag` into staging: every file of it, once per node (its ranks
        share the folder), concurrently; files already here at the store's size are kept.
        Returns bytes fetched. Every file, not only this rank's: the one resume path checks that
        every partition is there and reads rank 0's to learn the checkpoint's layout before it
        decides how to load (universal.inspect_checkpoint), and a universal conversion reads
        them all."""
        sizes = self.objects(tag)
        folder = checkpoints_dir(self.staging) / tag
        folder.mkdir(parents=True, exist_ok=True)
        with self.node_lock():
            todo = [n for n, size in sorted(sizes.items())
                    if not ((folder / n).is_file() and (folder / n).stat().st_size == size)]
            tmps = [folder / f".{n}.part" for n in todo]
            try:
                if todo:
                    self.fs.get([self.at("checkpoints", tag, n) for n in todo],
                                [str(t) for t in tmps])
                for n, tmp in zip(todo, tmps):
                    os.replace(tmp, folder / n)
            finally:
                for tmp in tmps:
                    tmp.unlink(missing_ok=True)
        return sum(sizes[n] for n in todo)

    def prepare_resume(self, point: Any, world_size: int, *,
                       check_free_space: bool = True) -> None:
        """Before the resume (`point`: a resume.ResumePoint or None): the checkpoint in this
        node's staging (`pull`); when the resume converts it (another world size, ZeRO stage or
        precision) this node converts it itself, under the node lock, so that every node holds
        the universal copy the resume loads (rank 0's conversion would be seen on its own node
        only: there is no shared filesystem)."""
        if point is None:
            return
        from bertscale.training.checkpoint import universal

        ckpt = point.checkpoint
        convert = point.layout_change is not None or universal.needs_conversion(
            ckpt.world_size, world_size)
        try:
            self.pull(ckpt.tag)
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"{self.tag_url(ckpt.tag)}: cannot download the checkpoint to "
                            f"{self.staging}: {remote.reason(e)}") from None
        if convert:
            with self.node_lock():
                if universal.inspect_checkpoint(ckpt.root, ckpt.tag).zero_stage:
                    universal.convert_to_universal(ckpt.root, ckpt.tag,
                                                   check_free_space=check_free_space)

    def prune_staging(self, keep: int) -> None:
        """On a node whose staging rank 0 does not prune (the core checkpointer prunes on global
        rank 0 only; another node holds no local markers), the checkpoint folders older than
        the newest `keep` go. Call after every upload of them finished."""
        root = checkpoints_dir(self.staging)
        steps = sorted(int(m.group(1)) for p in root.iterdir()
                       if (m := _TAG.match(p.name))) if root.is_dir() else []
        for step in steps[:-keep]:
            shutil.rmtree(root / tag_for(step), ignore_errors=True)
            shutil.rmtree(root / (tag_for(step) + UNIVERSAL_SUFFIX), ignore_errors=True)

    def _get(self, url: str, local: Path) -> None:
        """One object to a local file, whole or not at all (a temporary name, then rename)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        try:
            self.fs.get_file(url, str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    # -- writing the store (upload.py) ----------------------------------------------------

    def discard_uncommitted(self, tag: str) -> None:
        """Delete the store's folder `tag` if it holds no commit marker: the leftovers of a
        killed upload of this same step, before it is uploaded again (so no stale `uploaded`
        object can vouch for the new one)."""
        fs = self.fs
        fs.invalidate_cache()
        base = self.tag_url(tag)
        if fs.exists(base + "/" + COMMIT_FILE):
            fs.rm_file(base + "/" + COMMIT_FILE)  # re-saved step: no longer vouched for
        if fs.exists(base):
            fs.rm(base, recursive=True)
        fs.invalidate_cache()

    def prune(self, keep: int, log: Any = print) -> None:
        """All but the newest `keep` committed checkpoints of the store go (marker first, so a
        half-deleted folder is an uncommitted one), and any uncommitted folder older than the
        newest commit (a killed upload that no save will repeat)."""
        fs = self.fs
        commits = self.committed()
        if not commits:
            return
        newest = commits[-1].step
        for old in commits[:-keep]:
            base = self.tag_url(tag_for(old.step))
            fs.rm_file(base + "/" + COMMIT_FILE)
            fs.rm(base, recursive=True)
            log(f"checkpoint step {old.step} deleted from {self.url} (keeping the newest {keep})")
        committed = {c.step for c in commits}
        fs.invalidate_cache()
        for entry in fs.ls(self.at("checkpoints"), detail=False):
            m = _TAG.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m and int(m.group(1)) < newest and int(m.group(1)) not in committed:
                fs.rm(self.tag_url(m.group(0)), recursive=True)
        fs.invalidate_cache()

