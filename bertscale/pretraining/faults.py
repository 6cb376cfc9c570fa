"""Fault injection for the tests of the failure paths (the recipe's `[debug]` section).

The step calls `DebugHooks` at two named points, `before_step` and `loss`; with `[debug]` empty
(every real run) both do nothing, so the step's code reads the same as without them.

`debug.overflow_at_steps` is the stand-in that lets a CPU test drive the skipped-update path
through the real engine (fp16 cannot run on a CPU): it makes one parameter's gradient inf for the
chosen steps, so that DeepSpeed's own overflow check skips the update. What it does not cover: the
fp16 loss scaler (halving the scale on overflow, hysteresis, raising it again after
`loss_scale_window` good steps) and the fp16 optimizers' own overflow check, which only a GPU
runs. `debug.nan_loss_at_step` turns rank 0's loss into NaN, for the non-finite stop end to end.

`debug.forbid_host_syncs` is an instrument, not a fault: `SyncCheck` fails the run when the step
code between reads waits for the GPU (the GPU test of the sync-free step).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

    from bertscale.config import DebugSection


@dataclass
class OverflowInjector:
    """debug.overflow_at_steps: while the update that would become step N (1-based) is being
    computed, the gradient of one parameter is inf, once per time N is listed (so the retry,
    with the next batch, succeeds unless N is listed again). Empty: does nothing."""

    model: torch.nn.Module
    steps: list[int]
    _pending: Counter[int] = field(init=False)
    _armed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._pending = Counter(self.steps)
        if self.steps:
            import torch

            param = next(p for p in self.model.parameters() if p.requires_grad)
            # A tensor hook runs before DeepSpeed's accumulation hooks see the gradient.
            param.register_hook(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                lambda g: torch.full_like(g, float("inf")) if self._armed else g)

    def arm(self, next_step: int) -> None:
        """Call before the micro-batches of the update that would become step `next_step`."""
        self._armed = self._pending[next_step] > 0
        if self._armed:
            self._pending[next_step] -= 1


class DebugHooks:
    """The `[debug]` faults, on rank 0 only (one rank's fault is what the agreement paths must
    spread to the others)."""

    def __init__(self, debug: DebugSection, model: torch.nn.Module, *, active: bool):
        self.nan_loss_at_step = debug.nan_loss_at_step if active else 0
        self.overflow = OverflowInjector(model, debug.overflow_at_steps if active else [])

    def before_step(self, next_step: int) -> None:
        """Before the micro-batches of the update that would become step `next_step`."""
        self.overflow.arm(next_step)

    def loss(self, next_step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss a micro-batch of step `next_step` backpropagates."""
        if self.nan_loss_at_step == next_step:
            return loss * float("nan")
        return loss


class SyncCheck:
    """debug.forbid_host_syncs, on CUDA: inside `guard()` (the loop's step code between reads:
    fetching, moving and forward/backward of the micro-batches, the statistics) torch's sync debug
    mode is "error", so an implicit wait for the GPU (`.item()`, `.tolist()`, `nonzero()`, a
    blocking copy) raises where it happens; explicit ones (`torch.cuda.synchronize()`, a stream or
    event wait, which that mode does not see) are caught through torch's GPU trace. Outside the
    guard: the reads, the optimizer update (DeepSpeed's overflow check reads the gradient norm
    back), evals and saves. Off (or on a CPU) it does nothing."""

    def __init__(self, enabled: bool, device: torch.device, warn: Callable[[str], None]):
        self.enabled = bool(enabled) and getattr(device, "type", str(device)) == "cuda"
        if enabled and not self.enabled:
            warn(f"debug.forbid_host_syncs: no CUDA device ({device}); nothing is checked")
        self.active, self.steps, self.explicit = False, 0, list[str]()
        if self.enabled:
            import torch
            from torch.cuda import _gpu_trace

            torch._C._activate_gpu_trace()
            for register in (_gpu_trace.register_callback_for_device_synchronization,
                             _gpu_trace.register_callback_for_stream_synchronization,
                             _gpu_trace.register_callback_for_event_synchronization):
                register(self._on_sync)

    def _on_sync(self, *_: Any) -> None:
        if self.active:  # torch swallows exceptions raised in trace callbacks: record instead
            import traceback

            self.explicit.append("".join(traceback.format_stack(limit=8)[:-1]))

    @contextmanager
    def guard(self, on: bool = True) -> Iterator[None]:
        if not (self.enabled and on):
            yield
            return
        import torch

        torch.cuda.set_sync_debug_mode("error")
        self.active = True
        try:
            yield
        finally:
            self.active = False
            torch.cuda.set_sync_debug_mode("default")
        self.steps += 1
        if self.explicit:
            raise RuntimeError(f"debug.forbid_host_syncs: {len(self.explicit)} explicit CUDA "
                               f"synchronization(s) in the step; the first:\n{self.explicit[0]}")

    def summary(self) -> str | None:
        if not self.enabled:
            return None
        return (f"sync check: {self.steps} step(s) ran their step code with no host sync "
                f"(torch.cuda.set_sync_debug_mode('error'), explicit synchronizations traced)")
