"""The shard format and the manifest.

Shards are plain POSIX (ustar) tar files in the WebDataset layout: one member per sample, named
``<split>-<shard:06d>-<offset:06d>.sample`` (the WebDataset key is the part before the dot), so
``webdataset.WebDataset(url)`` and ``tar tf`` read them. Members are written with fixed metadata
(mtime 0, uid/gid 0, mode 0644), so the same samples always give byte-identical shards.

A sample (the member's bytes) is a 16-byte little-endian header followed by the token ids::

    0  2s  magic b"BS"
    2  u8  format version (1)
    3  u8  bytes per token id (2: uint16, used when the vocabulary has <= 65,536 entries; else 4)
    4  u16 number of tokens n (the model-ready sequence: [CLS] A [SEP] B [SEP], unpadded)
    6  u16 a_len: tokens of type 0 ([CLS] A [SEP]); n when there is no pair
    8  i8  pair label: 0 = B follows A / in order, 1 = random / swapped, -1 = none (mlm)
    9  3x  zero
    12 u32 CRC-32 of bytes 0..11 and the ids: a flipped byte anywhere in a sample is caught when
           it is read, even where the shard's sha256 is not checked
    16 n * (u16|u32) token ids

`decode_sample` turns those bytes into (ids, a_len, label) for anyone reading the shards through
plain WebDataset. The manifest (``manifest.json`` beside the shards) lists every shard with its
sample count, size and sha256, plus everything needed to refuse a mismatched resume (tokenizer
hash, sequence length, pair objective, seed, format version). Its `fingerprint` is the sha256 of
its canonical JSON without ``shard_base``, so copying the shards to object storage and setting
``shard_base`` does not change the identity of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertscale.errors import UserError

FORMAT_VERSION = 1
FORMAT_NAME = "bertscale-shards"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")
MAX_SAMPLES_PER_SHARD = 999_999  # six digits of offset in member names

HEADER = struct.Struct("<2sBBHHb3xI")
assert HEADER.size == 16
MAGIC = b"BS"
LABEL_NONE = -1


class SampleError(ValueError):
    """A stored sample does not decode (its caller names the shard and the position)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def encode_sample(ids: np.ndarray, a_len: int, label: int) -> bytes:
    """Sample bytes for one sequence; `ids` already has the shard's dtype (<u2 or <u4)."""
    n = len(ids)
    if n > 65535 or not 0 < a_len <= n:
        raise ValueError(f"bad sample: {n} tokens, a_len {a_len}")
    body = ids.tobytes()
    head = HEADER.pack(MAGIC, FORMAT_VERSION, ids.dtype.itemsize, n, a_len, label, 0)[:12]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + crc.to_bytes(4, "little") + body


def decode_sample(buf: Any, start: int = 0, size: int | None = None,
                  width: int | None = None) -> tuple[np.ndarray, int, int]:
    """(ids, a_len, label) of the sample in `buf[start:start + size]` (all of `buf` by default;
    the ids view `buf` without a copy); SampleError saying what is damaged. `width`: the bytes
    per id the shard must have (its manifest's)."""
    size = len(buf) - start if size is None else size
    if size < HEADER.size:
        raise SampleError("sample shorter than its header")
    magic, version, w, n, a_len, label, crc = HEADER.unpack_from(buf, start)
    if magic != MAGIC or version != FORMAT_VERSION or w not in (2, 4) or width not in (None, w):
        raise SampleError("bad sample header (corrupt data)")
    if size != HEADER.size + n * w or not 0 < a_len <= n:
        raise SampleError("sample header inconsistent with its size (corrupt data)")
    body = start + HEADER.size
    if zlib.crc32(buf[body:start + size], zlib.crc32(buf[start:start + 12])) != crc:
        raise SampleError("checksum mismatch (corrupt data)")
    return np.frombuffer(buf, dtype="<u2" if w == 2 else "<u4", count=n, offset=body), a_len, label


def member_name(split: str, shard: int, offset: int) -> str:
    return f"{split}-{shard:06d}-{offset:06d}.sample"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


