"""The features folder `bertscale embed` writes, and reading it back in input order.

manifest.json holds the checkpoint, layers, pooling, dim, dtype, world size, counts and the
shards in order. A shard is, per `--format`: npy (features-r<rank>-<n>.npy rows, .ids.npy int64
ids and, per word, .offsets.npy: record i owns rows offsets[i]:offsets[i+1]), safetensors (one
file with the same arrays as tensors features / ids / offsets), or wds (a WebDataset tar, one
sample per record, key = the id as 12 digits, member `<key>.features.npy`). Within a shard
records are in increasing id order.
"""

from __future__ import annotations

import heapq
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bertscale.errors import UserError
from bertscale.files import write_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, arr, allow_pickle=False)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """One rank's output: buffers records (already in the stored dtype) and writes a shard at
    `shard_size` records or `shard_bytes` of features, whichever comes first (per word, a
    record is ~100 vectors: a count of records alone would make shards of many GB)."""

    def __init__(self, folder: Path, rank: int, fmt: str, shard_size: int, dtype: np.dtype,
                 per_word: bool, dim: int, shard_bytes: int = 1 << 30):
        self.folder, self.rank, self.fmt = folder, rank, fmt
        self.shard_size, self.dtype, self.per_word, self.dim = shard_size, dtype, per_word, dim
        self.shard_bytes = shard_bytes
        self.ids: list[int] = []
        self.vecs: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: Sequence[int], vecs: Sequence[np.ndarray]) -> None:
        for i, v in zip(ids, vecs):
            v = v.astype(self.dtype, copy=False)
            self.ids.append(i)
            self.vecs.append(v)
            self.buffered += v.nbytes
            if len(self.ids) >= self.shard_size or self.buffered >= self.shard_bytes:
                self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        stem = f"features-r{self.rank:05d}-{len(self.shards):06d}"
        ids = np.asarray(self.ids, dtype=np.int64)
        if self.per_word:
            lengths = [len(v) for v in self.vecs]
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum(lengths)
            feats = (np.concatenate(self.vecs) if offsets[-1] else
                     np.zeros((0, self.dim), self.dtype))
        else:
            offsets = None
            feats = np.stack(self.vecs)
        self.ids, self.vecs, self.buffered = [], [], 0
        info: dict[str, Any] = {"rank": self.rank, "records": len(ids), "rows": int(len(feats)),
                                "first_id": int(ids[0]), "last_id": int(ids[-1])}
        if self.fmt == "npy":
            files = {"features": f"{stem}.npy", "ids": f"{stem}.ids.npy"}
            arrays = {"features": feats, "ids": ids}
            if offsets is not None:
                files["offsets"] = f"{stem}.offsets.npy"
                arrays["offsets"] = offsets
            for key, name in files.items():
                write_atomic(self.folder / name, partial(_write_npy, arr=arrays[key]))
            info["files"] = files
        elif self.fmt == "safetensors":
            from safetensors.numpy import save_file
            tensors = {"features": np.ascontiguousarray(feats), "ids": ids}
            if offsets is not None:
                tensors["offsets"] = offsets
            write_atomic(self.folder / f"{stem}.safetensors",
                         lambda p: save_file(tensors, str(p), metadata={"format": "bertscale"}))
            info["files"] = {"safetensors": f"{stem}.safetensors"}
        else:
            def write_tar(p: Path) -> None:
                with tarfile.open(p, "w") as tar:
                    for j, i in enumerate(ids):
                        row = (feats[offsets[j]:offsets[j + 1]] if offsets is not None
                               else feats[j])
                        data = _npy_bytes(np.ascontiguousarray(row))
                        ti = tarfile.TarInfo(f"{int(i):012d}.features.npy")
                        ti.size, ti.mtime, ti.mode = len(data), 0, 0o644  # reproducible bytes
                        tar.addfile(ti, io.BytesIO(data))
            write_atomic(self.folder / f"{stem}.tar", write_tar)
            info["files"] = {"tar": f"{stem}.tar"}
        self.shards.append(info)

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        return self.shards


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A features folder's manifest, checked to be one this version reads."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; is {folder} a `bertscale embed` output?") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != "bertscale-features":
        raise UserError(f"{path}: not a bertscale features manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')} is not "
                        f"{FORMAT_VERSION}, the one this version reads")
    return manifest


def _iter_shard(folder: Path, manifest: dict[str, Any], info: dict[str, Any]
                ) -> Iterator[tuple[int, np.ndarray]]:
    files = info["files"]
    per_word = manifest["pooling"] == "first-subtoken"
    if manifest["output_format"] == "wds":
        with tarfile.open(folder / files["tar"]) as tar:
            for member in tar:
                f = tar.extractfile(member)
                assert f is not None
                yield int(member.name.split(".", 1)[0]), np.load(io.BytesIO(f.read()))
        return
    if manifest["output_format"] == "safetensors":
        from safetensors.numpy import load_file
        t = load_file(str(folder / files["safetensors"]))
        feats, ids, offsets = t["features"], t["ids"], t.get("offsets")
    else:
        feats = np.load(folder / files["features"], mmap_mode="r")
        ids = np.load(folder / files["ids"])
        offsets = np.load(folder / files["offsets"]) if per_word else None
    for j, i in enumerate(ids):
        row = feats[offsets[j]:offsets[j + 1]] if offsets is not None else feats[j]
        yield int(i), np.array(row)


def iter_features(folder: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """(id, features) for every record in input order: (D,) per record for cls / mean pooling,
    (n_words, D) for first-subtoken. Merges the ranks' shards lazily (one shard open per rank)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    per_rank: dict[int, list[dict[str, Any]]] = {}
    for info in manifest["shards"]:
        per_rank.setdefault(info["rank"], []).append(info)

    def stream(shards: list[dict[str, Any]]) -> Iterator[tuple[int, np.ndarray]]:
        for info in shards:
            yield from _iter_shard(folder, manifest, info)

    yield from heapq.merge(*(stream(s) for _, s in sorted(per_rank.items())), key=lambda x: x[0])


def load_features(folder: str | Path) -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
    """All of it in memory, in input order: ids (N,) and features (N, D), or a list of (n_i, D)
    arrays for first-subtoken pooling. For outputs that fit in memory; else iter_features."""
    pairs = list(iter_features(folder))
    ids = np.array([i for i, _ in pairs], dtype=np.int64)
    vecs = [v for _, v in pairs]
    if read_manifest(folder)["pooling"] == "first-subtoken":
        return ids, vecs
    return ids, (np.stack(vecs) if vecs else np.zeros((0, 0), np.float32))
