"""The loop's own counters, and the interface of every component that saves its own state.

A checkpoint's trainer state is laid out by component (bertscale.training.checkpoint.state):
each `Stateful` under its name ("train": these counters; "data": the loader's or sampler's
position; fine-tuning's "losses"), so a component restores exactly what it saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Stateful(Protocol):
    """A trainer component with a state of its own, saved with every checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Skips:
    """Skipped optimizer updates: in all (saved in checkpoints) and in a row (for the
    loss-scale collapse check)."""

    total: int = 0
    in_a_row: int = 0

    def record(self, applied: bool) -> None:
        self.total += 0 if applied else 1
        self.in_a_row = 0 if applied else self.in_a_row + 1


@dataclass
class TrainState:
    """The loop's counters: the step (applied optimizer updates) and the skipped updates. The
    data position is the loader's state, not this."""

    step: int = 0
    skips: Skips = field(default_factory=Skips)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skips.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        # In a row does not survive a resume: the run stopped on an applied step or a save.
        self.skips = Skips(total=int(state.get("skipped_steps", 0)))
