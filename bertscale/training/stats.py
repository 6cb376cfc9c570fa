"""Statistics that every rank sums in ONE all-reduce: named fields, one float64 tensor.

A record class lists its fields once; `pack(device, name=value, ...)` lays values out in that
order (fields not named are zero), the caller sums packed tensors locally (no host sync per
micro-batch) and all-reduces the sum once, and `unpack` turns the reduced tensor back into the
record (`unpack_rows`: a stack of records, one per step, in one host copy). Nothing reads a
statistic by position, so a field added or reordered cannot shift the others.

Every field is a sum over ranks and micro-batches (means are taken after the reduction, from
sums and counts), hence float64: exact for counts up to 2**53.

`StepRecord` is what the core's reads (bertscale.training.agreement.Reads) need of a step's
record: the flags every rank decides on together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

R = TypeVar("R", bound="Reduced")


class Reduced:
    """Base of the all-reduced records: float fields only, all sums."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def pack(cls, device: torch.device, **values: Any) -> torch.Tensor:
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
    def unpack(cls: type[R], reduced: torch.Tensor) -> R:
        """The record of a reduced (F,) tensor. Reads it back to the host (a sync)."""
        return cls(**dict(zip(cls.names(), reduced.tolist(), strict=True)))

    @classmethod
    def unpack_rows(cls: type[R], reduced: torch.Tensor) -> list[R]:
        """The records of a reduced (n, F) stack, in one host copy."""
        return [cls(**dict(zip(cls.names(), row, strict=True))) for row in reduced.tolist()]


def _as_f64(value: Any, device: torch.device) -> torch.Tensor:
    import torch

    if torch.is_tensor(value):
        return value.to(torch.float64)
    # A fill on the device, not torch.tensor(x, device=...): that copies from the host and, on
    # CUDA, waits for the copy (a sync in the middle of the step).
    return torch.full((), float(value), dtype=torch.float64, device=device)


@dataclass(frozen=True)
class StepRecord(Reduced):
    """The fields of a step's record that every rank decides on together at a read; a client's
    record (pretraining's StepStats, fine-tuning's) adds its own statistics after them."""

    nonfinite: float = 0.0         # micro-batches whose loss was NaN/inf
    data_error: float = 0.0        # ranks that could not read this step's data (see agreement)
    preempted: float = 0.0         # ranks that had received a preemption signal by the read
