"""Which torch device and autocast dtype a process computes in (fine-tuning, `embed`, benchmarks),
from the `--device` and `--precision` flags."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bertscale.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """"auto" is the GPU (this rank's, under a launcher) or the CPU; "cuda" under a launcher is
    this rank's GPU. `local_rank` defaults to the launcher's (bertscale.distributed.discover)."""
    import torch

    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank is None:
            from bertscale.distributed import discover
            local_rank = discover().local_rank
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "auto":
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    return dev


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32)."""
    import torch

    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision {name!r}: choose auto, fp32, bf16 or fp16")
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on the CPU)")
    return torch.bfloat16 if name == "bf16" else torch.float16


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on `device`, copied without waiting (pinned memory permitting)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
