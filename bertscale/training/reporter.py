"""Rank 0's outputs of a training run: one-line messages that never break an open progress bar,
and the run's metric sinks (metrics.jsonl, W&B, TensorBoard: bertscale.reporting.MetricSinks).

Every record is written by rank 0 only; the other ranks' reporters do nothing. Every optional
sink fails soft: a warning, never a crashed or stalled job. Pretraining's reporter
(bertscale.pretraining.reporter) and fine-tuning's (bertscale.finetune.train) add their own lines
and progress display on top.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

from bertscale.reporting import MetricSinks


class Reporter:
    def __init__(self, sinks: MetricSinks, *, main: bool, stream: TextIO | None = None):
        self.sinks, self.main = sinks, main
        self.stream = stream or sys.stdout
        self.bar_open = False

    def warn(self, msg: str) -> None:
        if self.main:
            self._end_bar()
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def info(self, msg: str) -> None:
        if self.main:
            self._end_bar()
            print(msg, file=self.stream, flush=True)

    def _end_bar(self) -> None:
        """Close an open progress bar's line before a message."""
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False

    def record(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        self.sinks.record(kind, step, values)

    def rewind(self, step: int) -> None:
        """metrics.jsonl keeps one record per step: what an earlier run recorded past this
        start goes (all of it, -1, when the run starts over)."""
        self.sinks.rewind(step)

    def close(self) -> None:
        if not self.main:
            return
        self._end_bar()
        self.sinks.close()
