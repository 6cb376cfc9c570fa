"""`bertscale embed`: contextual features from a frozen BERT, the paper's feature-based approach
(Devlin et al. 2018, Section 5.3: features from the frozen model feed a task model; concatenating
the last four layers scored 96.1 CoNLL-2003 dev F1 against 96.4 for fine-tuning).

Input, read as a stream (memory holds one batch and one output shard, never the whole input):
plain text (one record per line), JSON lines (`--field NAME`: a string, or a list of words), or
TSV (`--column N` 0-based, or `--column NAME` with a header line); `.gz` files are read as is.
Blank lines are not records. A record's id is its 0-based line number in the input file, so
features join back to the input whatever was skipped.

Layers (`--layers`, the ablation of the paper's Table 7; hidden_states[0] is the embedding output):
  embeddings        hidden_states[0]
  last              the last layer
  second-to-last    the one before it
  sum-last-four     element-wise sum of the last four layers
  concat-last-four  [last, second-to-last, third-to-last, fourth-to-last] concatenated (4H wide)
  weighted-sum      sum over the L encoder layers of w_l * h_l; `--layer-weights` gives L weights,
                    uniform 1/L otherwise (the paper's "weighted sum of all 12 layers")
  N (an integer)    hidden_states[N]; negative counts from the last
Pooling (`--pooling`): `cls` (the [CLS] vector), `mean` (mean over the real tokens, [CLS] and
[SEP] included, padding excluded, as sentence-transformers pools), or `first-subtoken` (one vector
per word: the first word piece of each whitespace-separated word, or of each item of a JSON list
field, as the paper's NER tagger reads BERT).

Output folder:
  manifest.json   checkpoint, layers, pooling, dim, dtype, world size, counts, and the shards in
                  order; `iter_features(folder)` / `load_features(folder)` read it back in input
                  order
  shards          `--format npy`: features-r<rank>-<n>.npy (rows), .ids.npy (int64 ids) and,
                  per word, .offsets.npy (int64, records + 1: record i owns the rows
                  offsets[i]:offsets[i+1]); `safetensors`: one file per shard holding the same
                  arrays as tensors features / ids / offsets; `wds`: a WebDataset tar, one
                  sample per record, key = the id as 12 digits, member `<key>.features.npy`.
Within a shard records are in increasing id order. A shard closes at --shard-size records or
--shard-mb of features, whichever comes first.

Several processes or GPUs (torchrun, the deepspeed launcher, mpirun, srun: the discovery of
`bertscale.distributed`): rank r of W embeds records r, r+W, r+2W, ... (by record number) on
cuda:<local rank mod GPUs> (or the CPU) and writes its own shards. A gloo process group is used
for three barriers only. Everything is written into the hidden sibling `.<name>.partial`, which
rank 0 renames into place once every rank is done: the output folder is complete or absent.

Limits, stated honestly:
- Every rank reads and validates every input line and embeds only its own: parsing is cheap next
  to the model, and a bad line then stops every rank with the same message instead of leaving the
  others waiting at a barrier. An error on one rank only (out of memory) leaves the others at a
  barrier until the launcher stops them or `--timeout` passes.
- Sequences longer than --max-seq-length are cut (counted in the manifest as `truncated`): per
  word, the words whose first word piece falls past the cut get no vector, so a record can have
  fewer vectors than words (its offsets say how many).
- A word the tokenizer turns into nothing (control or zero-width characters only) is read as [UNK].
- Batches are formed in input order, without length bucketing: mixed lengths cost padding time.
- An interrupted run is not resumed; its partial folder is removed by the next run.
- bf16 / fp16 autocast on a GPU (`--precision auto`); features are combined and stored from fp32.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import io
import json
import shutil
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bertscale.errors import UserError
from bertscale.features import LAYER_NAMES, FeatureExtractor
from bertscale.files import publish_dir, write_atomic

FORMAT_VERSION = 1
POOLINGS = ("cls", "mean", "first-subtoken")
OUTPUT_FORMATS = ("npy", "safetensors", "wds")
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------ input


@dataclass
class InputSpec:
    """Where records come from and how a line becomes a record."""

    path: Path
    field: str | None = None
    """JSON lines: the key holding the text (a string) or the words (a list of strings)."""
    column: str | None = None
    """TSV: a 0-based column index, or a column name found in the first (header) line."""
    skip_header: bool = False
    """TSV with a numeric --column: the first line is a header, not a record."""

    @property
    def kind(self) -> str:
        return "jsonl" if self.field is not None else "tsv" if self.column is not None else "text"


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream to read lines from, the raw file for progress by bytes)."""
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an input file") from None
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw), raw  # type: ignore[return-value]
    return raw, raw


