"""The records `bertscale embed` reads: plain text (a record per line), JSON lines (a string or a
word list in one field) or a TSV column; `.gz` read as is, streamed, every line checked on every
rank. A record's id is its 0-based line number, so features join back to the input."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from bertscale.errors import UserError

T = TypeVar("T")


class ByteProgress(Protocol):
    """What `read_records` reports its progress to (a tqdm bar counting bytes)."""

    def update(self, n: int) -> Any: ...


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
                 progress: ByteProgress | None = None) -> Iterator[tuple[int, str | list[str]]]:
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


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last one shorter)."""
    batch: list[T] = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
