"""`python -m bertscale.elastic CHECKPOINT_DIR TAG`: convert a checkpoint to DeepSpeed's universal
form ahead of a resume on another number of ranks (e.g. in a cheap CPU job before a large GPU
allocation); a resume converts by itself otherwise (bertscale.training.checkpoint.universal)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bertscale.errors import UserError
    from bertscale.training.checkpoint.universal import convert_to_universal

    p = argparse.ArgumentParser(prog="python -m bertscale.elastic", description=__doc__)
    p.add_argument("checkpoint_dir", type=Path)
    p.add_argument("tag")
    args = p.parse_args(argv)
    try:
        print(convert_to_universal(args.checkpoint_dir, args.tag))
    except UserError as e:
        print(f"bertscale.elastic: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
