"""Fault injection for the tests of the failure paths (the recipe's `[debug]` section).

The step calls `DebugHooks` at two named points, `before_step` and `loss`; with `[debug]` empty
(every real run) both do nothing, so the step's code reads the same as without them.

`debug.overflow_at_steps` is the stand-in that lets a CPU test drive the skipped-update path
through the real engine (fp16 cannot run on a CPU): it makes one parameter's gradient inf for the
chosen steps, so that DeepSpeed's own overflow check skips the update. What it does not cover: the
fp16 loss scaler (halving the scale on overflow, hysteresis, raising it again after
`loss_scale_window` good steps) and the fp16 optimizers' own overflow check, which only a GPU
runs. `debug.nan_loss_at_step` turns rank 0's loss into NaN, for the non-finite stop end to end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OverflowInjector:
    """debug.overflow_at_steps: while the update that would become step N (1-based) is being
    computed, the gradient of one parameter is inf, once per time N is listed (so the retry,
    with the next batch, succeeds unless N is listed again). Empty: does nothing."""

    model: Any
    steps: list[int]
    _pending: Counter = field(init=False)
    _armed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._pending = Counter(self.steps)
        if self.steps:
            import torch

            param = next(p for p in self.model.parameters() if p.requires_grad)
            # A tensor hook runs before DeepSpeed's accumulation hooks see the gradient.
            param.register_hook(lambda g: torch.full_like(g, float("inf")) if self._armed else g)

    def arm(self, next_step: int) -> None:
        """Call before the micro-batches of the update that would become step `next_step`."""
        self._armed = self._pending[next_step] > 0
        if self._armed:
            self._pending[next_step] -= 1


class DebugHooks:
    """The `[debug]` faults, on rank 0 only (one rank's fault is what the agreement paths must
    spread to the others)."""

    def __init__(self, debug: Any, model: Any, *, active: bool):
        self.nan_loss_at_step = debug.nan_loss_at_step if active else 0
        self.overflow = OverflowInjector(model, debug.overflow_at_steps if active else [])

    def before_step(self, next_step: int) -> None:
        """Before the micro-batches of the update that would become step `next_step`."""
        self.overflow.arm(next_step)

    def loss(self, next_step: int, loss: Any) -> Any:
        """The loss a micro-batch of step `next_step` backpropagates."""
        if self.nan_loss_at_step == next_step:
            return loss * float("nan")
        return loss
