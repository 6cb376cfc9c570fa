"""The DeepSpeed engine (pretraining): ZeRO 0-3, bf16/fp16, gradient accumulation, and
checkpoints that load on another number of ranks, ZeRO stage or precision through DeepSpeed's
universal conversion (bertscale.training.checkpoint.universal).

`DeepSpeedFactory` builds the engine from the recipe's model, optimizer and DeepSpeed config;
for a resume it first decides how the checkpoint loads (converting it once if it must) and
builds the engine with the config that load needs. `DeepSpeedEngine` is the engine the trainer
steps: DeepSpeed's forward, backward, micro-steps and update, and its checkpoint files.

DeepSpeed skips an update when the gradients overflow (fp16 under dynamic loss scaling; also
bf16 and fp32 ZeRO-1/2, whose gradient-norm check treats an inf/NaN norm the same way): it zeroes
the gradients, leaves the weights and the LR schedule where they were, and `was_step_applied()`
is False; `update` reports it. Its fp16 scaler raises when an overflow happens at the minimum
scale: `update` reports that as a collapse (the trainer stops, exit 3).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertscale.errors import UserError
from bertscale.training.checkpoint.layout import Committed
from bertscale.training.checkpoint.universal import (repair_universal_load, resume_source,
                                                     with_load_universal)
from bertscale.training.engine import CheckpointSource, Update

if TYPE_CHECKING:
    import torch
    from torch import nn


def mark_universal(model: nn.Module) -> None:
    """Set what DeepSpeed's ds_to_universal requires. DeepSpeed saves the module attribute
    `universal_checkpoint_info` into the model-states file (the key is reserved in client_state).
    A purely data-parallel model needs only the format version."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(model, UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def _written_by(name: str, rank: int) -> bool:
    """Which files of a DeepSpeed tag folder this rank wrote (so it fsyncs exactly those)."""
    return f"zero_pp_rank_{rank}_" in name or (rank == 0 and name.startswith("mp_rank_"))


class DeepSpeedEngine:
    """A DeepSpeed engine as the trainer steps it (bertscale.training.engine.Engine)."""

    def __init__(self, ds: Any, scheduler: Any, *, fp16: bool):
        self.ds, self.scheduler, self.fp16 = ds, scheduler, fp16

    @property
    def device(self) -> torch.device:
        device: torch.device = self.ds.device
        return device

    @property
    def module(self) -> nn.Module:
        module: nn.Module = self.ds.module
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def micro_step(self) -> None:
        """After a micro-batch inside the accumulation window: DeepSpeed only counts it."""
        self.ds.step()

    def zero_stage(self) -> int:
        return int(self.ds.zero_optimization_stage())

    def grad_norm(self) -> float | None:
        """The last update's global gradient norm, as DeepSpeed computed it (a host value)."""
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def update(self) -> Update:
        """The optimizer update at the end of the accumulation window (clipping, the ZeRO update,
        the LR schedule). DeepSpeed decides on the host whether it was applied (its overflow
        check reads the gradient norm back)."""
        lr = float(self.scheduler.get_last_lr()[0])  # read before the schedule steps
        collapsed = False
        try:
            self.ds.step()
        except Exception as e:
            # fp16: DeepSpeed's dynamic loss scaler raises (on every rank: overflow is
            # all-reduced) when an overflow happens at its minimum scale.
            if "loss scale already at minimum" not in str(e):
                raise
            collapsed = True
        applied = not collapsed and bool(self.ds.was_step_applied())
        return Update(applied, lr, self.loss_scale() if self.fp16 else None, collapsed)

    def loss_scale(self) -> float | None:
        """The fp16 loss scale DeepSpeed uses now (None without one: bf16, fp32)."""
        optimizer = getattr(self.ds, "optimizer", None)
        for name in ("cur_scale", "loss_scale"):
            value = getattr(optimizer, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def close(self) -> None:
        """Drop DeepSpeed's gradient hooks: they keep the engine, and through it its process
        groups, alive past the end of the run into the interpreter's teardown."""
        self.ds.destroy()

    def save(self, root: Path, tag: str) -> list[Path]:
        """DeepSpeed's files of checkpoint `root/tag` (every rank its partition). Whatever fails,
        this rank still joins the barrier that ends DeepSpeed's save_checkpoint (its last
        collective; the writes come after its tag check), so the ranks whose writes went
        through hear of the failure instead of waiting for this one."""
        import torch.distributed as dist

        try:
            self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)
        except Exception:
            dist.barrier()
            raise
        rank = dist.get_rank()
        return [p for p in (root / tag).iterdir() if p.is_file() and _written_by(p.name, rank)]

    def load(self, source: CheckpointSource) -> None:
        """`load_checkpoint` (model, optimizer, LR schedule), then the repair of DeepSpeed's
        ZeRO-3 universal load, then today's recipe put back in force: the loaded schedule keeps
        only its step counter; the lr of the next update and every param group's
        hyperparameters are the recipe's (`optim.follow_recipe_after_load`). Collective."""
        from bertscale import optim

        scheduler = getattr(self.ds, "lr_scheduler", None)
        recipe_groups = optim.recipe_hyperparameters(scheduler.optimizer) if scheduler else None
        path, _ = self.ds.load_checkpoint(str(source.load_dir), tag=source.tag,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{source.load_dir / source.tag}: DeepSpeed could not load this "
                            f"checkpoint")
        repair_universal_load(self.ds, source)
        if scheduler is not None and recipe_groups is not None:
            optim.follow_recipe_after_load(scheduler, recipe_groups)


@dataclass
class DeepSpeedFactory:
    """Builds the DeepSpeed engine of `model` and `optimizer` (bertscale.training.engine.
    EngineFactory): `ds_config` as the recipe gives it, `lr_scheduler(optimizer)` the recipe's
    schedule, `device_rank` the accelerator index of this rank."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ds_config: dict[str, Any]
    lr_scheduler: Callable[[torch.optim.Optimizer], Any]
    device_rank: int
    world_size: int
    fp16: bool = False
    check_free_space: bool = True
    """The recipe's checkpoint.check_free_space, for the universal conversion a resume may
    need."""

    def source(self, checkpoint: Committed, *, engine_changed: bool) -> CheckpointSource:
        return resume_source(checkpoint, self.world_size, engine_changed=engine_changed,
                             check_free_space=self.check_free_space)

    def build(self, source: CheckpointSource | None) -> DeepSpeedEngine:
        import deepspeed

        from bertscale import optim

        config = (with_load_universal(self.ds_config) if source is not None and source.universal
                  else self.ds_config)
        ds, _, _, scheduler = deepspeed.initialize(
            # The device is local_rank modulo the visible GPUs, not DeepSpeed's LOCAL_RANK as is.
            args=argparse.Namespace(device_rank=self.device_rank), model=self.model,
            optimizer=self.optimizer, config=config, lr_scheduler=self.lr_scheduler)
        optim.make_zero_aware(self.optimizer, ds)  # LAMB: trust ratios per original tensor
        return DeepSpeedEngine(ds, scheduler, fp16=self.fp16)
