"""`bertscale demo`: the whole pipeline on any machine, with no data and no network (bertscale.demo
says what each step does)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertscale.commands.args import Subparsers


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on Python's own documentation, in minutes, offline",
        description="Build a corpus from the documentation that ships with Python, train a "
                    "WordPiece vocabulary, write shards, pretrain a tiny BERT with DeepSpeed "
                    "ZeRO-2 on local processes, and report what it learned.")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                   help="the demo's folder: data, vocabulary, and one run folder per demo (run, "
                        "run-2, ...: earlier runs are kept) (default: runs/demo)")
    p.add_argument("--shards", type=Path, help="train on these shards (a manifest) instead")
    p.add_argument("--preset", help="model preset (tiny, mini, small, medium, base, large)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--nproc", type=int, help="local processes (default: 2 on CPU, one per GPU)")
    p.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary to train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a field of the demo recipe (repeatable)")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from bertscale.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(run_dir=args.run_dir, shards=args.shards, preset=args.preset,
                               steps=args.steps, nproc=args.nproc, vocab_size=args.vocab_size,
                               overrides=list(args.overrides)))


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.demo ...`."""
    from bertscale.commands import run_subcommand
    return run_subcommand("demo", argv)


if __name__ == "__main__":
    sys.exit(main())
