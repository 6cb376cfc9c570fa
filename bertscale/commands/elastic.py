"""`python -m bertscale.commands.elastic CHECKPOINT_DIR TAG`: convert a checkpoint to DeepSpeed's
universal format ahead of a resume on another number of GPUs (e.g. in a cheap CPU job before a
large GPU allocation); a resume converts by itself when it has to."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertscale.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertscale.commands.elastic",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", type=Path)
    p.add_argument("tag")
    args = p.parse_args(argv)
    from bertscale.training.checkpoint.universal import convert_to_universal
    try:
        print(convert_to_universal(args.checkpoint_dir, args.tag))
    except UserError as e:
        print(f"bertscale.elastic: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
