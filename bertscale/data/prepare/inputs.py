"""The input files: expanded, sized and checked before any work, and read locally (one in an
object store is first copied beside the unit's spools, hashed on the way)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bertscale.data.prepare.config import PrepareConfig
from bertscale.data.shards import sha256_file
from bertscale.data.text import expand_inputs
from bertscale.errors import UserError


def list_inputs(cfg: PrepareConfig) -> tuple[list[str], list[int]]:
    """The input files (local paths or URLs, sorted) and their sizes; pyarrow is checked here
    when a Parquet or Arrow input is named, so that its absence is one line before any work."""
    from bertscale.data import remote, tables

    files = expand_inputs(cfg.inputs)
    if cfg.format in ("parquet", "arrow") or any(
            f.endswith((".parquet", ".arrow")) for f in files):
        tables.pyarrow()
    # A missing column is found now, in the first file that lacks it, not in the middle of the
    # run (a local file's schema is its footer; one in a store is checked when it is read).
    columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field is not None else [])
    hint = "; set --text-column" + (" / --doc-id-column" if cfg.id_field is not None else "")
    for f in files:
        if not remote.is_remote(f) and cfg.format in ("auto", "parquet", "arrow") \
                and tables.file_kind(f) is not None:
            tables.check_columns(f, columns, hint)
    return files, input_sizes(files)


def input_sizes(files: list[str]) -> list[int]:
    from bertscale.data import remote

    sizes = []
    for f in files:
        try:
            sizes.append(remote.object_size(f) if remote.is_remote(f) else os.path.getsize(f))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"input {f}: {remote.reason(e)}") from None
    return sizes


def local_input(location: str, folder: Path) -> tuple[Path, str, int]:
    """(a local path to read, sha256, bytes) of one input; one in an object store is first
    copied into `folder` (hashed on the way), so it is read once and resumes stay exact."""
    from bertscale.data import remote

    if not remote.is_remote(location):
        return Path(location), sha256_file(Path(location)), os.path.getsize(location)
    local = folder / ("input-" + Path(location).name)
    h, n = hashlib.sha256(), 0
    try:
        with remote.open_read(location) as src, open(local, "wb") as dst:
            while block := src.read(remote.READ_BLOCK):
                h.update(block)
                dst.write(block)
                n += len(block)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"input {location}: {remote.reason(e)}") from None
    return local, h.hexdigest(), n
