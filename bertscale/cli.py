"""`python -m bertscale.cli ...`: the `bertscale` command under the name launchers use
(`torchrun -m bertscale.cli`, `deepspeed --module bertscale.cli`); it lives in bertscale.commands."""

import sys

from bertscale.commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
