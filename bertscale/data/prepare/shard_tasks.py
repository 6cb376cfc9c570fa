"""Phase 2: the units' spools -> tar shards of exactly `samples_per_shard` samples.

Shard k's samples are known from the spool counts alone, so any process can write any shard. A
shard is written to a temporary file while it is hashed, then renamed; a small done-marker
records its sha256, so a re-run skips it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertscale.data.prepare.config import PrepareConfig
from bertscale.data.prepare.units import spool_key, unit_dir
from bertscale.data.shards import SPLITS, TarWriter, member_name, shard_name
from bertscale.files import write_text_atomic


@dataclass
class ShardTask:
    seq_len: int
    split: str
    index: int
    pieces: list[tuple[int, int, int]]  # (unit, first sample, end sample) in spool order
    work: str
    out: str

    @property
    def marker(self) -> Path:
        name = shard_name(self.split, self.index)
        return Path(self.work) / "shards" / f"seq{self.seq_len}-{name}.json"

    @property
    def path(self) -> Path:
        return Path(self.out) / f"seq{self.seq_len}" / shard_name(self.split, self.index)


def plan_shards(summaries: list[dict[str, Any]], cfg: PrepareConfig, work: Path) -> list[ShardTask]:
    """Every shard of every length and split: which spool samples it holds, in unit order."""
    tasks = []
    S = cfg.samples_per_shard
    for L in cfg.seq_lens:
        for split in SPLITS:
            key = spool_key(L, split)
            units = [(s["unit"], s["counts"][key]) for s in sorted(summaries, key=lambda s: s["unit"])]
            total = sum(n for _, n in units)
            for k in range((total + S - 1) // S):
                lo, hi = k * S, min((k + 1) * S, total)
                pieces, base = [], 0
                for unit, n in units:
                    a, b = max(lo, base), min(hi, base + n)
                    if a < b:
                        pieces.append((unit, a - base, b - base))
                    base += n
                tasks.append(ShardTask(L, split, k, pieces, str(work), str(cfg.out)))
    return tasks


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard (skipped when its marker and file are there); its manifest row."""
    marker = task.marker
    if marker.is_file():
        info = json.loads(marker.read_text())
        if task.path.is_file() and task.path.stat().st_size == info["bytes"]:
            return info
    task.path.parent.mkdir(parents=True, exist_ok=True)
    writer = TarWriter(task.path)
    try:
        offset = 0
        for unit, a, b in task.pieces:
            d = unit_dir(Path(task.work), unit)
            key = spool_key(task.seq_len, task.split)
            offs = np.load(d / f"{key}.idx.npy")
            with open(d / f"{key}.bin", "rb") as f:
                f.seek(int(offs[a]))
                blob = f.read(int(offs[b] - offs[a]))
            base = int(offs[a])
            for i in range(a, b):
                writer.add(member_name(task.split, task.index, offset),
                           memoryview(blob)[int(offs[i]) - base:int(offs[i + 1]) - base])
                offset += 1
        nbytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    info = dict(name=task.path.name, samples=offset, bytes=nbytes, sha256=sha)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(info, sort_keys=True))
    return info
