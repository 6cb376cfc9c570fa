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
    "bench": "bertscale.bench",
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
    return _run(args)


def run_subcommand(name: str, argv: list[str] | None = None) -> int:
    """`python -m bertscale.<module> ...`: one subcommand without importing the others (each
    rank of a launcher pays for what it imports), with the same error handling as `main`."""
    parser = argparse.ArgumentParser(prog="bertscale")
    importlib.import_module(COMMANDS[name]).register(
        parser.add_subparsers(dest="command", required=True))
    return _run(parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)]))


def _rank() -> str | None:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var) is not None:
            return os.environ[var]
    return None


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        # Name the failing rank when launched distributed; rank 0's message needs no prefix.
        rank = _rank()
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"bertscale {args.command}: error: {where}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"bertscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
