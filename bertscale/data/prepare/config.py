"""The settings of one `prepare` run, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bertscale.data.instances import OBJECTIVES
from bertscale.data.shards import MAX_SAMPLES_PER_SHARD
from bertscale.data.text import FORMATS
from bertscale.errors import UserError

# How long the ranks of a prepare job wait for each other at start (a shared filesystem may
# show another node's new file seconds late; a rank may start late on a busy node).
START_TIMEOUT_S = 300.0


@dataclass
class PrepareConfig:
    inputs: list[str]
    """Files, folders or glob patterns of raw text (any of the supported formats)."""
    out: Path
    """Output folder; gets seq<L>/ per sequence length (shards, manifest.json, vocab.txt)."""
    vocab: Path | None = None
    """A Google-style vocab.txt; or None with `train_vocab`."""
    lowercase: bool | None = None
    """Lower-case (uncased) tokenization; None: guessed from the vocab (True when training)."""
    train_vocab: int | None = None
    """Train a WordPiece vocabulary of this size from the inputs first (written to out/vocab.txt)."""
    seq_lens: list[int] = field(default_factory=lambda: [128])
    """Sequence lengths to produce; the paper's two phases are 128 and 512."""
    objective: str = "nsp"
    """nsp (BERT) | sop (ALBERT sentence order) | mlm (packed, no pair objective)."""
    short_seq_prob: float = 0.1
    """Share of instances with a shorter random target length."""
    dupe_factor: int = 1
    """Times each chunk is turned into instances (different pairings). Google used 10 for static
    masking; with dynamic masking in the loader 1 is usual."""
    samples_per_shard: int = 10_000
    eval_fraction: float = 0.01
    """Share of documents held out for the eval split."""
    seed: int = 12345
    format: str = "auto"
    text_field: str = "text"
    """JSON lines, Parquet, Arrow: the field or column with the text."""
    id_field: str | None = None
    """JSON lines, Parquet, Arrow: consecutive rows with equal values here are one document
    (None: every row is a document)."""
    split_sentences: bool = True
    """Split lines into sentences; off when the input is already one sentence per line."""
    docs_per_chunk: int = 1000
    """Documents held in memory at once per process; also the pool the random B is drawn from."""
    workers: int = 1
    """Local processes (per MPI rank when under MPI)."""
    keep_work: bool = False
    """Keep the spool folder (out/.work) after success."""
    progress: str = "auto"
    """auto | bar | log | none."""
    start_timeout_s: float = START_TIMEOUT_S
    """Under MPI: how long the ranks wait for each other at start (MPIContext.wait_for_all_ranks)."""

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("no input files given")
        if (self.vocab is None) == (self.train_vocab is None):
            raise UserError("give exactly one of --vocab <vocab.txt> and --train-vocab <size>")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective {self.objective!r}: choose from {', '.join(OBJECTIVES)}")
        if not self.seq_lens or any(L < 8 or L > 65535 for L in self.seq_lens):
            raise UserError(f"--seq-len {self.seq_lens}: each must be in [8, 65535]")
        if len(set(self.seq_lens)) != len(self.seq_lens):
            raise UserError(f"--seq-len {self.seq_lens} repeats a length")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob {self.short_seq_prob} is not a probability")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        for flag, count in (("--dupe-factor", self.dupe_factor),
                            ("--docs-per-chunk", self.docs_per_chunk), ("--workers", self.workers)):
            if count < 1:
                raise UserError(f"{flag} {count} must be >= 1")
        if not 1 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise UserError(f"--samples-per-shard {self.samples_per_shard} must be in "
                            f"[1, {MAX_SAMPLES_PER_SHARD}]")
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r}: choose from {', '.join(FORMATS)}")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise UserError(f"--progress {self.progress!r}: choose auto, bar, log or none")
        if not self.start_timeout_s > 0:
            raise UserError(f"--start-timeout {self.start_timeout_s} must be > 0 seconds")
        if self.train_vocab is not None and self.train_vocab <= 5:
            raise UserError(f"--train-vocab {self.train_vocab} is too small")
