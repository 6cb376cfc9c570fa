"""The subcommands by name, and running one of them with the command line's error handling.

This module sits below every command: it names their modules as strings and imports one only
when it runs, so a command module can use `run_subcommand` for its own `python -m` entry point
without importing `bertscale.cli` (which would import every other command back) and `python -m
bertscale.pretrain` on each rank of a launcher pays only for the pretraining imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from bertscale.errors import UserError

# name -> module that registers it (`register(subparsers)` adds its parser and sets `func`).
# Order is the order of the pipeline, which `bertscale --help` lists.
COMMANDS: dict[str, str] = {
    "prepare": "bertscale.data.prepare",
    "pretrain": "bertscale.pretrain",
    "demo": "bertscale.demo",
    "finetune": "bertscale.commands.finetune",
    "embed": "bertscale.embed",
    "export": "bertscale.export",
    "doctor": "bertscale.doctor",
    "launch": "bertscale.launch",
    "bench": "bertscale.bench",
}


def register(name: str, subparsers: argparse._SubParsersAction) -> None:
    """Import the command's module (only now) and let it add its parser."""
    importlib.import_module(COMMANDS[name]).register(subparsers)


def run_subcommand(name: str, argv: list[str] | None = None) -> int:
    """`bertscale <name> ...` with only that command's module imported (each rank of a launcher
    pays for what it imports), and the same error handling as `bertscale`."""
    parser = argparse.ArgumentParser(prog="bertscale")
    register(name, parser.add_subparsers(dest="command", required=True))
    return run(parse(parser, [name, *(sys.argv[1:] if argv is None else argv)]))


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that an unknown argument is reported by the subcommand
    that was chosen (`bertscale pretrain --stepz` shows pretrain's usage): argparse's own
    check runs in the top parser, which knows only `bertscale COMMAND ...`."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen(parser, args).error(f"unrecognized arguments: {' '.join(_with_values(unknown, argv))}")
    return args


def _with_values(unknown: list[str], argv: list[str]) -> list[str]:
    """The unknown arguments, an unknown flag with the value written after it (`--epochz 1`),
    which argparse may have taken for an optional positional (finetune's RECIPE)."""
    out = []
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
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name not in (sub.choices if sub is not None else ()):
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


def parse_list(text: str, kind: type, flag: str) -> list[Any]:
    """A comma-separated flag value (`--lr 2e-5,3e-5`) as a list of `kind`, or one clear error."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma-separated list of "
                        f"{kind.__name__}s") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values
