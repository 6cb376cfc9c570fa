"""Pretraining's all-reduced records (bertscale.training.stats: named fields, one float64
tensor, one all-reduce): a training step's statistics and an eval pass's sums.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertscale.training.stats import Reduced, StepRecord


@dataclass(frozen=True)
class StepStats(StepRecord):
    """One optimizer step, summed over its micro-batches and the ranks (the flags every rank
    decides on, StepRecord's, come first)."""

    loss: float = 0.0              # sum of the finite micro-batch losses (MLM + NSP)
    mlm_loss: float = 0.0
    nsp_loss: float = 0.0
    mlm_correct: float = 0.0
    mlm_count: float = 0.0         # masked tokens
    nsp_correct: float = 0.0
    nsp_count: float = 0.0         # sentence pairs (0: an MLM-only corpus)
    tokens: float = 0.0            # real (non-padding) tokens
    tokens_squared: float = 0.0    # sum of squared real lengths: the FLOP count's attention term


@dataclass(frozen=True)
class EvalStats(Reduced):
    """One pass over the eval samples, summed over the batches and the ranks: sums, not means,
    so the MLM loss is token-weighted and the counts exact."""

    mlm_loss: float = 0.0          # sum over masked tokens
    nsp_loss: float = 0.0          # sum over pairs
    mlm_correct: float = 0.0
    mlm_count: float = 0.0
    nsp_correct: float = 0.0
    nsp_count: float = 0.0
    samples: float = 0.0           # real samples (the void filler excluded)
    nsp_positive: float = 0.0      # pairs whose label is 1 (for the majority-class floor)

    def values(self) -> dict[str, float]:
        """The eval record as reported: means from the sums."""
        values = {"mlm_loss": self.mlm_loss / max(self.mlm_count, 1),
                  "mlm_acc": self.mlm_correct / max(self.mlm_count, 1),
                  "masked_tokens": self.mlm_count, "samples": self.samples}
        n = self.nsp_count
        if n:
            # The accuracy of always answering the commoner label: NSP's real floor, not 50%.
            values.update(nsp_loss=self.nsp_loss / n, nsp_acc=self.nsp_correct / n, pairs=n,
                          nsp_majority=max(self.nsp_positive, n - self.nsp_positive) / n)
        values["loss"] = values["mlm_loss"] + values.get("nsp_loss", 0.0)
        return values
