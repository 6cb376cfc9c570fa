"""Progress of a prepare stage: a redrawn line on a terminal, a log line otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line bar on a terminal, a log line every `every` seconds otherwise."""

    def __init__(self, mode: str, total_units: int, prefix: str = "", every: float = 10.0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.prefix, self.every = mode, total_units, prefix, every
        self.t0 = self.last = time.monotonic()
        self.units = self.text_bytes = self.samples = 0

    def update(self, text_bytes: int = 0, samples: int = 0, units: int = 0) -> None:
        self.text_bytes += text_bytes
        self.samples += samples
        self.units += units
        now = time.monotonic()
        if self.mode == "bar" and now - self.last >= 0.2:
            self.last = now
            print(f"\r{self.prefix}{self.line()}", end="", file=sys.stderr, flush=True)
        elif self.mode == "log" and now - self.last >= self.every:
            self.last = now
            print(f"{self.prefix}{self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        from bertscale.reporting import hms
        dt = max(time.monotonic() - self.t0, 1e-9)
        text = (f"text {self.text_bytes / 1e6:,.1f} MB ({self.text_bytes / 1e6 / dt:,.2f} MB/s)  "
                if self.text_bytes else "")
        samples = f"samples {self.samples:,} ({self.samples / dt:,.0f}/s)  " if self.samples else ""
        # The ETA assumes the units left cost what the finished ones did on average.
        eta = dt / self.units * (self.total - self.units) if self.units else float("nan")
        tail = f"  ETA {hms(eta)}" if self.units < self.total else ""
        return f"{self.units}/{self.total} done  {text}{samples}{dt:,.1f} s{tail}"

    def done(self, what: str) -> None:
        if self.mode == "none":
            return
        lead = "\r" if self.mode == "bar" else ""
        print(f"{lead}{self.prefix}{what}: {self.line()}", file=sys.stderr, flush=True)
