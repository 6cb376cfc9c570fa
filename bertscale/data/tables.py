"""Columnar inputs: Parquet files, Arrow IPC files and `datasets.save_to_disk` folders, read as
record batches with bounded memory.

What Hugging Face users hold: the Hub's datasets are Parquet (`data/train-00000-of-00041.parquet`,
`<config>/validation-00000-of-00001.parquet`); `datasets` caches and `save_to_disk` writes Arrow
IPC *stream* files (`data-00000-of-00003.arrow`) beside `dataset_info.json` and `state.json` (a
`DatasetDict` adds `dataset_dict.json` and one such folder per split). Both are read here
without the `datasets` package: only pyarrow, an optional extra (``pip install
'bertscale[parquet]'``) imported when a columnar file is met, so a missing pyarrow is one line.

Memory: a Parquet file is read one record batch at a time (pyarrow decodes one row group's
selected columns at a time), an Arrow file through a memory map; the columns not asked for are
never decoded. The kind of a file is taken from its first bytes, not its name.

`datasets` writes its features into the schema's metadata (key ``huggingface``): `features`
gives them, e.g. a ClassLabel column's label names, which the fine-tuning readers map by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bertscale.errors import UserError

PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the IPC continuation marker; never UTF-8 text
BATCH_ROWS = 1024
"""Rows per record batch read from Parquet (Arrow files keep the batches they were written with)."""


def pyarrow() -> Any:
    """The pyarrow module, or one line saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # the submodule: `import pyarrow` alone does not load it
    except ImportError:
        raise UserError("reading Parquet or Arrow files needs pyarrow: "
                        "pip install 'bertscale[parquet]'") from None
    return pa


def kind_of(head: bytes) -> str | None:
    """"parquet" | "arrow" from a file's first bytes, else None."""
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ARROW_FILE_MAGIC) or head.startswith(ARROW_STREAM_MAGIC):
        return "arrow"
    return None


def file_kind(path: str | Path) -> str | None:
    with open(path, "rb") as f:
        return kind_of(f.read(8))


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Reader:
    """One columnar file: its schema, and its record batches (selected columns only)."""

    def __init__(self, path: Path):
        pa = pyarrow()
        self.path, self.kind = path, file_kind(path)
        try:
            if self.kind == "parquet":
                self.pq = pa.parquet.ParquetFile(str(path), memory_map=True)
                self.schema = self.pq.schema_arrow
            elif self.kind == "arrow":
                self.source = pa.memory_map(str(path), "r")
                head = self.source.read(6)
                self.source.seek(0)
                self.ipc = (pa.ipc.open_file(self.source) if head == ARROW_FILE_MAGIC
                            else pa.ipc.open_stream(self.source))
                self.schema = self.ipc.schema
            else:
                raise UserError(f"{path}: neither a Parquet nor an Arrow file")
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: cannot read it as {self.kind or 'a table'} "
                            f"({_reason(e)})") from None

    def batches(self, columns: list[str]) -> Iterator[Any]:
        pa = pyarrow()
        try:
            if self.kind == "parquet":
                yield from self.pq.iter_batches(batch_size=BATCH_ROWS, columns=columns,
                                                use_threads=False)
            elif hasattr(self.ipc, "num_record_batches"):   # the Arrow file format
                for i in range(self.ipc.num_record_batches):
                    yield self.ipc.get_batch(i).select(columns)
            else:                                           # the Arrow stream format
                for batch in self.ipc:
                    yield batch.select(columns)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{self.path}: damaged or truncated {self.kind} file "
                            f"({_reason(e)})") from None


def schema(path: str | Path) -> Any:
    """The file's Arrow schema (its metadata holds `datasets`' features)."""
    return _Reader(Path(path)).schema


def features(schema: Any) -> dict[str, Any]:
    """`datasets`' features of each column from a schema's metadata ({} when absent)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        info = json.loads(meta)
    except ValueError:
        return {}
    feats = (info.get("info") or {}).get("features") or {}
    return feats if isinstance(feats, dict) else {}


def class_names(schema: Any, column: str) -> list[str] | None:
    """The label names of a ClassLabel column, in class-index order (None when not recorded)."""
    f = features(schema).get(column)
    if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list):
        return [str(n) for n in f["names"]]
    return None


def check_columns(path: str | Path, columns: list[str], hint: str = "") -> None:
    """One line naming the file and the columns it has, when one of `columns` is missing."""
    _check_columns(_Reader(Path(path)), columns, hint)


def _check_columns(reader: _Reader, columns: list[str], hint: str) -> None:
    have = list(reader.schema.names)
    missing = [c for c in columns if c not in have]
    if missing:
        raise UserError(f"{reader.path}: no column {', '.join(repr(m) for m in missing)} (it has: "
                        f"{', '.join(have)}){hint}")


def iter_rows(path: str | Path, columns: list[str], hint: str = "") -> Iterator[tuple[int, list[Any]]]:
    """(row number, [value per column]) of every row, as Python values, one batch at a time.
    A missing column names the file, the columns it has and `hint` (e.g. "; set --text-column")."""
    reader = _Reader(Path(path))
    _check_columns(reader, columns, hint)
    row = 0
    for batch in reader.batches(columns):
        values = [batch.column(i).to_pylist() for i in range(len(columns))]
        for i in range(batch.num_rows):
            yield row, [v[i] for v in values]
            row += 1


def read_rows(path: str | Path, columns: list[str], hint: str = "") -> list[dict[str, Any]]:
    """All rows of a (small) table as dicts of the named columns: fine-tuning sets."""
    return [dict(zip(columns, values)) for _, values in iter_rows(path, columns, hint)]


def column_names(path: str | Path) -> list[str]:
    return list(schema(path).names)


# ------------------------------------------------------------------ datasets.save_to_disk


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of one split of a Hugging Face dataset in `folder`, in row order: Parquet as
    the Hub lays it out (`train-00000-of-00002.parquet`, `data/train-*.parquet`, the converter's
    `train/0000.parquet` and older `glue-train.parquet`, or `train.parquet`), or the split's
    folder of a `DatasetDict.save_to_disk` (its Arrow files). [] when there is none."""
    if not folder.is_dir():
        return []
    sub = folder / split
    if sub.is_dir() and is_saved_dataset(sub):
        return saved_dataset_files(sub)
    for pattern in (f"{split}-*.parquet", f"data/{split}-*.parquet", f"{split}/*.parquet",
                    f"*-{split}.parquet", f"{split}.parquet"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def is_saved_dataset(folder: Path) -> bool:
    """A `Dataset.save_to_disk` folder (state.json + dataset_info.json + Arrow files)."""
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def is_saved_dataset_dict(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file()


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder, in the dataset's row order (state.json)."""
    state_file = folder / "state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{state_file}: not a datasets state file ({_reason(e)})") from None
    if state.get("_indices_data_files"):
        # save_to_disk flattens an indices mapping before writing; a folder that still has one
        # was written by other means and its row order is not the files' order.
        raise UserError(f"{state_file}: the dataset has an indices mapping; save it again with "
                        f"dataset.flatten_indices().save_to_disk(...)")
    files = [folder / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder}: state.json lists {', '.join(missing)}, which is missing")
    if not files:
        raise UserError(f"{folder}: the saved dataset has no data files")
    return files


def saved_dataset_splits(folder: Path) -> list[str]:
    """The split names of a `DatasetDict.save_to_disk` folder."""
    path = folder / "dataset_dict.json"
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a datasets dict file ({_reason(e)})") from None
    return [str(s) for s in splits]
