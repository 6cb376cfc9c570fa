"""Where a run's checkpoints are, which are committed, and room for the next one.

    <run>/checkpoints/step_<N>/            one checkpoint: the engine's files (every rank writes
                                           its own), and ours:
        trainer_state.json                 the trainer state, by component (rank 0; state.py)
        rng_rank<R>.pt                     python / numpy / torch RNG states of rank R
        commit.json                        THE commit marker, written last (marker.py)
    <run>/checkpoints/step_<N>_universal/  its universal conversion, when a resume needed one

A folder without a commit marker is an interrupted save: nothing here ever returns it, whatever
the engine's own files say (DeepSpeed's `latest` file is never written). The marker is also the
one record of the world size that saved a checkpoint (`Committed.world_size`).

Limits: the checkpoint folder must be one filesystem visible to all ranks (rank 0 commits what the
others wrote). Free space is what `shutil.disk_usage` reports to an unprivileged writer: quotas
(Lustre, NFS) are not visible, and a write past one fails at write time.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import human_size
from bertscale.training.checkpoint.marker import read_marker, uncommit

STATE_FILE = "trainer_state.json"
VOCAB_FILE = "vocab.txt"
UNIVERSAL_SUFFIX = "_universal"
"""`<tag>_universal` beside `<tag>`: DeepSpeed's own naming for converted checkpoints."""
_TAG = re.compile(r"^step_(\d+)$")
_REMEDY = ("remove that folder to resume from the committed checkpoint before it, or restore "
           "the file")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step}"


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint: `path` is <run>/checkpoints/step_<N>."""

    step: int
    path: Path
    marker: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        """The checkpoints folder (the engine's `save_dir`)."""
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def world_size(self) -> int:
        """How many ranks saved it: the commit marker's record, the only one kept."""
        return int(self.marker.get("world_size") or 0)


def read_commit(tag_dir: Path) -> dict[str, Any] | None:
    """The marker of checkpoint folder `tag_dir` (None: not committed); damage is an error."""
    return read_marker(tag_dir, remedy=_REMEDY)


def list_committed(run_dir: str | Path) -> list[Committed]:
    """Committed checkpoints of a run folder, oldest first. Uncommitted folders are skipped."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _TAG.match(p.name)
            if m and p.is_dir():
                marker = read_commit(p)
                if marker is not None:
                    found.append(Committed(int(m.group(1)), p, marker))
    return sorted(found, key=lambda c: c.step)


def latest_committed(run_dir: str | Path) -> Committed | None:
    committed = list_committed(run_dir)
    return committed[-1] if committed else None


def resolve(path: str | Path) -> Committed:
    """A run folder (its newest committed checkpoint) or one checkpoint folder (which must be
    committed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint folder")
    if _TAG.match(path.name) and path.is_dir():
        marker = read_commit(path)
        if marker is None:
            raise UserError(f"{path}: checkpoint was never committed (interrupted save); "
                            f"use the run folder to get the newest committed one")
        return Committed(int(marker["step"]), path, marker)
    if path.name == "checkpoints":
        path = path.parent
    latest = latest_committed(path)
    if latest is None:
        raise UserError(f"{path}: no committed checkpoint in {checkpoints_dir(path)}")
    return latest


def universal_path(checkpoint_dir: str | Path, tag: str) -> Path:
    """Where the converted copy of `<checkpoint_dir>/<tag>` lives (deleted with its source)."""
    return Path(checkpoint_dir) / f"{tag}{UNIVERSAL_SUFFIX}"


def prune(run_dir: str | Path, keep: int, *, log: Callable[[str], None] = print) -> None:
    """Delete all but the newest `keep` committed checkpoints: marker first (the folder is then
    an ordinary uncommitted one), then the files and any universal copy."""
    if keep < 2:
        raise UserError(f"checkpoint.keep must be at least 2, got {keep}")
    for old in list_committed(run_dir)[:-keep]:
        uncommit(old.path)
        shutil.rmtree(old.path)
        shutil.rmtree(universal_path(old.root, old.tag), ignore_errors=True)
        log(f"checkpoint step {old.step} deleted (keeping the newest {keep})")


def newest_committed_note(run_dir: Path) -> str:
    """How a failed save ends its message: what a resume would continue from."""
    latest = latest_committed(run_dir)
    return (f". The newest committed checkpoint, step {latest.step} ({latest.path}), is intact"
            if latest else ". No checkpoint of this run is committed yet")


def older_committed(ckpt: Committed) -> str:
    """What to use instead of a damaged checkpoint: an older committed one, if there is one."""
    older = [c for c in list_committed(ckpt.run_dir) if c.step < ckpt.step]
    if not older:
        return " and the run has no older committed checkpoint"
    return f"; pass an older committed one instead, e.g. {older[-1].path}"


# ------------------------------------------------------------------------------ free space

# Write failures that mean "the filesystem would not take it": torch.save reports a short write
# from its C++ writer as a RuntimeError, not an OSError.
_WRITE_FAILURE = ("inline_container", "file write failed", "unexpected pos", "No space left",
                  "Disk quota exceeded")


def bytes_on_disk(path: Path) -> int:
    """Total size of the files under `path` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def space_problem(folder: Path, needed: int, what: str) -> str | None:
    """A one-line refusal when `folder`'s filesystem has less than `needed` bytes free."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (f"{what}: {folder} has {human_size(free)} free, about {human_size(needed)} are "
            f"needed; free space there (or lower checkpoint.keep) and resume")


def is_write_failure(e: BaseException, folder: Path) -> bool:
    """Whether `e`, raised while writing into `folder`, means the filesystem would not take the
    write. A full filesystem counts whatever the message: what a writer raises there varies (a
    directory that could not be made surfaces later as "Parent directory … does not exist")."""
    if isinstance(e, OSError) or any(s in str(e) for s in _WRITE_FAILURE):
        return True
    try:
        return free_bytes(folder) < 1 << 20
    except OSError:
        return True
