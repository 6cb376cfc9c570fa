"""`bertscale launch`: start this node's share of a multi-node job through torchrun, as a
container's command on Kubernetes (JobSet, Kubeflow TrainJob / PyTorchJob), SkyPilot or any
machine; bertscale.launch says how it maps what happened to the scheduler's exit code."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bertscale import distributed, nodes
from bertscale.commands.args import Subparsers
from bertscale.errors import UserError
from bertscale.launch import DEFAULT_SHUTDOWN_TIMEOUT, run, torchrun_argv


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run a command on this node of a multi-node job through torchrun "
                       "(Kubernetes, SkyPilot)",
        description="Start this node's processes through torchrun, with the rendezvous the "
                    "scheduler's environment describes (Kubeflow PET_*, an Indexed Job or "
                    "JobSet pod, SkyPilot, SLURM), and exit 75 when they stopped for "
                    "preemption after a committed checkpoint. Example: bertscale launch "
                    "pretrain bert_large_phase1 --run-dir /runs/p1")
    p.add_argument("--nnodes", help="node count N, or MIN:MAX for in-job elastic membership "
                                    "(default: the scheduler's)")
    p.add_argument("--nproc-per-node", help="processes (GPUs) per node (default: the "
                                            "scheduler's, else 1)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="times torchrun restarts the workers after a failure or a membership "
                        "change (default 3 with MIN:MAX, else 0)")
    p.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   help="seconds torchrun gives the workers after SIGTERM before SIGKILL: the "
                        "scheduler's grace period minus a margin (default "
                        f"{DEFAULT_SHUTDOWN_TIMEOUT})")
    p.add_argument("--preempted-exit", type=int, default=distributed.PREEMPTED_EXIT_CODE,
                   help="exit code for 'stopped for preemption, checkpoint committed' (default "
                        f"{distributed.PREEMPTED_EXIT_CODE}; 143 for PyTorchJob v1, which "
                        "restarts pods on codes >= 128)")
    p.add_argument("--print", action="store_true", help="print the torchrun command and exit")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the bertscale command to run on every process, e.g. pretrain RECIPE ...")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    """The node's torchrun command (from the scheduler's environment and the flags), run or printed."""
    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not command:
        raise UserError("give the bertscale command to launch, e.g. `bertscale launch pretrain "
                        "bert_large_phase1 --run-dir /runs/p1`")
    node = nodes.discover_node()
    if args.nnodes:
        node = dataclasses.replace(node, nnodes=nodes.check_nnodes(args.nnodes, "--nnodes"))
    if args.nproc_per_node:
        node = dataclasses.replace(node, nproc_per_node=args.nproc_per_node)
    restarts = args.max_restarts if args.max_restarts is not None else (3 if node.elastic else 0)
    if restarts < 0 or args.shutdown_timeout < 0:
        raise UserError("--max-restarts and --shutdown-timeout must not be negative")
    if not 0 < args.preempted_exit < 256:
        raise UserError(f"--preempted-exit {args.preempted_exit} is not an exit code (1-255)")
    if args.print:
        print(" ".join(torchrun_argv(node, command, max_restarts=restarts)))
        return 0
    return run(node, command, max_restarts=restarts, shutdown_timeout=args.shutdown_timeout,
               preempted_exit=args.preempted_exit)


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.launch ...`."""
    from bertscale.commands import run_subcommand
    return run_subcommand("launch", argv)


if __name__ == "__main__":
    sys.exit(main())
