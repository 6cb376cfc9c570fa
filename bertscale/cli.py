"""The `bertscale` command.

Each subcommand lives in its own module (listed by name in `bertscale.commands.COMMANDS`),
which exposes `register(subparsers)`; the module adds its parser and sets `func`. `bertscale
NAME ...` imports only NAME's module; `bertscale --help` (and a command line that names no known
command) imports them all to list them with their own help. Nothing imports this module: it is
the top of the import graph (`python -m bertscale` and the console script start here).
"""

from __future__ import annotations

import argparse
import sys

from bertscale import __version__
from bertscale.commands import COMMANDS, parse, register, run, run_subcommand


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every subcommand registered (for `--help` and the docs check)."""
    parser = argparse.ArgumentParser(
        prog="bertscale",
        description="Pretrain BERT with DeepSpeed ZeRO, elastically, and fine-tune it.")
    parser.add_argument("--version", action="version", version=f"bertscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        register(name, sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_subcommand(argv[0], argv[1:])
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
