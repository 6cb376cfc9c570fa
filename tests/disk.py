"""A real small filesystem for the full-disk tests: a tmpfs of a given size (needs root to mount;
the tests skip with the reason where it cannot be mounted), and a filler file that leaves a
chosen amount of it free."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "100m") mounted in a new folder under `parent`."""
    mount = parent / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file that leaves about `leave` bytes of `disk` free (0: the disk full);
    remove it (or call again) to change that."""
    filler = disk / ".filler"
    filler.unlink(missing_ok=True)
    size = max(shutil.disk_usage(disk).free - leave, 0)
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        try:
            while size > 0:
                size -= f.write(chunk[:min(size, len(chunk))])
        except OSError:          # asked for more than there is: the disk is full
            pass
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return filler