# ---------------------------------------------------------------------------------------------
# tar writing and indexing
#
# Member headers come from the standard library (`tarfile.TarInfo.tobuf`, ustar); the archive
# around them is written here. `tarfile.TarFile` would pad every archive to a multiple of its
# 10 KiB record size, giving other bytes (and sha256s) than the shards bertscale has always
# written, and neither hashes as it writes nor fsyncs before the rename. Reading is here too:
# `tarfile` (and `wids`, the WebDataset authors' indexed reader) stop at the first damaged
# header, where `index_tar` scans on to the next one and records which samples are lost, and
# neither knows the per-sample CRC. That is why the project does not depend on `wids`.

BLOCK = 512
_EOF = b"\0" * (2 * BLOCK)
_ZERO_BLOCK = b"\0" * BLOCK


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular member with fixed metadata (mode 0644, uid/gid 0,
    mtime 0, no owner names), so the same samples always give byte-identical shards."""
    if len(name.encode("ascii")) > 100:  # longer names would be split into ustar's prefix field
        raise ValueError(f"tar member name too long: {name}")
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


class TarWriter:
    """Writes a tar to `path + ".tmp"`, hashing as it goes; `close()` renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.count = 0

    def _write(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.sha.update(b)
        self.bytes += len(b)

    def add(self, name: str, payload: bytes | memoryview) -> None:
        self._write(tar_header(name, len(payload)))
        self._write(payload)
        pad = -len(payload) % BLOCK
        if pad:
            self._write(b"\0" * pad)
        self.count += 1

    def close(self) -> tuple[int, str]:
        self._write(_EOF)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.bytes, self.sha.hexdigest()

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class TarIndex:
    """Where each sample's bytes are in a shard; problems per sample offset."""

    starts: np.ndarray  # (n,) int64 byte offset of the payload, -1 if the sample is missing
    sizes: np.ndarray   # (n,) int64
    problems: dict[int, str]  # offset -> what is wrong


def index_tar(f: ShardFile, split: str, shard: int, expected: int) -> TarIndex:
    """Index a shard written by `TarWriter` by walking its member headers.

    A member whose header is damaged is skipped by scanning forward, block by block, to the next
    valid header (members carry their offset in their name, so later samples stay readable); a
    shard cut short leaves the samples after the cut missing. Each problem is recorded against the
    sample offsets it affects; the caller decides whether to raise or skip."""
    size = f.size
    starts = np.full(expected, -1, dtype=np.int64)
    sizes = np.zeros(expected, dtype=np.int64)
    problems: dict[int, str] = {}
    prefix = f"{split}-{shard:06d}-".encode()
    plen = len(prefix)
    window = _ReadWindow(f)
    headers = bytearray()   # the valid members' header blocks, checksummed in batches
    pos = 0

    def check_headers() -> None:
        # Header checksums, vectorised over the 512-byte blocks: a corrupt byte in a header field
        # we do not parse (mode, mtime…) still makes the shard unreadable for tar and WebDataset.
        rows = np.frombuffer(bytes(headers), dtype=np.uint8).reshape(-1, BLOCK)
        computed = (rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64)
                    + 8 * 32)
        for i, row in enumerate(rows):
            if computed[i] != _stored_checksum(row.tobytes()):
                off = int(row[plen:plen + 6].tobytes())
                problems.setdefault(off, "tar header checksum mismatch (corrupt header)")
                starts[off] = -1
        headers.clear()

    while pos + BLOCK <= size:
        h = window.get(pos, BLOCK)
        if len(h) < BLOCK:
            break  # the file is shorter than when it was opened: the rest is reported missing
        name_end = h.find(b"\0", 0, 100)
        name = h[:name_end if name_end >= 0 else 100]
        if not name and h == _ZERO_BLOCK:
            break  # end-of-archive marker
        off = -1
        if (name[:plen] == prefix and name.endswith(b".sample") and len(name) == plen + 13
                and h[257:262] == b"ustar"):
            try:
                off = int(name[plen:plen + 6])
                length = int(h[124:135], 8)
            except ValueError:
                off = -1
        if not 0 <= off < expected:
            pos += BLOCK  # not a header of ours: damaged; look for the next one
            continue
        end = pos + BLOCK + length
        if end > size:
            problems[off] = "truncated: the shard ends inside this sample"
            break
        starts[off] = pos + BLOCK
        sizes[off] = length
        headers += h
        if len(headers) >= 1024 * BLOCK:
            check_headers()
        pos = end + (-length % BLOCK)
    if headers:
        check_headers()
    for off in np.nonzero(starts < 0)[0].tolist():
        problems.setdefault(off, "missing: the shard is truncated, or this sample's tar header "
                                 "is damaged")
    return TarIndex(starts, sizes, problems)


