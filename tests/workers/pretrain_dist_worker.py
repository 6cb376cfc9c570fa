"""One rank of tests/test_distributed.py: discover the layout from the launcher's variables, start
the process group through DeepSpeed, check it with an all-reduce, then let ONE rank receive a
preemption signal and print whether every rank agrees that preemption was requested, through the
trainer's own agreement: a read of one step's record (bertscale.training.agreement.Reads, which
folds the local flag into its all-reduce).

argv: SIGNAL_RANK (the rank that signals itself, -1 for none)
Prints one JSON line per rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bertscale import distributed
from bertscale.training.agreement import Attempt, Reads
from bertscale.training.stats import StepRecord


def preemption_agreed(rank: int) -> bool:
    """What the trainer decides at its next read: whether any rank was signalled."""
    cpu = torch.device("cpu")
    reads: Reads[StepRecord, None] = Reads(StepRecord, cpu, check_every=1, rank=rank,
                                           run_dir=Path("."), info=print)
    reads.add(Attempt(1, True, StepRecord.pack(cpu), [], None))
    return reads.read().preempted


def main() -> None:
    signal_rank = int(sys.argv[1])
    env = distributed.discover()
    distributed.init(env)
    distributed.install_signal_handlers()
    total = torch.tensor([env.rank + 1.0])
    dist.all_reduce(total)
    before = preemption_agreed(env.rank)
    if env.rank == signal_rank:
        os.kill(os.getpid(), signal.SIGUSR1)
    after = preemption_agreed(env.rank)
    print(json.dumps({"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
                      "launcher": env.launcher, "addr": env.master_addr, "port": env.master_port,
                      "sum": total.item(), "before": before, "after": after,
                      "local_flag": distributed.local_preemption_flag(),
                      "dist_rank": dist.get_rank()}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
