"""Where a fine-tuning command runs: this process's place among the ranks, its device and
autocast dtype, and what only rank 0 does (progress lines, result files).

`start` is called once, explicitly, at the start of a command (bertscale.commands.finetune):
one process alone, or the W processes a launcher (torchrun, srun, mpirun, the deepspeed
launcher) started, which then form a process group (NCCL on GPUs; gloo on the CPU or with
`train.device = "cpu"`), each pinned to its GPU. A single process starts no process group. The
`Runtime` it returns is handed to whatever needs it; nothing starts a group behind the caller's
back.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertscale.distributed import DistEnv
from bertscale.files import write_text_atomic

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Runtime:
    env: DistEnv
    device: torch.device
    amp_dtype: torch.dtype | None
    """The autocast dtype (None: fp32)."""
    progress: str = "auto"
    """"auto" (a bar on a terminal, plain lines otherwise), "bar" or "plain"."""

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def log(self, msg: str) -> None:
        """Progress on stderr, from rank 0 only."""
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def barrier(self) -> None:
        from bertscale.distributed import barrier
        barrier()

    def write_text(self, path: Path, text: str) -> None:
        """Rank 0 writes `path` atomically; the other ranks, which computed the same results,
        write nothing."""
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)

    def write_json(self, path: Path, data: Any) -> None:
        self.write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def start(device: str = "auto", precision: str = "auto", progress: str = "auto") -> Runtime:
    """This process's runtime: discover the ranks and, when there are several, start their
    process group and pin this process to its GPU. Call `stop()` when the command ends."""
    import torch

    from bertscale.devices import resolve_device, resolve_precision
    from bertscale.distributed import discover, init_torch

    env = discover()
    if env.world_size > 1:
        on_gpu = torch.cuda.is_available() and device != "cpu"
        if on_gpu:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        init_torch(env, "nccl" if on_gpu else "gloo")
    dev = resolve_device(device, env.local_rank)
    return Runtime(env, dev, resolve_precision(precision, dev), progress)


def stop() -> None:
    """End the process group `start` began, if any."""
    from bertscale.distributed import shutdown
    shutdown()