def count_members(path: Path) -> int:
    """Members of a tar shard, found by reading its 512-byte headers only (a seek over each
    payload): what `verify_shards` compares with the manifest's sample count at start."""
    n = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + BLOCK <= size:
            header = os.pread(f.fileno(), BLOCK, pos)
            if header[0] == 0:
                break  # end-of-archive marker
            try:
                length = int(header[124:135], 8)
            except ValueError:
                break  # a damaged header: the samples after it are reported when read
            n += 1
            pos += BLOCK + length + (-length % BLOCK)
    return n


def _stored_checksum(header: bytes) -> int:
    try:
        return int(header[148:156].strip(b"\0 "), 8)
    except ValueError:
        return -1


class ShardFile:
    """A shard open for random reads (`os.pread`), never memory-mapped: a map of a file that is
    cut short under it (`cp` or `rsync --inplace` over the data of a running job) kills the
    process with SIGBUS at the next access past the new end, where a read comes back short and
    becomes a SampleError naming what happened. Safe to share between threads; not across
    fork (each DataLoader worker opens its own)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        if self.size == 0:
            self.close()
            raise UserError(f"{path}: shard is empty")

    def read(self, start: int, size: int) -> bytes:
        """`size` bytes at `start`, or SampleError if the file no longer has them."""
        data = os.pread(self.fd, size, start)
        if len(data) < size:
            now = os.fstat(self.fd).st_size
            raise SampleError(f"the shard file is {now} bytes now, {self.size} when this job "
                              f"opened it: it was cut short or is being rewritten under the "
                              f"running job (copied or synced over?)")
        return data

    def read_upto(self, start: int, size: int) -> bytes:
        """Up to `size` bytes at `start` (fewer at the end of the file)."""
        return os.pread(self.fd, size, start)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _ReadWindow:
    """Sequential reads of small pieces (tar headers) through one large read at a time."""

    def __init__(self, f: ShardFile, size: int = 1 << 20):
        self.f, self.size = f, size
        self.start, self.buf = 0, b""

    def get(self, pos: int, n: int) -> bytes:
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            self.start, self.buf = pos, self.f.read_upto(pos, max(self.size, n))
        return self.buf[pos - self.start:pos - self.start + n]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# manifest

@dataclass
class ShardInfo:
    name: str
    """File name relative to the manifest's folder (or `shard_base`), or a full URL."""
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    path: Path
    """The manifest file itself."""
    format_version: int
    seq_len: int
    pair_objective: str
    """nsp | sop | mlm."""
    tokenizer_hash: str
    vocab_file: Path
    """The vocab.txt copied beside the manifest (absolute after reading)."""
    lowercase: bool
    seed: int
    vocab_size: int
    token_dtype: str
    """uint16 or uint32."""
    samples_per_shard: int
    shards: dict[str, list[ShardInfo]]
    fingerprint: str
    """sha256 of the canonical manifest without `shard_base`: the identity of the data."""
    shard_base: str | None = None
    """Where shards live when not beside the manifest: a folder, a URL prefix, or a template
    with `{name}` (e.g. ``pipe:aws s3 cp s3://bucket/seq128/{name} -``)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How the data was made (short_seq_prob, dupe_factor, eval_fraction, inputs...)."""
    stats: dict[str, Any] = field(default_factory=dict)

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self._split(split))

    def _split(self, split: str) -> list[ShardInfo]:
        if split not in self.shards:
            raise UserError(f"{self.path}: no split {split!r} (has {', '.join(self.shards)})")
        return self.shards[split]

    def shard_location(self, split: str, index: int) -> str:
        """Local path or URL of one shard."""
        name = self._split(split)[index].name
        if "://" in name or name.startswith("pipe:") or os.path.isabs(name):
            return name
        base = self.shard_base
        if base is None:
            return str(self.path.parent / name)
        if "{name}" in base:
            return base.replace("{name}", name)
        if "://" in base or base.startswith("pipe:"):
            return base.rstrip("/") + "/" + name
        return str(Path(base) / name)


