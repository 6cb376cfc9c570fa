"""The command layer: every `bertscale` command's arguments, handler and entry point.

`COMMANDS` names each command's module as a string; `bertscale NAME ...` imports only NAME's
module (each rank of a launcher pays only for what runs), `bertscale --help` imports them all to
list them. A command module exposes `register(subparsers)` (adds its parser, sets `func`) and
`main(argv)`; it turns arguments into the library's typed configs and calls the library, which
imports nothing from here (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bertscale import __version__
from bertscale.commands.args import Subparsers, parse_list
from bertscale.errors import UserError

# The fine-tuning command's list parser lives in args.py; kept importable from here as well.
__all__ = ["COMMANDS", "build_parser", "main", "parse_list", "run", "run_subcommand"]

# name -> module that registers it. Order is the order of the pipeline, which `bertscale --help`
# lists.
COMMANDS: dict[str, str] = {
    "prepare": "bertscale.commands.prepare",
    "pretrain": "bertscale.commands.pretrain",
    "demo": "bertscale.commands.demo",
    "finetune": "bertscale.commands.finetune",
    "embed": "bertscale.commands.embed",
    "export": "bertscale.commands.export",
    "doctor": "bertscale.commands.doctor",
    "launch": "bertscale.commands.launch",
    "bench": "bertscale.commands.bench",
}


def register(name: str, subparsers: Subparsers) -> None:
    """Import the command's module (only now) and let it add its parser."""
    importlib.import_module(COMMANDS[name]).register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every command registered (for `--help` and the docs check)."""
    parser = argparse.ArgumentParser(
        prog="bertscale",
        description="Pretrain BERT with DeepSpeed ZeRO, elastically, and fine-tune it.")
    parser.add_argument("--version", action="version", version=f"bertscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        register(name, sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `bertscale` console script and `python -m bertscale`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_subcommand(argv[0], argv[1:])
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(args)


def run_subcommand(name: str, argv: list[str] | None = None) -> int:
    """`bertscale <name> ...` with only that command's module imported, and the same error
    handling as `bertscale`."""
    parser = argparse.ArgumentParser(prog="bertscale")
    register(name, parser.add_subparsers(dest="command", required=True))
    return run(parse(parser, [name, *(sys.argv[1:] if argv is None else argv)]))


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that an unknown argument is reported by the subcommand
    that was chosen (`bertscale pretrain --stepz` shows pretrain's usage): argparse's own
    check runs in the top parser, which knows only `bertscale COMMAND ...`."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        shown = " ".join(_with_values(unknown, argv))
        chosen(parser, args).error(f"unrecognized arguments: {shown}")
    return args


def _with_values(unknown: list[str], argv: list[str]) -> list[str]:
    """The unknown arguments, an unknown flag with the value written after it (`--epochz 1`),
    which argparse may have taken for an optional positional (finetune's RECIPE)."""
    out: list[str] = []
    for u in unknown:
        out.append(u)
        i = argv.index(u) + 1 if u.startswith("-") and "=" not in u and u in argv else len(argv)
        if i < len(argv) and not argv[i].startswith("-") and argv[i] not in unknown:
            out.append(argv[i])
    return out


def chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)parser that `args` went through (`bertscale finetune glue`'s)."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        if sub is None:
            return parser
        name = getattr(args, sub.dest, None)
        if name is None or name not in sub.choices:
            return parser
        parser = sub.choices[name]


def run(args: argparse.Namespace) -> int:
    """Call the parsed command: a `UserError` becomes one line on stderr and its exit code."""
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
    except BrokenPipeError:  # `bertscale pretrain --list | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _rank() -> str | None:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var) is not None:
            return os.environ[var]
    return None
