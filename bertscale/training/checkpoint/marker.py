"""The commit marker: the file that makes a folder a complete checkpoint (or a complete
universal conversion of one).

It is written last, by one rank, after everything it vouches for is on disk: a temporary file,
fsync, rename, fsync of the folder (bertscale.files.write_json_atomic) and of the folder's
parent. A folder without one is an interrupted write and is never loaded.

One damage policy: a marker is renamed into place whole, so one that is not valid JSON, or that
names another folder than the one it is in, is outside damage (a copy gone wrong, a disk error).
Nothing is loaded from that folder, and the reader says so in one line naming the file, rather
than silently taking an older checkpoint or converting again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import fsync_path, write_json_atomic

COMMIT_FILE = "commit.json"


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    """Commit `folder`: fsync it, then write its marker atomically (the marker's "tag" is the
    folder's name), then fsync the parent so the commit survives a crash."""
    if marker.get("tag") != folder.name:
        raise ValueError(f"a marker for {folder} must name it, got tag {marker.get('tag')!r}")
    fsync_path(folder)
    write_json_atomic(folder / COMMIT_FILE, marker)
    fsync_path(folder.parent)


def read_marker(folder: Path, *, remedy: str) -> dict[str, Any] | None:
    """The marker of `folder`, None when it has none (never committed, or no such folder).
    Damage is a UserError naming the file; `remedy` says what the user can do about it."""
    path = folder / COMMIT_FILE
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: commit marker is not valid JSON ({e}); {remedy}") from None
    if not isinstance(marker, dict) or marker.get("tag") != folder.name:
        named = marker.get("tag") if isinstance(marker, dict) else marker
        raise UserError(f"{path}: commit marker does not name this checkpoint ({named!r}); "
                        f"{remedy}")
    return marker


def uncommit(folder: Path) -> None:
    """Take a folder's marker away (before deleting its files): from then on it is an
    interrupted write, never loaded."""
    (folder / COMMIT_FILE).unlink(missing_ok=True)
    fsync_path(folder)