def _stored_base(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("shard_base")
    except (OSError, ValueError, AttributeError):
        return None


_REQUIRED = {"format": str, "format_version": int, "seq_len": int, "pair_objective": str,
             "tokenizer_hash": str, "vocab_file": str, "lowercase": bool, "seed": int,
             "vocab_size": int, "token_dtype": str, "samples_per_shard": int, "shards": dict}


def fingerprint_of(data: dict[str, Any]) -> str:
    core = {k: v for k, v in data.items() if k != "shard_base"}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_dict(**fields: Any) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **fields}


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader sees the old manifest or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Over ruff's complexity limit on purpose: one check per manifest field, each with its message.
def read_manifest(path: str | Path, shard_base: str | None = None,  # noqa: C901
                  cache_dir: Path | None = None) -> Manifest:
    """Read and check a manifest (the JSON file, or the folder that holds manifest.json). A
    manifest in an object store (``s3://…/manifest.json``) is copied with its vocabulary into the
    node cache (`cache_dir`, see `bertscale.data.cache`); its shards are read from beside it."""
    if isinstance(path, str) and "://" in path:
        from bertscale.data import cache, remote
        url = path if path.endswith(".json") else remote.join(path, MANIFEST_NAME)
        path = remote.fetch_manifest(url, cache_dir or cache.default_cache_root())
        shard_base = shard_base or _stored_base(path) or remote.parent(url)
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: data manifest not found (run `bertscale prepare` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: data manifest is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: data manifest is not a JSON object")
    for key, tp in _REQUIRED.items():
        if key not in data:
            raise UserError(f"{path}: data manifest lacks field {key!r}")
        if not isinstance(data[key], tp) or (tp is int and isinstance(data[key], bool)):
            raise UserError(f"{path}: field {key!r} should be {tp.__name__}, "
                            f"got {type(data[key]).__name__}")
    if data["format"] != FORMAT_NAME:
        raise UserError(f"{path}: not a bertscale data manifest (format {data['format']!r})")
    if data["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: shard format version {data['format_version']} is not supported "
                        f"by this bertscale (reads version {FORMAT_VERSION}); re-run prepare")
    if data["pair_objective"] not in ("nsp", "sop", "mlm"):
        raise UserError(f"{path}: unknown pair_objective {data['pair_objective']!r}")
    if data["token_dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{path}: unknown token_dtype {data['token_dtype']!r}")
    shards: dict[str, list[ShardInfo]] = {}
    for split, rows in data["shards"].items():
        if not isinstance(rows, list):
            raise UserError(f"{path}: shards.{split} should be a list")
        infos = []
        for i, row in enumerate(rows):
            try:
                info = ShardInfo(name=str(row["name"]), samples=int(row["samples"]),
                                 bytes=int(row["bytes"]), sha256=str(row["sha256"]))
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path}: shards.{split}[{i}] is malformed ({e})") from None
            if info.samples <= 0 or info.samples > MAX_SAMPLES_PER_SHARD:
                raise UserError(f"{path}: shards.{split}[{i}] ({info.name}) has {info.samples} samples")
            infos.append(info)
        shards[split] = infos
    vocab = path.parent / data["vocab_file"]
    if not vocab.is_file():
        raise UserError(f"{path}: vocabulary {vocab} named by the manifest is missing")
    return Manifest(path=path, format_version=data["format_version"], seq_len=data["seq_len"],
                    pair_objective=data["pair_objective"], tokenizer_hash=data["tokenizer_hash"],
                    vocab_file=vocab, lowercase=data["lowercase"], seed=data["seed"],
                    vocab_size=data["vocab_size"], token_dtype=data["token_dtype"],
                    samples_per_shard=data["samples_per_shard"], shards=shards,
                    fingerprint=fingerprint_of(data),
                    shard_base=shard_base if shard_base is not None else data.get("shard_base"),
                    settings=data.get("settings", {}), stats=data.get("stats", {}))
