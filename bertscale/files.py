"""Small file jobs done one way: atomic writes of files and folders, and reading a text file.

An atomic write goes to a temporary name beside its target (the same filesystem, so the rename
is atomic), is fsynced, renamed over the target, and the folder is fsynced so that the rename
itself survives a crash: a reader sees the old content or the new, never a part. A folder is
written the same way: filled under a temporary name, every file and folder in it fsynced, then
renamed into place.

Limits, stated honestly: these helpers write wherever they are called; deciding which rank
writes is the caller's job. fsync is what makes a rename durable on a local disk; on network
filesystems it is only as strong as the filesystem's close-to-open guarantee. A process killed
mid-write leaves its temporary file (`.<name>.tmp-<pid>`), which `remove_stale` clears.

A write that fails because the filesystem is full (or over quota) is a `DiskFullError`: one line
naming the file and the space free there, after the temporary file is removed, so the old file
(or nothing) is what is left. `stop_on_full_disk` does the same for jobs that write through other
libraries (safetensors, torch, a pool of worker processes), whose errors wrap the OSError.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bertscale.errors import UserError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the libraries that wrap the OSError say it (safetensors: "StorageFull"; torch's zip writer
# keeps the strerror).
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")


class DiskFullError(UserError, OSError):
    """A write failed because the filesystem is full or over quota (an OSError too, so code that
    handles write failures as OSErrors still does)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, says the disk is full or over quota."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def human_size(n: float) -> str:
    """`512 B`, `3.2 MB`, `1.5 GB` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def free_space(path: Path) -> str:
    """The space free on the filesystem holding `path` (or its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return human_size(shutil.disk_usage(p).free)
            except OSError:
                break
    return "unknown space"


def disk_full_error(path: Path, doing: str, kept: str) -> DiskFullError:
    """`<doing> <path> failed: the disk is full (N free there); <kept>`."""
    return DiskFullError(f"{doing} {path} failed: the disk is full ({free_space(path)} free "
                         f"there); {kept}")


@contextlib.contextmanager
def stop_on_full_disk(path: Path, doing: str, kept: str) -> Iterator[None]:
    """Turn any exception that says the disk is full, raised inside, into one DiskFullError
    about `path`; everything else passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(path, doing, kept) from None
        raise


def _kept(path: Path) -> str:
    return (f"the previous {path.name} is intact" if path.exists()
            else f"nothing was written (no {path.name})")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, `root` included."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def temporary_sibling(path: Path) -> Path:
    """Where an atomic write of `path` writes first (hidden, and unique to this process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale(path: Path) -> None:
    """Remove what killed writers of `path` left (their temporary files or folders)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temporary file, which is then fsynced and renamed to `path`, and the
    folder fsynced: `path` is the old file or the new one. The folder must exist."""
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            raise disk_full_error(path, "writing", _kept(path)) from None
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8, newlines written as given (no platform translation)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    write_atomic(path, write)


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON with one-space indent and sorted keys (the run folder's and checkpoints' format)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, path: Path) -> None:
    import torch

    def write(tmp: Path) -> None:
        # Through a Python file: on a full disk its write raises OSError(ENOSPC), where torch's
        # own file writer says only "unexpected pos" or "iostream error".
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    write_atomic(path, write)


def copy_atomic(src: Path, dst: Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def publish_dir(tmp: Path, target: Path, replace: bool = False) -> None:
    """fsync the complete folder `tmp`, rename it to `target` and fsync the parent. With
    `replace`, an existing `target` is moved aside first and removed once the new one is in
    place (so a crash leaves the old folder or the new, plus at most a hidden leftover)."""
    fsync_tree(tmp)
    if replace and target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(tmp, target)
    fsync_path(target.parent)


def write_dir_atomic(target: Path, fill: Callable[[Path], Any], replace: bool = False) -> Path:
    """`fill(tmp)` writes the folder's files into a new temporary folder beside `target`, which
    `publish_dir` then puts in place; the temporary folder is removed if anything fails. The
    folder is made with os.mkdir, so it has the user's umask (tempfile.mkdtemp forces 0700,
    which would hide the result from the rest of a team's cluster)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        try:
            fill(tmp)
            publish_dir(tmp, target, replace)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    except Exception as e:
        if not isinstance(e, DiskFullError) and is_disk_full(e):
            kept = (f"the previous {target.name} is intact" if target.exists()
                    else f"nothing was written (no {target.name})")
            raise disk_full_error(target, "writing", kept) from None
        raise
    return target


def read_text(path: str | Path, what: str = "file", encoding: str = "utf-8",
              universal_newlines: bool = True) -> str:
    """The whole file as text, or one UserError naming it and what is wrong (missing, a folder,
    not UTF-8 text: with the line and byte of the first bad byte). `encoding="utf-8-sig"` drops
    a byte-order mark; "\\r\\n" and "\\r" read as "\\n" unless `universal_newlines` is off (as
    Path.read_text reads them)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text
