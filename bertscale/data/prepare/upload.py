"""A prepared folder uploaded to an object-store prefix (`prepare --out s3://...`): shards and
vocabulary first, the manifest last, resumable, never mixing two data sets under one prefix."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from bertscale.data import remote
from bertscale.data.shards import MANIFEST_NAME, fingerprint_of, sha256_file
from bertscale.errors import UserError


def default_stage(url: str) -> Path:
    """Where `--out URL` stages its shards without --stage: a folder of its own per output
    (./bertscale-stage/s3/bucket/prefix), so that preparing two outputs from one working folder
    neither mixes them nor refuses the second as "a run with other settings"."""
    scheme, rest = url.split("://", 1)
    parts = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) for p in rest.split("/") if p]
    parts = ["_" if p in (".", "..") else p for p in parts]
    return Path("bertscale-stage", scheme.lower(), *parts)


UPLOAD_RECORD = ".bertscale-upload.json"
"""Beside the shards in a store prefix while an upload is unfinished: the manifest being
uploaded. It vouches for the objects already there (a re-run sends only what is missing) and
is deleted once the manifest itself is in place."""


def upload_prepared(manifest: Path, url: str, verbose: bool = True) -> str:
    """Upload one prepared folder (shards, vocabulary, then the manifest) to the store prefix
    `url`. Shard names in the manifest stay relative to it, so they resolve beside the
    manifest's URL and the prefix can be copied or moved whole (``aws s3 sync``). Returns the
    manifest's URL.

    What is there already counts only when a manifest of the same data vouches for it: the
    prefix's complete manifest, or the record of an unfinished upload (`UPLOAD_RECORD`) of the
    same shards, whose objects of the right size were uploaded whole (object stores publish an
    object only complete), so a re-run after a failed upload sends only the rest. A prefix that
    holds ANOTHER prepare's manifest or unfinished upload is refused: its objects have the
    same names and, with one --samples-per-shard, often the same sizes, and mixing them under
    one manifest gives shards whose sha256 training refuses. Objects no manifest vouches for are
    sent again. Each staged file is checked against its manifest sha256 before it is sent.
    Limit: two uploads into one prefix at the same moment are not detected."""
    data = json.loads(manifest.read_text(encoding="utf-8"))
    ours = fingerprint_of(data)
    sha = {row["name"]: row["sha256"] for rows in data["shards"].values() for row in rows}
    names = [*sha, data["vocab_file"]]
    fs = remote.filesystem(url)
    vouched = False
    for name, what in ((MANIFEST_NAME, "the manifest of"), (UPLOAD_RECORD, "an unfinished upload of")):
        there = _remote_json(fs, remote.join(url, name))
        if there is None:
            continue
        theirs = fingerprint_of(there) if isinstance(there, dict) else "not a manifest"
        if theirs != ours:
            raise UserError(f"--out {url}: holds {what} other shards (manifest fingerprint "
                            f"{theirs[:12]}, these {ours[:12]}); uploading would mix two data "
                            f"sets under one manifest. Use an empty prefix, or delete "
                            f"{url}/ first")
        vouched = True
    if not vouched:
        _put(manifest, remote.join(url, UPLOAD_RECORD))
    sent = 0
    for name in names:
        local, target = manifest.parent / name, remote.join(url, name)
        try:
            if vouched and fs.exists(target) and remote.object_size(target) == local.stat().st_size:
                continue
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"reading {target}: {remote.reason(e)}") from None
        if name in sha and sha256_file(local) != sha[name]:
            raise UserError(f"{local}: its sha256 is not the one {manifest} lists; the staged "
                            f"shards changed after prepare wrote them (prepare again)")
        _put(local, target)
        sent += 1
    target = remote.join(url, MANIFEST_NAME)
    _put(manifest, target)  # last: a reader never sees a manifest before its shards
    try:
        fs.rm_file(remote.join(url, UPLOAD_RECORD))
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001
        raise UserError(f"deleting {remote.join(url, UPLOAD_RECORD)}: {remote.reason(e)}") from None
    if verbose:
        print(f"prepare: uploaded {sent} of {len(names)} files (the rest were there, checked "
              f"against the manifest) and the manifest -> {target}", file=sys.stderr)
    return target


def _remote_json(fs: Any, url: str) -> Any:
    """A small JSON object of a store, None when there is none."""
    try:
        if not fs.exists(url):
            return None
        return json.loads(remote.read_bytes(url))
    except ValueError:
        return "not JSON"
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"reading {url}: {remote.reason(e)}") from None


def _put(local: Path, target: str) -> None:
    try:
        remote.upload(local, target)
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"uploading {local} to {target}: {remote.reason(e)}") from None
