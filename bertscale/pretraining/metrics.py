"""The values of each train and skip record: losses and accuracies from the step's all-reduced
sums, and throughput, model FLOPs, TFLOP/s and MFU, computed here and nowhere else.

The step's own numbers (losses, accuracies, rate, gradient norm) are the record's step's. Time is
only known between reads (bertscale.training.agreement: the host does not wait for the device
at every step), so throughput, TFLOP/s, MFU and `step_time_s` are over the applied steps since the
previous read: their real tokens and model FLOPs over the read's wall time. With a read at every
step (`logging.every = 1`) that is the step itself.

Model FLOPs are bertscale.perf's one count (matmuls on the real tokens, attention over each
sequence's real length, the MLM head at the masked positions); MFU is TFLOP/s against the peak of
all W devices (`logging.peak_tflops`, else the CUDA device's datasheet peak; none on the CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bertscale.pretraining.stats import StepStats
from bertscale.training.engine import Update

if TYPE_CHECKING:
    import torch

    from bertscale.pretraining.plan import Plan
    from bertscale.training.deepspeed_engine import DeepSpeedEngine


class StepMetrics:
    def __init__(self, plan: Plan, device: torch.device):
        from bertscale import perf

        self.model_config = plan.model_config
        self.G = plan.recipe.train.global_batch_size
        self.W = plan.env.world_size
        self.micro_batches = self.W * plan.grad_accum  # per step, over all ranks: the loss divisor
        self.device = device
        self.precision = plan.precision
        self.peak = perf.mfu_peak(plan.recipe.logging.peak_tflops, device, plan.precision)

    def describe(self) -> str:
        """What MFU is measured against, for the start of the log."""
        if self.peak is None:
            return "MFU not reported: set logging.peak_tflops (no datasheet peak for this device)"
        return (f"MFU against {self.peak[0]:g} TFLOP/s per device ({self.peak[1]}, "
                f"{self.precision}); model FLOPs on real tokens (bertscale.perf)")

    def train(self, stats: StepStats, update: Update, *, window: list[StepStats],
              seconds: float, engine: DeepSpeedEngine, consumed_samples: int,
              skipped_steps: int) -> dict[str, float]:
        """The record of an applied step; `window`: the applied steps since the previous read
        (this one last), which took `seconds`."""
        from bertscale import perf

        n = self.micro_batches
        model_flops = sum(self._flops(s) for s in window)
        tflops = model_flops / seconds / 1e12
        values = {"loss": stats.loss / n, "mlm_loss": stats.mlm_loss / n,
                  "mlm_acc": stats.mlm_correct / max(stats.mlm_count, 1),
                  "lr": update.lr, "samples_per_s": self.G * len(window) / seconds,
                  "tokens_per_s": sum(s.tokens for s in window) / seconds,
                  "model_flops": self._flops(stats), "tflops": tflops,
                  "step_time_s": seconds / len(window), "window_steps": len(window),
                  "consumed_samples": consumed_samples, "skipped_steps": skipped_steps}
        if stats.nsp_count:
            values.update(nsp_loss=stats.nsp_loss / n, nsp_acc=stats.nsp_correct / stats.nsp_count)
        grad_norm = engine.grad_norm()  # the last update's: this step's
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        if self.peak is not None:
            values["mfu"] = tflops / (self.peak[0] * self.W)
        values.update(perf.peak_memory_gib(self.device))
        return values

    def _flops(self, stats: StepStats) -> float:
        from bertscale import perf

        return perf.step_flops_from_sums(
            self.model_config, self.G, int(stats.tokens), int(stats.tokens_squared),
            int(stats.mlm_count), nsp=stats.nsp_count > 0).train

    def skipped(self, stats: StepStats, update: Update, *, consumed_samples: int,
                skipped_steps: int) -> dict[str, float]:
        """The record of a skipped update (gradient overflow)."""
        return {"skipped_steps": skipped_steps, "consumed_samples": consumed_samples,
                "loss": stats.loss / self.micro_batches,
                **({"loss_scale": update.loss_scale} if update.loss_scale is not None else {})}
