"""The optimizer and learning-rate schedule of a recipe (bertscale.optim builds the torch objects
from them); shared by every recipe that trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from bertscale.errors import ConfigError


@dataclass
class OptimizerConfig:
    """Which optimizer, and its hyperparameters (defaults: the paper's Adam)."""

    name: Literal["adamw", "lamb"] = "adamw"
    """"adamw" (the paper's Adam with decoupled weight decay) or "lamb" (You et al. 2019, for
    large batches; made correct under ZeRO by `make_zero_aware`)."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup (the paper: 1e-4 for Adam at batch 256)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates."""
    eps: float = 1e-6
    """Added to sqrt(v_hat) in the denominator (the paper's BERT uses 1e-6)."""
    weight_decay: float = 0.01
    """Decoupled weight decay on weight matrices and embeddings; never on biases or LayerNorm."""
    implementation: Literal["foreach", "fused", "loop"] = "foreach"
    """"foreach": multi-tensor kernels; "fused": torch's fused AdamW (AdamW only); "loop": one
    tensor at a time, the slow reference the fast paths are tested against."""

    def validate(self, where: str = "optimizer") -> None:
        if self.name not in ("adamw", "lamb"):
            raise ConfigError(f"{where}.name = {self.name!r} is not allowed; choose one of "
                              f"'adamw', 'lamb'")
        if self.implementation not in ("foreach", "fused", "loop"):
            raise ConfigError(f"{where}.implementation = {self.implementation!r} is not allowed; "
                              f"choose one of 'foreach', 'fused', 'loop'")
        if self.name == "lamb" and self.implementation == "fused":
            raise ConfigError(f"{where}.implementation = 'fused' exists only for adamw; "
                              f"for lamb choose 'foreach' or 'loop'")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{where}.lr must be a positive number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ConfigError(f"{where}.eps must be positive, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{where}.weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay (the paper: 10k warmup, linear decay)."""

    warmup: int | float = 10000
    """Warmup length: an integer number of optimizer steps, or a float in [0, 1) giving a
    fraction of the total steps (0.01 = the first 1%)."""
    decay: Literal["linear", "poly", "constant"] = "linear"
    """After warmup: "linear" to min_lr_ratio at the last step, "poly" with exponent `power`
    (NVIDIA's BERT uses 0.5 for LAMB), or "constant" at the peak."""
    power: float = 1.0
    """Exponent of the "poly" decay (1.0 is linear)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak, for "linear" and "poly"."""

    def validate(self, where: str = "schedule") -> None:
        w = self.warmup
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"{where}.warmup must be an integer number of steps or a fraction "
                              f"in [0, 1), got {w!r}")
        if isinstance(w, float) and not 0.0 <= w < 1.0:
            raise ConfigError(f"{where}.warmup = {w!r}: a float is a fraction of the total steps "
                              f"and must be in [0, 1); give a step count as an integer")
        if isinstance(w, int) and w < 0:
            raise ConfigError(f"{where}.warmup must be >= 0 steps, got {w}")
        if self.decay not in ("linear", "poly", "constant"):
            raise ConfigError(f"{where}.decay = {self.decay!r} is not allowed; choose one of "
                              f"'linear', 'poly', 'constant'")
        if not self.power > 0:
            raise ConfigError(f"{where}.power must be positive, got {self.power!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{where}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps (a fraction is rounded to the nearest step)."""
    if isinstance(cfg.warmup, float):
        return int(round(cfg.warmup * total_steps))
    return int(cfg.warmup)
