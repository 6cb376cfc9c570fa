"""What a training step is: one APPLIED optimizer update; and the policy around the update.

DeepSpeed skips an update when the gradients overflow (bertscale.training.deepspeed_engine says
when). The trainer then counts a skip, not a step, so `train.steps`, warmup, decay, and the eval
and checkpoint cadences all count applied updates; the samples of the skipped step were consumed
all the same, so the data position (the loader's `consumed_samples`) moves on and a resume does
not read them again.

`Updater.apply` is that update; `Updater.stop_if_collapsed` its stop rule, which the loop applies
after the read that follows every skip (so a NaN/inf loss that caused the skips is named first):
`train.max_loss_scale_skips` skips in a row, or DeepSpeed's fp16 scaler giving up at its minimum
scale, stop the run (exit 3) without saving.
A CPU test drives the skip path through the real engine with `debug.overflow_at_steps`
(bertscale.pretraining.faults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bertscale.training.deepspeed_engine import DeepSpeedEngine
from bertscale.training.engine import Update
from bertscale.training.state import Skips
from bertscale.exitcodes import NONFINITE_EXIT_CODE
from bertscale.training.stop import StopTraining


class Updater:
    """The optimizer step (clipping, ZeRO update, LR schedule) and the skip policy."""

    def __init__(self, engine: DeepSpeedEngine, skips: Skips, *, max_skips_in_a_row: int,
                 info: Callable[[str], None]):
        self.engine, self.skips = engine, skips
        self.max_in_a_row = max_skips_in_a_row
        self.info = info

    def apply(self, step: int) -> Update:
        """Apply the update that would become step `step + 1`."""
        update = self.engine.update()
        self.skips.record(update.applied)
        return replace(update, collapsed=update.collapsed
                       or self.skips.in_a_row >= self.max_in_a_row)

    def stop_if_collapsed(self, step: int, update: Update) -> None:
        """After the skipped update that would have become step `step + 1`: StopTraining when
        the loss scale has collapsed. Every rank alike: DeepSpeed all-reduces the overflow."""
        if update.collapsed:
            self.info(f"error: step {step + 1}: {self.skips.in_a_row} optimizer updates in a row "
                      f"skipped for gradient overflow (loss scale {update.loss_scale}); stopping "
                      f"without saving")
            raise StopTraining(NONFINITE_EXIT_CODE)