def read_records(spec: InputSpec, words: bool, rank: int = 0, world_size: int = 1,
                 progress: Any = None) -> Iterator[tuple[int, str | list[str]]]:
    """(id, text or word list) for the records of this rank: record k (counting records, not
    lines) belongs to rank k % world_size. Every line is decoded and checked on every rank."""
    stream, raw = _open_binary(spec.path)
    col: int | None = None
    if spec.column is not None and spec.column.lstrip("-").isdigit():
        col = int(spec.column)
        if col < 0:
            raise UserError(f"--column {col}: column indices start at 0")
    header_line = spec.column is not None and (col is None or spec.skip_header)
    k = 0
    last_pos = 0
    with stream, raw:
        try:
            for n, bline in enumerate(stream):
                try:
                    line = bline.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise UserError(f"{spec.path}:{n + 1}: not UTF-8 text ({e.reason})") from None
                if progress is not None and n % 256 == 0:
                    pos = raw.tell()
                    progress.update(pos - last_pos)
                    last_pos = pos
                if n == 0 and header_line:
                    if col is None:
                        names = line.split("\t")
                        if spec.column not in names:
                            raise UserError(f"{spec.path}:1: header has no column "
                                            f"{spec.column!r} (it has: {', '.join(names)})")
                        col = names.index(spec.column)
                    continue
                if not line.strip():
                    continue
                record = _parse_line(spec, line, n, col, words)
                if k % world_size == rank:
                    yield n, record
                k += 1
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz among them
            raise UserError(f"{spec.path}: cannot read the input ({e})") from None
    if progress is not None:
        progress.update(max(0, spec.path.stat().st_size - last_pos))


def _parse_line(spec: InputSpec, line: str, n: int, col: int | None, words: bool
                ) -> str | list[str]:
    where = f"{spec.path}:{n + 1}"
    if spec.field is not None:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if spec.field not in obj:
            raise UserError(f"{where}: no field {spec.field!r} (it has: "
                            f"{', '.join(map(str, obj)) or 'nothing'})")
        value = obj[spec.field]
        if isinstance(value, list) and all(isinstance(w, str) for w in value):
            if any(not w.strip() for w in value):
                raise UserError(f"{where}: field {spec.field!r} holds an empty word")
            return value if words else " ".join(value)
        if not isinstance(value, str):
            raise UserError(f"{where}: field {spec.field!r} must be a string or a list of "
                            f"strings, got {type(value).__name__}")
        text = value
    elif col is not None:
        cells = line.split("\t")
        if col >= len(cells):
            raise UserError(f"{where}: {len(cells)} tab-separated columns, --column "
                            f"{spec.column} needs at least {col + 1}")
        text = cells[col]
    else:
        text = line
    return text.split() if words else text


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------------- output


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
                write_atomic(self.folder / name, lambda p, x=arrays[key]: _write_npy(p, x))
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


# --------------------------------------------------------------------------- the subcommand


@dataclass
class EmbedArgs:
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


