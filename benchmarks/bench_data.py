"""Data benchmark: prepare MB/s per process beside the tokenizer alone, and loader samples/s.

    python benchmarks/bench_data.py [--files F ...] [--vocab V] [--seconds S]
    (the same as `bertscale bench data ...`)

Defaults to eight files of the real Wikipedia sample and Google's uncased vocab in
../shared/data (or $BERTSCALE_SHARED_DATA). bertscale/bench/data.py says what is measured.
"""

from __future__ import annotations

import sys

from bertscale.bench.data import bench_data
from bertscale.commands import main as bertscale

__all__ = ["bench_data", "main"]


def main(argv: list[str] | None = None) -> int:
    return bertscale(["bench", "data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
