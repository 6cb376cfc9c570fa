"""The engine interface: what the trainer core needs of whatever runs the model and its
optimizer, and what an optimizer update reports.

Two engines implement it:

    DeepSpeedEngine (bertscale.training.deepspeed_engine)   pretraining: ZeRO 0-3, bf16/fp16,
                        gradient accumulation, universal checkpoints across world sizes
    TorchEngine     (bertscale.training.torch_engine)       fine-tuning: DistributedDataParallel,
                        the optimizer and its LR schedule, gradient clipping, fp16 loss scaling

The core (the checkpointer, resume, the agreement on finite weights) talks to an engine only
through `Engine`; each client's step (bertscale.pretraining.step, bertscale.finetune.train) uses
its own engine's forward and backward. `EngineFactory` builds an engine for a fresh start or
for a checkpoint: a DeepSpeed engine that loads another world size's checkpoint must be built
with another config, so building and choosing the checkpoint's form go together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bertscale.training.checkpoint.layout import Committed


@dataclass(frozen=True)
class Update:
    """What became of one optimizer update."""

    applied: bool
    lr: float                   # the rate this update used (or would have)
    loss_scale: float | None    # fp16 only
    collapsed: bool = False     # the skip rule says stop (pretraining's Updater)
    grad_norm: torch.Tensor | None = None
    """The gradient norm before clipping, on the device (not read back), where the engine
    computes it itself (TorchEngine); DeepSpeed's is read at report time."""


@dataclass(frozen=True)
class CheckpointSource:
    """How this run loads a committed checkpoint: its own folder, or its universal conversion
    (another world size, ZeRO stage or precision; DeepSpeed only)."""

    load_dir: Path
    """The checkpoints folder (`save_dir` / `load_dir` of the engine)."""
    tag: str
    """The checkpoint's folder name in it: `step_N`, or `step_N_universal`."""
    universal: bool
    saved_world_size: int
    """The world size that saved the checkpoint (its commit marker's)."""


class Engine(Protocol):
    """What the trainer core needs of an engine."""

    @property
    def device(self) -> torch.device: ...

    @property
    def module(self) -> nn.Module:
        """The model (single-device code; under ZeRO-3 its parameters are partitioned)."""
        ...

    def save(self, root: Path, tag: str) -> list[Path]:
        """Write this rank's engine files of checkpoint `root/tag` (model, optimizer, LR
        schedule, loss scaler). Collective. Returns the files this rank wrote, for the
        checkpointer to fsync."""
        ...

    def load(self, source: CheckpointSource) -> None:
        """Load model, optimizer, LR schedule and loss scaler from a checkpoint, then put the
        recipe's schedule and hyperparameters back in force. Collective."""
        ...

    def close(self) -> None:
        """Let go of what ties the engine to the process groups (hooks on the parameters), so
        that they end with the run (bertscale.distributed.shutdown). The last call on it."""
        ...


E = TypeVar("E", bound=Engine, covariant=True)


class EngineFactory(Protocol[E]):
    """Builds the run's engine, fresh or for loading a checkpoint (bertscale.training.
    checkpoint.resume.restore calls it)."""

    def source(self, checkpoint: Committed, *, engine_changed: bool) -> CheckpointSource:
        """How this engine loads `checkpoint` (converting it once, collectively, if it must)."""
        ...

    def build(self, source: CheckpointSource | None) -> E:
        """The engine, built to load `source` (None: a fresh start). Collective."""
        ...
