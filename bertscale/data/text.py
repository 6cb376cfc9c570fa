"""Raw corpus readers and a sentence splitter.

Readers turn one input file into a stream of documents; a document is a list of paragraph
strings (one per input line). Five formats are read; the three text formats optionally gzip /
bzip2 / xz compressed (detected from the file's first bytes, not its name):

- ``bert``: the format of Google's ``create_pretraining_data.py``: one sentence or paragraph per
  line, a blank line between documents.
- ``wikiextractor``: ``<doc id=… title=…>`` … ``</doc>`` blocks. The first line of a block is the
  article title and is dropped (as NVIDIA's BERT data preparation does): a title alone is not a
  sentence of running text, and Wikipedia dumps hold many title-only stubs, which thus vanish.
  HTML entities some extractions leave in the text ("&amp;") are unescaped.
- ``jsonl``: one JSON object per line; its text field (``text`` by default) is one document whose
  paragraphs are its lines.
- ``parquet`` and ``arrow`` (Arrow IPC, as `datasets` caches and ``save_to_disk`` write it; see
  `bertscale.data.tables`): one row is one document, its text column split into paragraphs
  exactly as a JSON line's text field, so the same text gives the same documents in every
  format. A null text is an empty document (skipped).

With a document-id field / column (``--doc-id-column``), consecutive rows or lines with the same
id are one document, each row adding its paragraphs: for corpora stored a paragraph or a
sentence per row.

``auto`` picks the format from each file's first bytes (Parquet, Arrow) or its first non-empty
line.

Inputs (`expand_inputs`) are files, folders, glob patterns, and the same in an object store
(``s3://``, ``gs://``, ``az://``; `bertscale.data.remote`). A `datasets.save_to_disk` folder is
its Arrow files in the dataset's order; a folder holding Parquet files (a Hub snapshot) is its
Parquet files, without the README or other files beside them.

The sentence splitter is a single regular expression for candidate boundaries (``.``, ``!``,
``?``, ``…`` followed by optional closing quotes/brackets, whitespace, and an upper-case letter)
and a few rules that veto a candidate: known abbreviations that never end a sentence ("Dr.",
"St.", "No.", "vs.", "e.g."), single-letter initials ("George W. Bush"), and dotted acronyms
("U.S. Army"), which do end one when the next word is a frequent sentence opener ("… in the
U.S. The …"). Decimals never split because no whitespace follows their point. Limits: a
sentence that begins with a digit or a lower-case letter is not split off; an abbreviation outside
the list splits when a capitalised word follows it ("Blvd. North"). It runs at about 60 MB/s
(one core), some 15 times the tokenizer's speed, so it is not the bottleneck of `prepare`.
"""

from __future__ import annotations

import bz2
import glob
import html
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from bertscale.errors import UserError

FORMATS = ("auto", "bert", "wikiextractor", "jsonl", "parquet", "arrow")
TABLE_FORMATS = ("parquet", "arrow")

# Abbreviations after which a period never ends a sentence (case-sensitive: "No." yes, "no." is
# usually the word "no").
NEVER_END = frozenset("""
Mr Mrs Ms Mx Dr Prof Rev Hon Gov Gen Col Lt Capt Cpt Sgt Maj Adm Cmdr Cdr Brig Cpl Pvt Sen Rep
Pres Supt Insp Det Fr Msgr Mme Mlle Messrs St Ste Mt Ft No Nos Nr Vol Vols vol vols pp p Fig fig
Figs Eq Ref Refs Ch ch vs v cf viz ca c approx Op al Bros Dept Univ Assn Jl
""".split())

# Abbreviations that end a sentence only when the next word is a frequent sentence opener
# ("Martin Luther King Jr. Day" stays one; "… Frank Hamer Jr. By 2013 …" splits).
AMBIGUOUS_END = frozenset("Jr Sr Inc Ltd Co Corp Esq".split())

# Dotted lower-case abbreviations that never end a sentence.
NEVER_END_DOTTED = frozenset("e.g i.e viz cf a.k.a".split())

# Words that often open a sentence; used only to decide after an acronym, an initial or an
# ambiguous abbreviation, where a capitalised next word alone is not evidence enough.
STARTERS = frozenset("""
The A An In On At As After Before During He She It They We I You His Her Its Their Our This That
These Those There Here However But And Although While When Since Following According Despite
Today Some Many Most One Both Each By For From With Under Upon Later Also Then Thus Other Such
Two Three Four Five Several All No Not Only If Because Meanwhile Instead Further Furthermore
Moreover Additionally Currently Eventually Finally During Between Among Within Unlike Like Until
""".split())

