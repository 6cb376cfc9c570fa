"""`bertscale prepare`: raw text -> WebDataset shards + manifest, locally or into an object store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertscale.commands.args import Subparsers
from bertscale.data.instances import OBJECTIVES
from bertscale.data.prepare import (START_TIMEOUT_S, PrepareConfig, default_stage, detect_context,
                                    run_prepare, upload_prepared)
from bertscale.data.text import FORMATS
from bertscale.errors import UserError


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare", help="raw text -> WebDataset shards + manifest (NSP/SOP/MLM instances)",
        description="Turn raw text (BERT-format plain text, WikiExtractor output or JSON lines, "
                    "gzip/bzip2/xz ok; Parquet, Arrow files and datasets.save_to_disk folders) "
                    "into tar shards of training instances, one folder per sequence length. "
                    "Runs in parallel over --workers processes, and over ranks under mpirun/srun.")
    p.add_argument("inputs", nargs="+",
                   help="files, folders or glob patterns, local or in an object store "
                        "(s3://bucket/prefix/*.parquet, gs://…, az://…)")
    p.add_argument("--out", required=True,
                   help="output folder, or an object-store prefix (s3://bucket/prefix, gs://…, "
                        "az://…): shards are written to --stage, then uploaded")
    p.add_argument("--stage", type=Path,
                   help="with --out in an object store: the local (or shared, under MPI) folder "
                        "the shards are written to first (default: ./bertscale-stage/ followed "
                        "by the URL's scheme, bucket and prefix: one folder per output)")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--vocab", type=Path,
                   help="WordPiece vocab.txt to tokenize with, or a Hugging Face BERT folder "
                        "(its vocab.txt, and its casing from tokenizer_config.json): the "
                        "tokenizer of the checkpoint train.init_from will continue")
    v.add_argument("--train-vocab", type=int, metavar="SIZE",
                   help="train a WordPiece vocabulary of SIZE tokens from the inputs first")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                   help="uncased tokenization (default: guessed from the vocab)")
    c.add_argument("--cased", dest="lowercase", action="store_false",
                   help="cased tokenization (keep capitals)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[128], dest="seq_lens",
                   help="sequence lengths, e.g. 128 512 (default: 128)")
    p.add_argument("--objective", choices=OBJECTIVES, default="nsp",
                   help="nsp: sentence pairs with the paper's next-sentence label (50%% random "
                        "B); sop: ALBERT's sentence-order prediction; mlm: masked LM only, "
                        "one segment per sample (default: nsp)")
    p.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="share of samples cut to a random shorter length, so that the model "
                        "also sees short inputs, as Google's create_pretraining_data "
                        "(default: 0.1)")
    p.add_argument("--dupe-factor", type=int, default=1,
                   help="times each document is turned into samples, with different pairs "
                        "and cuts each time (default: 1, because masking is dynamic here: the "
                        "loader draws new masks every epoch; Google's create_pretraining_data "
                        "used 10 and NVIDIA's scripts 5, with static masks)")
    p.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="samples per tar shard (default: 10000)")
    p.add_argument("--eval-fraction", type=float, default=0.01,
                   help="share of documents held out for the eval split (default: 0.01)")
    p.add_argument("--seed", type=int, default=12345,
                   help="seeds the pairing, the cuts and the eval split; the same inputs and "
                        "seed give the same shards (default: 12345)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input format: bert (one sentence or paragraph per line, a blank "
                        "line between documents), wikiextractor (<doc> blocks), jsonl, parquet, "
                        "arrow (a row is a document); auto: from each file's first bytes or "
                        "first non-empty line (default: auto)")
    p.add_argument("--text-column", "--text-field", dest="text_field", default="text",
                   help="JSON lines, Parquet, Arrow: the field or column with the text; its "
                        "lines are the document's paragraphs (default: text)")
    p.add_argument("--doc-id-column", dest="id_field", metavar="COLUMN",
                   help="JSON lines, Parquet, Arrow: consecutive rows with the same value here "
                        "are one document (a corpus stored a paragraph or sentence per row); "
                        "default: every row is one document")
    p.add_argument("--no-split-sentences", dest="split_sentences", action="store_false",
                   help="inputs are one sentence per line already")
    p.add_argument("--docs-per-chunk", type=int, default=1000,
                   help="documents per unit of work (the unit resumed and shared out among "
                        "workers and ranks; default: 1000)")
    p.add_argument("--workers", type=int, default=1,
                   help="local processes (per MPI rank; default: 1)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep OUT/.work (spools and the plan) after success (default: removed)")
    p.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S, metavar="SECONDS",
                   help="under MPI: how long the ranks wait for each other at start, through a "
                        "file each writes in OUT, which must be on a filesystem all nodes share "
                        f"(default: {START_TIMEOUT_S:.0f})")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="a redrawn line with ETA on a terminal (bar), a line every 10 s (log), "
                        "or nothing; auto: bar on a terminal, else log (default: auto)")
    p.set_defaults(func=handle)
    return p


def handle(args: argparse.Namespace) -> int:
    """The prepare, then (rank 0) the upload of each folder to an object-store --out."""
    from bertscale.data import remote

    url = args.out if remote.is_remote(args.out) else None
    if url is not None and remote.scheme(url) in ("pipe", "http", "https"):
        raise UserError(f"--out {url}: prepare uploads to s3://, gs:// or az:// prefixes only")
    out = (args.stage or default_stage(url)) if url else Path(args.out)
    if url is not None:  # a missing store package or bucket fails now, not after the prepare
        remote.require_bucket(url, "--out")
    vocab, lowercase = _vocab_argument(args.vocab, args.lowercase)
    cfg = PrepareConfig(inputs=args.inputs, out=out, vocab=vocab,
                        lowercase=lowercase, train_vocab=args.train_vocab,
                        seq_lens=args.seq_lens, objective=args.objective,
                        short_seq_prob=args.short_seq_prob, dupe_factor=args.dupe_factor,
                        samples_per_shard=args.samples_per_shard, eval_fraction=args.eval_fraction,
                        seed=args.seed, format=args.format, text_field=args.text_field,
                        id_field=args.id_field,
                        split_sentences=args.split_sentences, docs_per_chunk=args.docs_per_chunk,
                        workers=args.workers, keep_work=args.keep_work, progress=args.progress,
                        start_timeout_s=args.start_timeout)
    ctx = detect_context()
    manifests = run_prepare(cfg, ctx)
    if url is not None and ctx.rank == 0:
        for L, manifest in manifests.items():
            upload_prepared(manifest, remote.join(url, f"seq{L}"), cfg.progress != "none")
    return 0


def _vocab_argument(vocab: Path | None, lowercase: bool | None) -> tuple[Path | None, bool | None]:
    """--vocab as given, or a Hugging Face folder's vocab.txt and casing (--lowercase / --cased
    still win)."""
    if vocab is None or not vocab.is_dir():
        return vocab, lowercase
    from bertscale.hf import tokenizer_of_folder
    path, folder_lowercase = tokenizer_of_folder(vocab)
    return path, folder_lowercase if lowercase is None else lowercase


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.prepare ...`: the command without the other commands' imports."""
    from bertscale.commands import run_subcommand
    return run_subcommand("prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
