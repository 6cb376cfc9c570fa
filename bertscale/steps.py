"""What a training step is: one APPLIED optimizer update.

DeepSpeed skips an update when the gradients overflow (fp16 under dynamic loss scaling; also
bf16 and fp32 ZeRO-1/2, whose gradient-norm check treats an inf/NaN norm the same way): it zeroes
the gradients, leaves the weights and the LR schedule where they were, and `was_step_applied()`
is False. The trainer then counts a skip, not a step, so `train.steps`, warmup, decay, and the
eval and checkpoint cadences all count applied updates; the samples of the skipped step were
consumed all the same, so the data position (`consumed_samples`) moves on and a resume does not
read them again.

`OverflowInjector` is the stand-in that lets a CPU test drive that path through the real engine
(fp16 cannot run on a CPU): it makes one parameter's gradient inf for the chosen steps, so that
DeepSpeed's own overflow check skips the update. What it does not cover: the fp16 loss scaler
(halving the scale on overflow, hysteresis, raising it again after `loss_scale_window` good
steps) and the fp16 optimizers' own overflow check, which only a GPU runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Skips:
    """Skipped optimizer updates: in all (saved in checkpoints) and in a row (for the
    loss-scale collapse check)."""

    total: int = 0
    in_a_row: int = 0

    def record(self, applied: bool) -> None:
        self.total += 0 if applied else 1
        self.in_a_row = 0 if applied else self.in_a_row + 1


def loss_scale(engine: Any) -> float | None:
    """The fp16 loss scale DeepSpeed uses now (None without one: bf16, fp32)."""
    optimizer = getattr(engine, "optimizer", None)
    for name in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


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