_BOUNDARY = re.compile(
    r"([.!?\u2026]+)"                     # 1: terminator(s)
    r"([\"'\u201d\u2019\u00bb)\]]*)"      # 2: closing quotes / brackets
    r"\s+"
    r"(?=[\"'\u201c\u2018\u00ab(\[]*(\S+))"  # 3: next word (after opening punctuation)
)
_STRIP_OPEN = "\"'\u201c\u2018\u00ab(["
_STRIP_NEXT = ",;:\"'\u201d\u2019\u00bb)]"


def _first_alpha_upper(word: str) -> bool:
    ch = word[0]
    return ch.isupper() or ch.istitle()


def split_sentences(text: str) -> list[str]:
    """Split one paragraph into sentences (stripped, non-empty)."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        nxt = m.group(3)
        if not _first_alpha_upper(nxt):
            continue
        term, closer = m.group(1), m.group(2)
        if term == "." and not closer:
            ws = text.rfind(" ", start, m.start())
            prev = text[ws + 1:m.start()].lstrip(_STRIP_OPEN)
            if not prev or prev in NEVER_END:
                continue
            next_word = nxt.rstrip(_STRIP_NEXT)
            if len(prev) == 1 and prev.isalpha():
                # "George W. Bush" vs "… vitamin C. The …"
                if prev.isupper() and next_word not in STARTERS:
                    continue
            elif prev in AMBIGUOUS_END:
                if next_word not in STARTERS:
                    continue
            elif "." in prev:
                # Dotted acronym or abbreviation: "U.S.", "Ph.D.", "e.g.", "a.m.", "Amazon.com".
                if prev.lower() in NEVER_END_DOTTED or next_word not in STARTERS:
                    continue
        end = m.end(2)
        sentence = text[start:end].strip()
        if sentence:
            out.append(sentence)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


# ---------------------------------------------------------------------------------------------
# Files

def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (all files below, recursively) and glob patterns,
    local or in an object store (their URLs).

    A `datasets.save_to_disk` folder gives its Arrow files; a folder with Parquet files gives
    only those (the README.md and .gitattributes of a Hub snapshot are not text to train on).
    The result is sorted and de-duplicated, so the order (and therefore the shards `prepare`
    writes) does not depend on how the shell or the user listed the inputs."""
    from bertscale.data import remote

    files: set[str] = set()
    for pat in patterns:
        if remote.is_remote(pat):
            files.update(_expand_remote(pat))
            continue
        p = Path(pat)
        if p.is_dir():
            files.update(str(f) for f in _folder_files(p, pat))
        elif p.is_file():
            files.add(str(p))
        elif glob.has_magic(pat):
            found = [f for f in glob.glob(pat, recursive=True) if Path(f).is_file()]
            if not found:
                raise UserError(f"input pattern {pat!r} matches no files")
            files.update(found)
        else:
            raise UserError(f"input file {pat} not found")
    return sorted(files)


def _folder_files(p: Path, given: str) -> list[Path]:
    from bertscale.data import tables

    if tables.is_saved_dataset(p):
        return tables.saved_dataset_files(p)
    if tables.is_saved_dataset_dict(p):
        splits = tables.saved_dataset_splits(p)
        if len(splits) != 1:
            raise UserError(f"input {given} is a saved DatasetDict with splits "
                            f"{', '.join(splits)}: give the split's folder, e.g. "
                            f"{p / splits[0]}")
        return tables.saved_dataset_files(p / splits[0])
    found = [Path(root) / f for root, _, names in os.walk(p) for f in names
             if not f.startswith(".")]
    if not found:
        raise UserError(f"input directory {given} holds no files")
    parquet = [f for f in found if f.name.endswith(".parquet")]
    return parquet or found


