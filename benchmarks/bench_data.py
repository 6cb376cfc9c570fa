"""Data benchmark: prepare MB/s per process beside the tokenizer alone, and loader samples/s.

    python benchmarks/bench_data.py [--files F ...] [--vocab V] [--seconds S]
    (the same as `bertscale bench data ...`)

Defaults to eight files of the real Wikipedia sample and Google's uncased vocab in
../shared/data (or $BERTSCALE_SHARED_DATA). bertscale/data/bench.py says what is measured.
"""

from __future__ import annotations

import sys

from bertscale.data.bench import bench_data, main

__all__ = ["bench_data", "main"]

if __name__ == "__main__":
    sys.exit(main())
