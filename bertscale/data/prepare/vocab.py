"""`--train-vocab`: a WordPiece vocabulary trained from the inputs, numbered the same on every run."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from bertscale.data.prepare.config import PrepareConfig
from bertscale.data.prepare.inputs import local_input
from bertscale.data.prepare.progress import Progress
from bertscale.data.text import read_documents
from bertscale.files import write_text_atomic
from bertscale.tokenizer import SPECIAL_TOKENS, train_wordpiece


def train_vocabulary(files: list[str], cfg: PrepareConfig, work: Path, mode: str,
                     prefix: str) -> None:
    """Train `cfg.train_vocab` tokens into OUT/vocab.txt (skipped when it is there: it is
    written atomically, so present means complete)."""
    assert cfg.train_vocab is not None
    vocab_file = Path(cfg.out) / "vocab.txt"
    if vocab_file.is_file():
        return
    lower = True if cfg.lowercase is None else cfg.lowercase
    print(f"{prefix}prepare: training a {cfg.train_vocab}-token WordPiece vocabulary "
          f"(two reading passes over {len(files)} files, then the merges)", file=sys.stderr)
    raw = Path(cfg.out) / "vocab.trained.tmp"
    progress = Progress(mode, 2 * len(files), prefix=f"{prefix}vocabulary: ")
    train_wordpiece(lambda: _all_paragraphs(files, cfg, work, progress), raw, cfg.train_vocab,
                    lower)
    if mode != "none":
        progress.done("trained")
    _canonical_vocab(raw, vocab_file)


def _canonical_vocab(src: Path, dst: Path) -> None:
    """Special tokens first (ids 0-4, as trained), then the rest sorted.

    `tokenizers`' WordPiece trainer returns the same token set on every run but not the same
    order (hash-map iteration), so ids — and with them the shards — would differ between two
    runs on the same inputs. WordPiece matching depends on the set only, so sorting is safe."""
    tokens = [t for t in src.read_text(encoding="utf-8").split("\n") if t]
    special = [t for t in tokens if t in SPECIAL_TOKENS]
    rest = sorted(t for t in tokens if t not in SPECIAL_TOKENS)
    write_text_atomic(dst, "".join(t + "\n" for t in special + rest))
    src.unlink()


def _all_paragraphs(files: list[str], cfg: PrepareConfig, work: Path,
                    progress: Progress | None = None) -> Iterator[str]:
    for f in files:
        local, _, size = local_input(f, work)
        for doc in read_documents(local, cfg.format, cfg.text_field, cfg.id_field):
            yield from doc
        if local != Path(f):
            local.unlink()
        if progress is not None:
            progress.update(text_bytes=size, units=1)
