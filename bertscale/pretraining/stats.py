"""Statistics that every rank sums in ONE all-reduce: named fields, one float64 tensor.

A record class lists its fields once; `pack(device, name=value, ...)` lays values out in that
order (fields not named are zero), the caller sums packed tensors locally (no host sync per
micro-batch) and all-reduces the sum once, and `unpack` turns the reduced tensor back into the
record (`unpack_rows`: a stack of records, one per step, in one host copy). Nothing reads a
statistic by position, so a field added or reordered cannot shift the others.

Every field is a sum over ranks and micro-batches (means are taken after the reduction, from
sums and counts), hence float64: exact for counts up to 2**53.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

R = TypeVar("R", bound="Reduced")


class Reduced:
    """Base of the all-reduced records: float fields only, all sums."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def pack(cls, device: Any, **values: Any) -> Any:
        """A float64 tensor of the record's fields in order; unnamed fields are 0. Values may be
        0-dim tensors on `device` (kept there: no sync) or Python numbers."""
        import torch

        unknown = set(values) - set(cls.names())
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([_as_f64(values[n], device) if n in values else zero
                            for n in cls.names()])

    @classmethod
    def unpack(cls: type[R], reduced: Any) -> R:
        """The record of a reduced (F,) tensor. Reads it back to the host (a sync)."""
        return cls(**dict(zip(cls.names(), reduced.tolist(), strict=True)))

    @classmethod
    def unpack_rows(cls: type[R], reduced: Any) -> list[R]:
        """The records of a reduced (n, F) stack, in one host copy."""
        return [cls(**dict(zip(cls.names(), row, strict=True))) for row in reduced.tolist()]


def _as_f64(value: Any, device: Any) -> Any:
    import torch

    if torch.is_tensor(value):
        return value.to(torch.float64)
    # A fill on the device, not torch.tensor(x, device=...): that copies from the host and, on
    # CUDA, waits for the copy (a sync in the middle of the step).
    return torch.full((), float(value), dtype=torch.float64, device=device)


@dataclass(frozen=True)
class StepStats(Reduced):
    """One optimizer step, summed over its micro-batches and the ranks."""

    loss: float = 0.0              # sum of the finite micro-batch losses (MLM + NSP)
    mlm_loss: float = 0.0
    nsp_loss: float = 0.0
    mlm_correct: float = 0.0
    mlm_count: float = 0.0         # masked tokens
    nsp_correct: float = 0.0
    nsp_count: float = 0.0         # sentence pairs (0: an MLM-only corpus)
    tokens: float = 0.0            # real (non-padding) tokens
    tokens_squared: float = 0.0    # sum of squared real lengths: the FLOP count's attention term
    nonfinite: float = 0.0         # micro-batches whose loss was NaN/inf
    data_error: float = 0.0        # ranks that could not read this step's data (see agreement)
    preempted: float = 0.0         # ranks that had received a preemption signal by the read


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
