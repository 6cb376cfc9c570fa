"""What a training step is: one APPLIED optimizer update; and the policy around the update.

DeepSpeed skips an update when the gradients overflow (fp16 under dynamic loss scaling; also
bf16 and fp32 ZeRO-1/2, whose gradient-norm check treats an inf/NaN norm the same way): it zeroes
the gradients, leaves the weights and the LR schedule where they were, and `was_step_applied()`
is False. The trainer then counts a skip, not a step, so `train.steps`, warmup, decay, and the
eval and checkpoint cadences all count applied updates; the samples of the skipped step were
consumed all the same, so the data position (the loader's `consumed_samples`) moves on and a
resume does not read them again.

`Updater.apply` is that update; `Updater.stop_if_collapsed` its stop rule, which the loop applies
after the read that follows every skip (so a NaN/inf loss that caused the skips is named first):
`train.max_loss_scale_skips` skips in a row, or DeepSpeed's fp16 scaler giving up at its minimum
scale, stop the run (exit 3) without saving.
A CPU test drives the skip path through the real engine with `debug.overflow_at_steps`
(bertscale.pretraining.faults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class StopTraining(Exception):
    """A component's verdict that the run ends now with `exit_code`, after it has said why (on
    rank 0's terminal). Every rank reaches it at the same point: it is decided from all-reduced
    values only."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


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
    """The loop's own counters, saved and restored with every checkpoint. (The data position is
    the loader's state, not this.)"""

    step: int = 0
    skips: Skips = field(default_factory=Skips)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skips.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        # In a row does not survive a resume: the run stopped on an applied step or a save.
        self.skips = Skips(total=int(state.get("skipped_steps", 0)))


def loss_scale(engine: Any) -> float | None:
    """The fp16 loss scale DeepSpeed uses now (None without one: bf16, fp32)."""
    optimizer = getattr(engine, "optimizer", None)
    for name in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


@dataclass(frozen=True)
class Update:
    """What became of one optimizer update."""

    applied: bool
    lr: float                   # the rate this update used (or would have)
    loss_scale: float | None    # fp16 only
    collapsed: bool = False     # the skip rule says stop (Updater.stop_if_collapsed)


class Updater:
    """The optimizer step (clipping, ZeRO update, LR schedule) and the skip policy."""

    def __init__(self, engine: Any, scheduler: Any, skips: Skips, *, precision: str,
                 max_skips_in_a_row: int, info: Any):
        self.engine, self.scheduler, self.skips = engine, scheduler, skips
        self.fp16 = precision == "fp16"
        self.max_in_a_row = max_skips_in_a_row
        self.info = info

    def apply(self, step: int) -> Update:
        """Apply the update that would become step `step + 1`. DeepSpeed decides on the host
        whether it was applied (its overflow check reads the gradient norm back)."""
        lr = float(self.scheduler.get_last_lr()[0])  # read before the schedule steps
        collapsed = False
        try:
            self.engine.step()
        except Exception as e:
            # fp16: DeepSpeed's dynamic loss scaler raises (on every rank: overflow is
            # all-reduced) when an overflow happens at its minimum scale.
            if "loss scale already at minimum" not in str(e):
                raise
            collapsed = True
        applied = not collapsed and self.engine.was_step_applied()
        self.skips.record(applied)
        scale = loss_scale(self.engine) if self.fp16 else None
        return Update(applied, lr, scale, collapsed or self.skips.in_a_row >= self.max_in_a_row)

    def stop_if_collapsed(self, step: int, update: Update) -> None:
        """After the skipped update that would have become step `step + 1`: StopTraining when
        the loss scale has collapsed. Every rank alike: DeepSpeed all-reduces the overflow."""
        from bertscale import distributed

        if update.collapsed:
            self.info(f"error: step {step + 1}: {self.skips.in_a_row} optimizer updates in a row "
                      f"skipped for gradient overflow (loss scale {update.loss_scale}); stopping "
                      f"without saving")
            raise StopTraining(distributed.NONFINITE_EXIT_CODE)
