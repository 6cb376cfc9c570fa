"""One `bertscale embed` run: contextual features from a frozen BERT (the paper's feature-based
approach, Devlin et al. 2018, Section 5.3) for every record of an input, into a features folder.

Rank r of W embeds records r, r+W, ... on its own device and writes its own shards into the
hidden sibling `.<name>.partial`, which rank 0 renames into place once every rank is done: the
output folder is complete or absent. Limits: docs/finetuning.md ("Named entities and features").
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from bertscale.embed.records import InputSpec, batched, read_records
from bertscale.embed.store import FORMAT_VERSION, MANIFEST, ShardWriter
from bertscale.errors import UserError
from bertscale.features import FeatureExtractor
from bertscale.files import publish_dir, write_atomic

POOLINGS = ("cls", "mean", "first-subtoken")
OUTPUT_FORMATS = ("npy", "safetensors", "wds")


@dataclass
class EmbedConfig:
    """One `bertscale embed` run."""

    checkpoint: Path
    """A Hugging Face BERT folder or a bertscale run / checkpoint folder."""
    input: InputSpec
    output_dir: Path
    layers: str = "last"
    layer_weights: list[float] | None = None
    pooling: str = "cls"
    max_seq_length: int | None = None
    """Word pieces per sequence, [CLS] and [SEP] included; default min(512, the model's)."""
    batch_size: int = 64
    """Records per forward pass (per process)."""
    shard_size: int = 100_000
    """Records per output shard (per process)."""
    shard_mb: int = 1024
    """Also close a shard once its features reach this many MiB (per-word output is large)."""
    output_format: str = "npy"
    dtype: str = "float32"
    """Stored dtype: float32 or float16 (half the disk, ~3 significant digits)."""
    precision: str = "auto"
    device: str = "auto"
    overwrite: bool = False
    timeout_s: float = 1800.0
    """How long a rank waits at a barrier for the others (the slowest rank's whole share)."""
    progress: bool | None = None
    """Show a progress bar on rank 0; None = when stderr is a terminal."""
    unpad: bool = False
    """Run the encoder on the real tokens only (bertscale.parallelize.FastPaths.unpad): the same
    features without the work on padding."""

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"--pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise UserError(f"--format {self.output_format!r}: choose one of "
                            f"{', '.join(OUTPUT_FORMATS)}")
        if self.dtype not in ("float32", "float16"):
            raise UserError(f"--dtype {self.dtype!r}: choose float32 or float16")
        for flag, v in (("--batch-size", self.batch_size), ("--shard-size", self.shard_size),
                        ("--shard-mb", self.shard_mb)):
            if v <= 0:
                raise UserError(f"{flag} must be positive, got {v}")
        if self.input.field is not None and self.input.column is not None:
            raise UserError("--field (JSON lines) and --column (TSV) cannot both be given")
        if self.input.skip_header and self.input.column is None:
            raise UserError("--skip-header is for TSV input (--column)")
        if not self.input.path.is_file():
            raise UserError(f"{self.input.path}: input file not found")
        out = Path(self.output_dir)
        if out.exists() and not self.overwrite:
            raise UserError(f"{out}: already exists; choose a new folder or pass --overwrite")
        if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise UserError(f"{out}: exists and holds files that are not a `bertscale embed` "
                            f"output; --overwrite only replaces an earlier embed output")


class _Group:
    """Barriers across the ranks of a multi-process run (a gloo group); no-ops alone."""

    def __init__(self, timeout_s: float):
        from bertscale.distributed import discover
        self.env = discover()
        self.active = self.env.world_size > 1
        if self.active:
            from bertscale.distributed import init_torch
            init_torch(self.env, "gloo", timeout_s)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.active:
            from bertscale.distributed import shutdown
            shutdown()


def run(a: EmbedConfig) -> dict[str, Any]:
    """Embed `a.input` into `a.output_dir`; returns the manifest (rank 0) or this rank's part."""
    from bertscale.pretrained import load_checkpoint  # torch: only when a run starts
    t0 = time.perf_counter()
    a.validate()
    group = _Group(a.timeout_s)
    rank, world = group.env.rank, group.env.world_size
    out = Path(a.output_dir)
    partial = out.parent / f".{out.name}.partial"
    try:
        pretrained = load_checkpoint(a.checkpoint)
        ex = FeatureExtractor(pretrained, a.layers, a.layer_weights, a.max_seq_length,
                              _device(a.device, group.env.local_rank), a.precision,
                              unpad=a.unpad)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        group.barrier()
        part = _embed_share(a, ex, partial, rank, world)
        group.barrier()
        manifest = part
        if rank == 0:
            manifest = _manifest(a, ex, pretrained, partial, world, time.perf_counter() - t0)
            # --overwrite (checked in validate): the old folder goes only once the new is whole.
            publish_dir(partial, out, replace=True)
            _say_done(manifest, a, ex, out, world)
        group.barrier()
        return manifest
    except BaseException:
        # Whichever rank fails removes the partial folder: nothing half-written stays, and the
        # other ranks fail at their next write instead of waiting at a barrier.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        group.close()