def _validate(a: EmbedArgs) -> None:
    if a.pooling not in POOLINGS:
        raise UserError(f"--pooling {a.pooling!r}: choose one of {', '.join(POOLINGS)}")
    if a.output_format not in OUTPUT_FORMATS:
        raise UserError(f"--format {a.output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if a.dtype not in ("float32", "float16"):
        raise UserError(f"--dtype {a.dtype!r}: choose float32 or float16")
    for flag, v in (("--batch-size", a.batch_size), ("--shard-size", a.shard_size),
                    ("--shard-mb", a.shard_mb)):
        if v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if a.input.field is not None and a.input.column is not None:
        raise UserError("--field (JSON lines) and --column (TSV) cannot both be given")
    if a.input.skip_header and a.input.column is None:
        raise UserError("--skip-header is for TSV input (--column)")
    if not a.input.path.is_file():
        raise UserError(f"{a.input.path}: input file not found")
    out = Path(a.output_dir)
    if out.exists() and not a.overwrite:
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
            import torch.distributed as dist
            dist.destroy_process_group()


def run(a: EmbedArgs) -> dict[str, Any]:
    """Embed `a.input` into `a.output_dir` (see the module doc); returns the manifest (rank 0)
    or this rank's part."""
    from bertscale.pretrained import load_checkpoint  # torch: only when a run starts
    t0 = time.perf_counter()
    _validate(a)
    group = _Group(a.timeout_s)
    rank, world = group.env.rank, group.env.world_size
    out = Path(a.output_dir)
    partial = out.parent / f".{out.name}.partial"
    try:
        device = a.device
        if device == "auto":
            import torch
            # Modulo: several processes may share a GPU (tokenizing is CPU work they overlap).
            device = (f"cuda:{group.env.local_rank % torch.cuda.device_count()}"
                      if torch.cuda.is_available() else "cpu")
        pretrained = load_checkpoint(a.checkpoint)
        ex = FeatureExtractor(pretrained, a.layers, a.layer_weights, a.max_seq_length,
                              device, a.precision, unpad=a.unpad)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        group.barrier()

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
            items = [r for _, r in batch]
            if per_word:
                vecs, cut = ex.embed_words(items)  # type: ignore[arg-type]
            else:
                arr, cut = ex.embed_texts(items, a.pooling)  # type: ignore[arg-type]
                vecs = list(arr)
            writer.add(ids, vecs)
            records += len(ids)
            truncated += cut
        if bar is not None:
            bar.close()
        part = {"rank": rank, "records": records, "truncated": truncated,
                "shards": writer.close()}
        write_atomic(partial / f"part-r{rank:05d}.json",
                     lambda p: p.write_text(json.dumps(part), encoding="utf-8"))
        group.barrier()

        manifest: dict[str, Any] = part
        if rank == 0:
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
                "seconds": time.perf_counter() - t0,
            }
            write_atomic(partial / MANIFEST, lambda p: p.write_text(
                json.dumps(manifest, indent=2) + "\n", encoding="utf-8"))
            for r in range(world):
                (partial / f"part-r{r:05d}.json").unlink()
            # --overwrite (checked in _validate): the old folder goes only once the new is whole.
            publish_dir(partial, out, replace=True)
            rate = manifest["records"] / max(manifest["seconds"], 1e-9)
            print(f"embed: {manifest['records']} records -> {out} ({ex.dim} dims, {a.layers}, "
                  f"{a.pooling}, {world} process{'es' if world > 1 else ''}, "
                  f"{manifest['seconds']:.1f} s, {rate:.1f} records/s"
                  + (f"; {manifest['truncated']} cut to {ex.max_seq_length} word pieces"
                     if manifest["truncated"] else "") + ")", flush=True)
        group.barrier()
        return manifest
    except BaseException:
        # Whichever rank fails removes the partial folder: nothing half-written stays, and the
        # other ranks fail at their next write instead of waiting at a barrier.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        group.close()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed", help="contextual features from a frozen BERT (the feature-based approach)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a Hugging Face BERT folder or a bertscale run / checkpoint folder")
    p.add_argument("--input", type=Path, required=True,
                   help="text (a record per line), JSON lines (--field) or TSV (--column); .gz ok")
    p.add_argument("--output-dir", type=Path, required=True, help="the features folder to create")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--field", help="JSON lines: the key holding the text or the word list")
    src.add_argument("--column", help="TSV: 0-based column index, or a header column name")
    p.add_argument("--skip-header", action="store_true",
                   help="TSV with a numeric --column: the first line is a header")
    p.add_argument("--layers", default="last",
                   help=f"{', '.join(LAYER_NAMES)}, or a hidden-state index (default: last)")
    p.add_argument("--layer-weights", help="weighted-sum: one comma-separated weight per layer")
    p.add_argument("--pooling", default="cls", choices=POOLINGS)
    p.add_argument("--max-seq-length", type=int,
                   help="word pieces per sequence (default: min(512, the model's maximum))")
    p.add_argument("--batch-size", type=int, default=64, help="records per forward pass")
    p.add_argument("--shard-size", type=int, default=100_000, help="records per output shard")
    p.add_argument("--shard-mb", type=int, default=1024,
                   help="also start a new shard once one holds this many MiB of features")
    p.add_argument("--format", dest="output_format", default="npy", choices=OUTPUT_FORMATS)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on a GPU that has it, fp32 on the CPU")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:<local rank> when there is a GPU), cpu, cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (once the new one is complete)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a rank waits for the others at a barrier")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    p.add_argument("--unpad", action="store_true",
                   help="fast path: run the encoder on the real tokens only (same features)")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    weights = None
    if args.layer_weights:
        from bertscale.commands import parse_list
        weights = parse_list(args.layer_weights, float, "--layer-weights")
    run(EmbedArgs(
        checkpoint=args.checkpoint,
        input=InputSpec(args.input, args.field, args.column, args.skip_header),
        output_dir=args.output_dir, layers=args.layers, layer_weights=weights,
        pooling=args.pooling, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
        shard_size=args.shard_size, shard_mb=args.shard_mb, output_format=args.output_format,
        dtype=args.dtype,
        precision=args.precision, device=args.device, overwrite=args.overwrite,
        timeout_s=args.timeout, progress=args.progress, unpad=args.unpad))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.embed ...`: the same command, without importing the other subcommands."""
    from bertscale.commands import run_subcommand
    return run_subcommand("embed", argv)


if __name__ == "__main__":
    sys.exit(main())
