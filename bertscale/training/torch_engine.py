"""The plain PyTorch engine (fine-tuning): DistributedDataParallel over W ranks (or the model as
is on one), the optimizer and its LR schedule, global gradient-norm clipping, and fp16 loss
scaling (torch.amp.GradScaler) under autocast.

Why not DeepSpeed here: fine-tuning BERT-Large fits one GPU with its whole AdamW state, so ZeRO
sharding buys nothing, while a DeepSpeed engine costs seconds of start-up (measured here: 4-6 s
against 1.5 s for DDP, per run of an lr x seed grid) and its fp16 path skips updates by its own
rules. This engine keeps fine-tuning's data-parallel arithmetic (each rank's loss weighted by its
share of the global batch, gradients averaged by DDP) and saves through the same commit-marker
checkpoints as pretraining's.

Its checkpoint files: rank 0 writes `engine.pt` (model, optimizer, schedule, loss scaler; the
replicas are identical), every rank loads it. A fp16 update the scaler skips (inf/NaN gradients)
is reported as not applied; the schedule steps all the same, as before the trainer core (a step
of a fine-tuning run is a batch of its epochs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertscale.files import torch_save_atomic
from bertscale.training.checkpoint.layout import Committed
from bertscale.training.engine import CheckpointSource, Update

ENGINE_FILE = "engine.pt"


class TorchEngine:
    """A model on one device, data-parallel over the process group when there is one
    (bertscale.training.engine.Engine)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device,
                 amp_dtype: torch.dtype | None, max_grad_norm: float, world_size: int):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._device, self.amp_dtype, self.max_grad_norm = device, amp_dtype, max_grad_norm
        self.net: nn.Module = model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            # Wrapping broadcasts rank 0's weights: every replica starts the same.
            self.net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def module(self) -> nn.Module:
        return self.model

    def train(self) -> None:
        self.net.train()

    def eval(self) -> None:
        self.net.eval()

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward's precision: autocast to bf16 / fp16, or fp32."""
        with torch.autocast(self._device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        torch.autograd.backward(self.scaler.scale(loss))   # DDP averages over the ranks

    def update(self) -> Update:
        """Unscale, clip the global gradient norm, step the optimizer (unless the fp16 scaler
        found inf/NaN gradients) and the LR schedule. The norm stays on the device."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        lr = float(self.scheduler.get_last_lr()[0])   # read before the schedule steps
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        applied = scale is None or self.scaler.get_scale() >= scale
        return Update(applied, lr, scale, grad_norm=grad_norm.detach())

    def close(self) -> None:
        """DDP's reducer holds the process group; the plain model is what stays."""
        self.net = self.model

    def save(self, root: Path, tag: str) -> list[Path]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return []
        path = root / tag / ENGINE_FILE
        torch_save_atomic({"model": self.model.state_dict(),
                           "optimizer": self.optimizer.state_dict(),
                           "scheduler": self.scheduler.state_dict(),
                           "scaler": self.scaler.state_dict()}, path)
        return [path]

    def load(self, source: CheckpointSource) -> None:
        """Every rank loads rank 0's files; then the recipe's schedule and hyperparameters are
        in force from the restored step on (`optim.follow_recipe_after_load`)."""
        from bertscale import optim

        recipe_groups = optim.recipe_hyperparameters(self.optimizer)
        blob = torch.load(source.load_dir / source.tag / ENGINE_FILE, map_location="cpu",
                          weights_only=False)
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.scaler.load_state_dict(blob["scaler"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            optim.follow_recipe_after_load(self.scheduler, recipe_groups)


@dataclass
class TorchFactory:
    """Builds a TorchEngine (bertscale.training.engine.EngineFactory): its checkpoints load on
    any number of ranks as they are (every rank holds the whole state)."""

    build_engine: Callable[[], TorchEngine]

    def source(self, checkpoint: Committed, *, engine_changed: bool) -> CheckpointSource:
        return CheckpointSource(checkpoint.root, checkpoint.tag, False, checkpoint.world_size)

    def build(self, source: CheckpointSource | None) -> TorchEngine:
        return self.build_engine()


def adamw(model: nn.Module, *, lr: float, weight_decay: float, warmup: float, total_steps: int,
          device: torch.device) -> tuple[torch.optim.Optimizer, Any]:
    """The pretraining code's AdamW (eps 1e-6, no decay on biases and LayerNorm weights; fused
    on a GPU) and its warmup + linear-decay schedule over `total_steps`."""
    from bertscale.optim import (OptimizerConfig, ScheduleConfig, build_optimizer,
                                 build_scheduler)

    opt = build_optimizer(OptimizerConfig(
        name="adamw", lr=lr, eps=1e-6, weight_decay=weight_decay,
        implementation="fused" if device.type == "cuda" else "foreach"), model)
    return opt, build_scheduler(opt, ScheduleConfig(warmup=float(warmup), decay="linear"),
                                total_steps)
