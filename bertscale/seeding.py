"""One way to seed a process: Python's, NumPy's and torch's global generators together."""

from __future__ import annotations

import random


def seed_all(seed: int) -> None:
    """Seed `random`, NumPy's legacy global generator and torch (CPU and every CUDA device)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
