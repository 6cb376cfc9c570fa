"""One rank of tests/test_distributed.py: discover the layout from the launcher's variables, start
the process group through DeepSpeed, check it with an all-reduce, then let ONE rank receive a
preemption signal and print whether every rank agrees that preemption was requested.

argv: SIGNAL_RANK (the rank that signals itself, -1 for none)
Prints one JSON line per rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from bertscale import distributed


def main() -> None:
    signal_rank = int(sys.argv[1])
    env = distributed.discover()
    distributed.init(env)
    distributed.install_signal_handlers()
    total = torch.tensor([env.rank + 1.0])
    dist.all_reduce(total)
    before = distributed.preemption_requested()
    if env.rank == signal_rank:
        os.kill(os.getpid(), signal.SIGUSR1)
    after = distributed.preemption_requested()
    print(json.dumps({"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
                      "launcher": env.launcher, "addr": env.master_addr, "port": env.master_port,
                      "sum": total.item(), "before": before, "after": after,
                      "local_flag": distributed.local_preemption_flag(),
                      "dist_rank": dist.get_rank()}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
