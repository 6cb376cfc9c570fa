"""`bertscale doctor`: check the environment of a job (ranks, network, GPUs, checkpoint folder,
shards, wandb, DeepSpeed's build cache) before it spends its allocation; bertscale.doctor says
what each check does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertscale.commands.args import Subparsers


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="check ranks, network, GPUs, disk, shards and wandb before a long job",
        description="Run with the same launcher and layout as the training job (e.g. "
                    "`srun bertscale doctor --run-dir R --manifest M`). Exits non-zero with one "
                    "line per problem; prints a summary table when everything is fine.")
    p.add_argument("--run-dir", type=Path, help="run folder; its checkpoints/ folder is checked")
    p.add_argument("--checkpoint-dir", type=Path, help="checkpoint folder to check (instead of "
                   "RUN_DIR/checkpoints)")
    p.add_argument("--manifest", help="data manifest (or its folder; or its s3://, gs://, az:// "
                   "URL): check every shard")
    p.add_argument("--no-sha256", action="store_true", help="check shard sizes only (fast)")
    p.add_argument("--require-gpu", action="store_true", help="fail when no GPU is visible")
    p.add_argument("--cpu", action="store_true", help="use gloo on the CPU even if GPUs exist")
    p.add_argument("--no-wandb", action="store_true", help="the job runs with --no-wandb")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds for joining and each collective (default 120)")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from bertscale.doctor import DoctorConfig, run_checks

    folder = args.checkpoint_dir or (args.run_dir / "checkpoints" if args.run_dir else None)
    return run_checks(DoctorConfig(
        checkpoint_dir=folder, manifest=args.manifest, sha256=not args.no_sha256,
        require_gpu=args.require_gpu, cpu=args.cpu, wandb=not args.no_wandb,
        timeout_s=args.timeout))


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.doctor ...`: the command without the other commands' imports."""
    from bertscale.commands import run_subcommand
    return run_subcommand("doctor", argv)


if __name__ == "__main__":
    sys.exit(main())