def _expand_remote(pat: str) -> list[str]:
    """URLs of the objects a store URL names: one object, everything under a prefix, or a glob."""
    from bertscale.data import remote

    fs = remote.filesystem(pat)
    proto = remote.scheme(pat)
    try:
        if glob.has_magic(pat):
            found = [p for p in fs.glob(pat) if fs.isfile(p)]
            if not found:
                raise UserError(f"input pattern {pat!r} matches no objects")
        elif fs.isfile(pat):
            found = [pat]
        else:
            found = [p for p in fs.find(pat) if not Path(p).name.startswith(".")]
            if not found:
                raise UserError(f"input {pat}: no such object, and no objects under it")
            parquet = [f for f in found if f.endswith(".parquet")]
            found = parquet or found
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"input {pat}: {remote.reason(e)}") from None
    return [f if "://" in f else f"{proto}://{f}" for f in found]


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def compression_of(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed UTF-8 text file for reading."""
    kind = compression_of(path)
    raw: BinaryIO | gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile
    if kind == "gzip":
        raw = gzip.open(path, "rb")
    elif kind == "bzip2":
        raw = bz2.open(path, "rb")
    elif kind == "xz":
        raw = lzma.open(path, "rb")
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=None)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without newline); decoding or decompression problems name the file."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text near line {lineno + 1} ({e.reason})") from None
    except EOFError:
        raise UserError(f"{path}: compressed file is truncated (ends after line {lineno})") from None
    except (OSError, lzma.LZMAError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def detect_format(path: Path) -> str:
    from bertscale.data import tables

    kind = tables.file_kind(path)
    if kind is not None:
        return kind
    for _, line in _lines(path):
        s = line.strip()
        if not s:
            continue
        if s.startswith("<doc ") or s.startswith("<doc>"):
            return "wikiextractor"
        if s.startswith("{"):
            try:
                json.loads(s)
                return "jsonl"
            except json.JSONDecodeError:
                pass
        return "bert"
    return "bert"


def read_documents(path: str | Path, fmt: str = "auto", text_field: str = "text",
                   id_field: str | None = None) -> Iterator[list[str]]:
    """Stream the documents of one file; each document is its non-empty paragraphs.
    `text_field`: the JSON field or table column with the text; `id_field`: the one whose equal
    values on consecutive rows make one document (JSON lines and tables only)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown input format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "bert":
        yield from _read_bert(path)
    elif fmt == "wikiextractor":
        yield from _read_wikiextractor(path)
    elif fmt == "jsonl":
        yield from _group(_jsonl_rows(path, text_field, id_field), id_field is not None)
    else:
        yield from _group(_table_rows(path, fmt, text_field, id_field), id_field is not None)


def paragraphs(text: str) -> list[str]:
    """A JSON line's or a table row's text as paragraphs: its non-empty lines, stripped."""
    return [p.strip() for p in text.split("\n") if p.strip()]


def _group(rows: Iterator[tuple[Any, list[str]]], by_id: bool) -> Iterator[list[str]]:
    """Documents from (id, paragraphs) rows: one per row, or one per run of equal ids."""
    if not by_id:
        for _, paras in rows:
            if paras:
                yield paras
        return
    doc: list[str] = []
    current: Any = _NO_ID
    for key, paras in rows:
        if key != current:
            if doc:
                yield doc
            doc, current = [], key
        doc.extend(paras)
    if doc:
        yield doc


_NO_ID = object()


def _read_bert(path: Path) -> Iterator[list[str]]:
    doc: list[str] = []
    for _, line in _lines(path):
        s = line.strip()
        if s:
            doc.append(s)
        elif doc:
            yield doc
            doc = []
    if doc:
        yield doc


def _read_wikiextractor(path: Path) -> Iterator[list[str]]:
    doc: list[str] | None = None
    title_seen = False
    for lineno, line in _lines(path):
        s = line.strip()
        if s.startswith("<doc ") or s == "<doc>":
            if doc is not None:
                raise UserError(f"{path}:{lineno}: <doc> opened inside another document "
                                f"(missing </doc>)")
            doc, title_seen = [], False
        elif s == "</doc>":
            if doc is None:
                raise UserError(f"{path}:{lineno}: </doc> without a matching <doc>")
            if doc:
                yield doc
            doc = None
        elif doc is not None and s:
            if not title_seen:
                title_seen = True  # the article title: not running text
            else:
                # Some extractions leave HTML entities ("&amp;") in the text.
                doc.append(html.unescape(s) if "&" in s else s)
        elif s and doc is None:
            raise UserError(f"{path}:{lineno}: text outside a <doc> … </doc> block "
                            f"(is this really WikiExtractor output? try --format bert)")
    if doc is not None:
        raise UserError(f"{path}: ends inside a document (missing </doc>)")


def _jsonl_rows(path: Path, field: str, id_field: str | None) -> Iterator[tuple[Any, list[str]]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise UserError(f"{path}:{lineno}: JSON object has no field {field!r} "
                            f"(set --text-column)")
        text = obj[field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not text")
        key = None
        if id_field is not None:
            if id_field not in obj:
                raise UserError(f"{path}:{lineno}: JSON object has no field {id_field!r} "
                                f"(the --doc-id-column)")
            key = obj[id_field]
        yield key, paragraphs(text)


def _table_rows(path: Path, fmt: str, field: str,
                id_field: str | None) -> Iterator[tuple[Any, list[str]]]:
    from bertscale.data import tables

    kind = tables.file_kind(path)
    if kind != fmt:
        raise UserError(f"{path}: not {'a Parquet' if fmt == 'parquet' else 'an Arrow'} file "
                        f"(--format {fmt}); try --format auto")
    columns = [field] + ([id_field] if id_field is not None else [])
    hint = "; set --text-column" + (" / --doc-id-column" if id_field is not None else "")
    for row, values in tables.iter_rows(path, columns, hint):
        text = values[0]
        if text is None:
            yield (values[1] if id_field is not None else None), []
            continue
        if not isinstance(text, str):
            raise UserError(f"{path}: row {row}: column {field!r} holds {type(text).__name__}, "
                            f"not text (set --text-column)")
        yield (values[1] if id_field is not None else None), paragraphs(text)
