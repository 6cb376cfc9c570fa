"""The `bertscale` command.

Each subcommand lives in its own module, which exposes `register(subparsers)`; the module adds
its parser and sets `func`. Only subcommands that work are listed in COMMANDS, so
`bertscale --help` shows exactly what can be run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bertscale import __version__
from bertscale.errors import UserError

# name -> module that registers it. Order is the order of the pipeline.
COMMANDS: dict[str, str] = {
    "prepare": "bertscale.data.prepare",
    "pretrain": "bertscale.pretrain",
    "demo": "bertscale.demo",
    "finetune": "bertscale.finetune.cli",
    "embed": "bertscale.embed",
    "export": "bertscale.export",
    "doctor": "bertscale.doctor",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertscale",
        description="Pretrain BERT with DeepSpeed ZeRO, elastically, and fine-tune it.")
    parser.add_argument("--version", action="version", version=f"bertscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        # Prefix with the rank when launched distributed, so the failing rank is named.
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"bertscale {args.command}: error: {where}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"bertscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
