"""`bertscale bench`: measured speed, side by side with the reference.

    bertscale bench model [--preset base] [--seq-len 128] [--batch 8] [--dtype fp32|bf16]
                          [--device cpu|cuda] [--repeats 5] [--lengths-from MANIFEST|LENGTHS]
                          [--unpad] [--checkpoint-activations] [--compile] [--out result.json]
    bertscale bench microbatch --preset large --seq-len 512 --global-batch 256 --device cuda
    bertscale bench finetune --task MRPC --data-dir GLUE (--checkpoint DIR | --preset base --vocab V)
    bertscale bench data ...   (the data pipeline's benchmark: prepare and loader throughput)
    bertscale bench remote [--bandwidth-mbs 2] [--latency-ms 100] [--step-ms 100]
                               (steps' wait for object-store shards, prefetch off and on)
    bertscale bench quality --data WIKI --glue GLUE --vocab VOCAB --out OUT [--budget-min 30]

model, microbatch: bertscale.bench.model (a pretraining step against `transformers`); finetune:
bertscale.bench.finetune (GLUE steps and prediction by batch shape); data: bertscale.data.bench;
remote: bertscale.data.bench_remote; quality: bertscale.bench.quality.
This module is only the command line: it imports torch when a benchmark runs, not to list them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from bertscale.config import PRESETS

DTYPE_NAMES = ("fp32", "bf16")


def _run(module: str, func: str):
    """A handler that imports its benchmark module only when called."""
    def handler(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    return handler


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure training-step speed against transformers, "
                              "find micro-batch sizes, time fine-tuning and the data pipeline",
                              description=__doc__.split("\n\n")[0] + "\n\n" +
                              __doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="bench_what", metavar="WHAT")

    m = sub.add_parser("model", help="one training step: bertscale vs transformers")
    m.add_argument("--preset", choices=PRESETS, default="base")
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--batch", type=int, default=8, help="sequences per step (micro-batch)")
    m.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="fp32, or bf16 autocast over fp32 weights (both models alike)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    m.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation")
    m.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    m.add_argument("--steps", type=int, default=1, help="training steps per timed repeat")
    m.add_argument("--num-batches", type=int, default=4,
                   help="distinct batches the steps cycle through")
    m.add_argument("--lengths-from", type=Path, default=None,
                   help="real lengths: a prepared manifest.json (its training batches) or a "
                        "lengths JSON ({\"<seq_len>\": [...]})")
    m.add_argument("--unpad", action="store_true", help="bertscale fast path: drop padding")
    m.add_argument("--checkpoint-activations", action="store_true")
    m.add_argument("--compile", action="store_true", help="torch.compile bertscale's layers")
    m.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile (default inductor)")
    m.add_argument("--optimizer", choices=("adamw", "lamb"), default="adamw")
    m.add_argument("--optimizer-impl", choices=("foreach", "fused", "loop"), default=None,
                   help="default: fused for adamw, foreach for lamb (the same for both models)")
    m.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-transformers", action="store_true", help="time bertscale alone")
    m.add_argument("--peak-n", type=int, default=None,
                   help="size of the square matmul that measures the peak (default: by device)")
    m.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    m.set_defaults(func=_run("bertscale.bench.model", "handle_model"))

    mb = sub.add_parser("microbatch", help="largest micro-batch that fits, and the gradient "
                        "accumulation that keeps the global batch (CUDA)")
    mb.add_argument("--preset", choices=PRESETS, default="large")
    mb.add_argument("--seq-len", type=int, default=512)
    mb.add_argument("--global-batch", type=int, required=True)
    mb.add_argument("--world-size", type=int, default=1)
    mb.add_argument("--start", type=int, default=8)
    mb.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    mb.add_argument("--device", default="cuda")
    mb.add_argument("--unpad", action="store_true")
    mb.add_argument("--checkpoint-activations", action="store_true")
    mb.set_defaults(func=_run("bertscale.bench.model", "handle_microbatch"))

    f = sub.add_parser("finetune", help="a GLUE fine-tuning step and dev prediction: padding "
                       "to max length vs dynamic vs unpadded, and transformers",
                       description="See bertscale.bench.finetune: training steps on the same "
                       "batches of the task's real text padded to --max-seq-length, padded "
                       "dynamically, unpadded, and in transformers; prediction over the dev set "
                       "in file order, length-sorted, and length-sorted unpadded.")
    f.add_argument("--task", default="MRPC", help="a GLUE task name")
    f.add_argument("--data-dir", type=Path, required=True, help="the GLUE folder")
    f.add_argument("--checkpoint", type=Path, help="a Hugging Face or bertscale checkpoint")
    f.add_argument("--preset", choices=PRESETS, default="base",
                   help="model shape with random weights, when no --checkpoint")
    f.add_argument("--vocab", help="vocab.txt for --preset (casing guessed from it)")
    f.add_argument("--max-seq-length", type=int, default=128)
    f.add_argument("--batch", type=int, default=32, help="training examples per step")
    f.add_argument("--eval-batch-size", type=int, default=64)
    f.add_argument("--max-eval-samples", type=int, default=256, help="dev examples per pass")
    f.add_argument("--num-batches", type=int, default=4, help="distinct training batches")
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--warmup", type=int, default=1)
    f.add_argument("--device", default="cpu")
    f.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-transformers", action="store_true")
    f.add_argument("--no-predict", action="store_true", help="time the training step only")
    f.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    f.set_defaults(func=_run("bertscale.bench.finetune", "handle"))

    d = sub.add_parser("data", help="prepare MB/s and loader samples/s (bertscale.data.bench)")
    d.add_argument("--files", nargs="+", help="raw text files (default: wiki_00..07 of the "
                   "Wikipedia sample in ../shared/data)")
    d.add_argument("--vocab", help="vocab.txt (default: the sample's uncased BERT vocab)")
    d.add_argument("--seconds", type=float, default=3.0, help="loader measurement time")
    d.set_defaults(func=_data)

    r = sub.add_parser("remote", help="steps' wait for shards in an object store, prefetch off "
                       "and on, over a throttled local S3 (bertscale.data.bench_remote)")
    from bertscale.data.bench_remote import add_arguments
    add_arguments(r)
    r.set_defaults(func=_run("bertscale.data.bench_remote", "handle"))

    q = sub.add_parser("quality", help="prepare, pretrain bertscale and transformers on the same "
                       "samples in the same time, fine-tune both and random init on GLUE "
                       "(bertscale.bench.quality)")
    from bertscale.bench.quality import add_arguments as quality_arguments
    quality_arguments(q)
    q.set_defaults(func=_run("bertscale.bench.quality", "handle"))
    return p


def _data(args: argparse.Namespace) -> int:
    """Hands over to the data pipeline's benchmark (bertscale.data.bench, owned with the data
    code), with the same flags."""
    from bertscale.data.bench import main as data_main

    argv: list[str] = []
    if args.files:
        argv += ["--files", *args.files]
    if args.vocab:
        argv += ["--vocab", args.vocab]
    argv += ["--seconds", str(args.seconds)]
    return int(data_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.bench model ...`: the same as `bertscale bench model ...`, for
    machines where the package is on PYTHONPATH but not installed (benchmarks/gpu_check.sh)."""
    from bertscale.commands import run_subcommand
    return run_subcommand("bench", sys.argv[1:] if argv is None else argv)