def _device(device: str, local_rank: int) -> str:
    if device != "auto":
        return device
    import torch
    # Modulo: several processes may share a GPU (tokenizing is CPU work they overlap).
    return (f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available()
            else "cpu")


def _embed_share(a: EmbedConfig, ex: FeatureExtractor, partial: Path, rank: int,
                 world: int) -> dict[str, Any]:
    """This rank's records -> its shards in `partial`; its part of the manifest, also written
    there (part-r<rank>.json) for rank 0 to merge."""
    per_word = a.pooling == "first-subtoken"
    writer = ShardWriter(partial, rank, a.output_format, a.shard_size, np.dtype(a.dtype),
                         per_word, ex.dim, a.shard_mb << 20)
    show = a.progress if a.progress is not None else sys.stderr.isatty()
    bar = None
    if rank == 0 and show:
        from tqdm import tqdm
        bar = tqdm(total=a.input.path.stat().st_size, unit="B", unit_scale=True,
                   desc=f"embed {a.input.path.name}", file=sys.stderr)
    records = truncated = 0
    for batch in batched(read_records(a.input, per_word, rank, world, bar), a.batch_size):
        ids = [i for i, _ in batch]
        items = [r for _, r in batch]  # word lists per word, texts otherwise (read_records)
        if per_word:
            vecs, cut = ex.embed_words(cast("list[list[str]]", items))
        else:
            arr, cut = ex.embed_texts(cast("list[str]", items), a.pooling)
            vecs = list(arr)
        writer.add(ids, vecs)
        records += len(ids)
        truncated += cut
    if bar is not None:
        bar.close()
    part = {"rank": rank, "records": records, "truncated": truncated, "shards": writer.close()}
    write_atomic(partial / f"part-r{rank:05d}.json",
                 lambda p: p.write_text(json.dumps(part), encoding="utf-8"))
    return part


def _manifest(a: EmbedConfig, ex: FeatureExtractor, pretrained: Any, partial: Path, world: int,
              seconds: float) -> dict[str, Any]:
    """Rank 0: the ranks' parts merged into the folder's manifest (written into `partial`)."""
    parts = [json.loads((partial / f"part-r{r:05d}.json").read_text(encoding="utf-8"))
             for r in range(world)]
    sel = ex.selection
    manifest = {
        "format": "bertscale-features", "format_version": FORMAT_VERSION,
        "checkpoint": pretrained.source, "checkpoint_kind": pretrained.kind,
        "model": {"hidden_size": pretrained.config.hidden_size,
                  "num_hidden_layers": pretrained.config.num_hidden_layers},
        "lowercase": pretrained.lowercase,
        "layers": a.layers, "layer_indices": list(sel.indices), "layer_mode": sel.mode,
        "layer_weights": list(sel.weights) if sel.weights else None,
        "pooling": a.pooling, "dim": ex.dim, "dtype": a.dtype,
        "output_format": a.output_format, "max_seq_length": ex.max_seq_length,
        "input": {"path": str(a.input.path), "kind": a.input.kind,
                  "field": a.input.field, "column": a.input.column},
        "ids": "0-based line numbers of the input file",
        "world_size": world,
        "records": sum(p["records"] for p in parts),
        "truncated": sum(p["truncated"] for p in parts),
        "shards": [s for p in parts for s in p["shards"]],
        "seconds": seconds,
    }
    write_atomic(partial / MANIFEST, lambda p: p.write_text(
        json.dumps(manifest, indent=2) + "\n", encoding="utf-8"))
    for r in range(world):
        (partial / f"part-r{r:05d}.json").unlink()
    return manifest


def _say_done(manifest: dict[str, Any], a: EmbedConfig, ex: FeatureExtractor, out: Path,
              world: int) -> None:
    rate = manifest["records"] / max(manifest["seconds"], 1e-9)
    print(f"embed: {manifest['records']} records -> {out} ({ex.dim} dims, {a.layers}, "
          f"{a.pooling}, {world} process{'es' if world > 1 else ''}, "
          f"{manifest['seconds']:.1f} s, {rate:.1f} records/s"
          + (f"; {manifest['truncated']} cut to {ex.max_seq_length} word pieces"
             if manifest["truncated"] else "") + ")", flush=True)
