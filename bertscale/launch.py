"""This node's share of a multi-node job through torchrun (`bertscale launch`), as a container's
command on Kubernetes (JobSet, Kubeflow TrainJob / PyTorchJob), SkyPilot or any machine.

    bertscale launch [--nnodes N|MIN:MAX] [--nproc-per-node N] [--max-restarts K] pretrain ...

It reads where this node sits from the scheduler's environment (`nodes.discover_node`),
runs `torchrun` with a c10d rendezvous on node 0's stable address, and turns what happened into
the exit code the scheduler's failure policy acts on:

  0   the command finished;
  75  a worker on THIS node stopped for preemption after its checkpoint was committed (torchrun
      itself reports a worker's 75 as 1, so the workers leave a node-local record, named by
      `distributed.PREEMPTED_RECORD_ENV`): the policy restarts the pod without counting a failure
      (`--preempted-exit` picks another code for a controller that retries only some: PyTorchJob
      v1 retries codes >= 128);
  2, 3  the first of this node's workers to fail exited with it (bad input, a non-finite loss):
      a restart cannot fix these, and the manifests' pod failure policies fail the job on them;
  any other code: torchrun's (1 for any other failed worker).

torchrun runs in a child process of its own, as `python -m bertscale.launch TORCHRUN-ARGS`
(`agent`): the same arguments and code as `torchrun`, which reports every failed worker as exit 1
after a Python traceback of its own; the agent says which worker failed first, with what, in one
line instead, and keeps the worker's code when it is one of the two above.

SIGTERM and SIGINT go to torchrun, which forwards them to the workers and waits up to
`--shutdown-timeout` seconds (torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) before
killing them: set it to the grace period the scheduler gives minus a margin, so that the
checkpoint commits before SIGKILL. SIGUSR1 (SLURM's warning signal) is forwarded as SIGTERM,
because torchrun dies on SIGUSR1 without forwarding it.

In-job elasticity: with `--nnodes MIN:MAX` and `--max-restarts K`, a node that dies or leaves
makes torchrun restart the workers on the others, which resume from the newest committed
checkpoint at the new world size (global batch and sample stream kept); a node that joins
triggers the same restart. The rendezvous store lives on node 0 (torchrun's c10d backend): losing
node 0 ends the job on every node, and the scheduler's policy restarts it.

Why a record on the node and not the run folder's preempted.json (which SLURM's requeue.sh reads
after the whole job step ended): under elastic membership the surviving nodes' restarted workers
take the run folder over, and remove that file, while this node's launcher is still deciding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bertscale import distributed, nodes
from bertscale.exitcodes import BAD_INPUT_EXIT_CODE, NONFINITE_EXIT_CODE

DEFAULT_SHUTDOWN_TIMEOUT = 300
KEPT_EXIT_CODES = (BAD_INPUT_EXIT_CODE, NONFINITE_EXIT_CODE)
"""A worker's exit codes the node exits with: no restart can fix what they say."""


def torchrun_argv(node: nodes.NodeEnv, command: list[str], *, max_restarts: int,
                  python: str = sys.executable, module: str = "torch.distributed.run",
                  ) -> list[str]:
    """The torchrun command line for this node (one node: standalone, no rendezvous host);
    `module` runs it (`bertscale.launch`: the same torchrun through `agent`)."""
    argv = [python, "-m", module, "--nproc-per-node", node.nproc_per_node,
            "--max-restarts", str(max_restarts)]
    if node.node_range == (1, 1):
        argv += ["--standalone"]
    else:
        argv += ["--nnodes", node.nnodes, "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"{node.master_addr}:{node.master_port}",
                 "--rdzv-id", node.rdzv_id]
    return [*argv, "-m", "bertscale", *command]


def run(node: nodes.NodeEnv, command: list[str], *, max_restarts: int,
        shutdown_timeout: int, preempted_exit: int = distributed.PREEMPTED_EXIT_CODE) -> int:
    """Run torchrun for this node; the exit code for the scheduler (module docstring)."""
    argv = torchrun_argv(node, command, max_restarts=max_restarts, module=__name__)
    with tempfile.TemporaryDirectory(prefix="bertscale-launch-") as tmp:
        record = Path(tmp) / "preempted.json"
        env = {**os.environ, distributed.PREEMPTED_RECORD_ENV: str(record),
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout)}
        # The workers must not take this process's own layout (a PyTorchJob's RANK is the pod's).
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(name, None)
        print(f"bertscale launch: {node.describe()}", flush=True)
        proc = subprocess.Popen(argv, env=env)

        def forward(signum: int, _frame) -> None:
            sent = signal.SIGTERM if signum == signal.SIGUSR1 else signum
            if proc.poll() is None:
                proc.send_signal(sent)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(s, forward)
        rc = proc.wait()
        return exit_code(rc, record, preempted_exit)


def exit_code(rc: int, record: Path, preempted_exit: int = distributed.PREEMPTED_EXIT_CODE) -> int:
    """torchrun's exit code as the scheduler should see it: `preempted_exit` when a worker of
    this node recorded a preemption after its checkpoint committed."""
    if rc == 0:
        return 0
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        return preempted_exit if rc == distributed.PREEMPTED_EXIT_CODE else rc
    print(f"bertscale launch: preempted after committing checkpoint step {seen.get('step')} "
          f"(torchrun exited {rc}); exiting {preempted_exit} so that the scheduler restarts "
          f"this node", file=sys.stderr, flush=True)
    return preempted_exit


def agent(argv: list[str]) -> int:
    """torchrun with these arguments (this module's `__main__`, in `run`'s child process). A
    failed worker, a signal that stopped them, or a rendezvous that failed (the node holding
    its store gone first) ends it with one line, not torchrun's traceback; the exit code is the first failed worker's when it is one of KEPT_EXIT_CODES,
    else torchrun's 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    try:
        record(torchrun)(parse_args(argv))
    except SignalException as e:  # SIGTERM (a preemption): the workers were stopped and waited for
        print(f"bertscale launch: torchrun stopped this node's workers on {e.sigval.name}",
              file=sys.stderr, flush=True)
        return 1  # torchrun's code; `exit_code` makes it 75 when a worker committed and recorded
    except RendezvousError as e:  # e.g. the node hosting the rendezvous store went away first
        said = str(e.__cause__).strip().splitlines() if e.__cause__ else []
        cause = f" ({type(e.__cause__).__name__}: {said[0]})" if said else ""
        print(f"bertscale launch: torchrun's rendezvous failed: {e}{cause}".replace("\n", " "),
              file=sys.stderr, flush=True)
        return 1  # torchrun's code, as above
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode == distributed.PREEMPTED_EXIT_CODE:
            return 1  # not a failure: `exit_code` reads the workers' record and says so
        code = first.exitcode if first.exitcode in KEPT_EXIT_CODES else 1
        how = f"exited {first.exitcode}"
        if first.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-first.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-first.exitcode}"
        more = len(e.failures) - 1
        print(f"bertscale launch: rank {rank} (local rank {first.local_rank}, pid {first.pid}) "
              f"{how} first (its own output is above)"
              f"{f'; {more} other worker(s) of this node stopped after it' if more else ''}",
              file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(agent(sys.argv[1:]))
