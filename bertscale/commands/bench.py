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
bertscale.bench.finetune (GLUE steps and prediction by batch shape); data: bertscale.bench.data;
remote: bertscale.bench.remote; quality: bertscale.bench.quality.
The benchmarks import torch when one runs, not to list them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from bertscale.commands.args import Subparsers, parse_list
from bertscale.config import PRESETS
from bertscale.errors import UserError

DTYPE_NAMES = ("fp32", "bf16")


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure training-step speed against transformers, "
                              "find micro-batch sizes, time fine-tuning and the data pipeline",
                              description=__doc__.split("\n\n")[0] + "\n\n" +
                              __doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def usage(args: argparse.Namespace) -> int:  # `bertscale bench` alone
        p.print_help()
        return 2

    p.set_defaults(func=usage)
    sub = p.add_subparsers(dest="bench_what", metavar="WHAT")
    for add in (_model_parser, _microbatch_parser, _finetune_parser, _data_parser, _remote_parser,
                _quality_parser):
        add(sub)
    return p


def _config(cls: type[Any], args: argparse.Namespace, **given: Any) -> Any:
    """A benchmark's config dataclass from the parsed flags of the same names."""
    fields = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**{k: v for k, v in vars(args).items() if k in fields}, **given)


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        from bertscale.files import write_json_atomic
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)


# ------------------------------------------------------------------------------ model


def _model_parser(sub: Subparsers) -> None:
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
    m.set_defaults(func=_model)


def _model(args: argparse.Namespace) -> int:
    from bertscale.bench.model import ModelBenchConfig, bench_model, format_table

    result = bench_model(_config(ModelBenchConfig, args))
    print(format_table(result))
    _write_json(args.out, result)
    return 0


def _microbatch_parser(sub: Subparsers) -> None:
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
    mb.set_defaults(func=_microbatch)


def _microbatch(args: argparse.Namespace) -> int:
    from bertscale.bench.model import MicroBatchBenchConfig, bench_microbatch

    bench_microbatch(_config(MicroBatchBenchConfig, args))
    return 0


# ------------------------------------------------------------------------------ finetune


def _finetune_parser(sub: Subparsers) -> None:
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
    f.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from bertscale.bench.finetune import FinetuneBenchConfig, bench_finetune, format_table

    result = bench_finetune(_config(FinetuneBenchConfig, args))
    print(format_table(result), flush=True)
    _write_json(args.out, result)
    return 0


# ------------------------------------------------------------------------------ data


def _data_parser(sub: Subparsers) -> None:
    d = sub.add_parser("data", help="prepare MB/s and loader samples/s (bertscale.bench.data)")
    d.add_argument("--files", nargs="+", help="raw text files (default: wiki_00..07 of the "
                   "Wikipedia sample in ../shared/data)")
    d.add_argument("--vocab", help="vocab.txt (default: the sample's uncased BERT vocab)")
    d.add_argument("--seconds", type=float, default=3.0, help="loader measurement time")
    d.set_defaults(func=_data)


def _data(args: argparse.Namespace) -> int:
    from bertscale.bench.data import bench_data, shared_data_dir

    shared = shared_data_dir()
    files = args.files or [shared / "wikipedia" / f"wiki_0{i}.gz" for i in range(8)]
    vocab = args.vocab or shared / "vocab" / "bert-base-uncased-vocab.txt"
    missing = [str(f) for f in [*files, vocab] if not Path(f).is_file()]
    if missing:
        raise UserError(f"bench data: missing {', '.join(missing)} (set BERTSCALE_SHARED_DATA or "
                        f"pass --files and --vocab)")
    bench_data(files, vocab, loader_seconds=args.seconds)
    return 0


# ------------------------------------------------------------------------------ remote


def _remote_parser(sub: Subparsers) -> None:
    p = sub.add_parser("remote", help="steps' wait for shards in an object store, prefetch off "
                       "and on, over a throttled local S3 (bertscale.bench.remote)")
    p.add_argument("--files", nargs="+", help="raw text (default: wiki_00..03 of the shared "
                   "Wikipedia sample)")
    p.add_argument("--vocab", help="vocab.txt (default: the sample's uncased BERT vocab)")
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--window-shards", type=int, default=2, help="shuffle window, in shards")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=100.0, help="simulated compute per step")
    p.add_argument("--windows", type=int, default=6, help="shuffle windows to read")
    p.add_argument("--bandwidth-mbs", type=float, default=2.0, help="link bandwidth, MB/s")
    p.add_argument("--latency-ms", type=float, default=100.0, help="before each response")
    p.add_argument("--concurrency", type=int, default=4, help="data.fetch_concurrency")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    p.set_defaults(func=_remote)


def _remote(args: argparse.Namespace) -> int:
    from bertscale.bench.data import shared_data_dir
    from bertscale.bench.remote import bench_remote

    shared = shared_data_dir()
    files = [Path(f) for f in args.files] if args.files else [
        shared / "wikipedia" / f"wiki_0{i}.gz" for i in range(4)]
    vocab = Path(args.vocab) if args.vocab else shared / "vocab" / "bert-base-uncased-vocab.txt"
    res = bench_remote(files, vocab, samples_per_shard=args.samples_per_shard,
                       window_shards=args.window_shards, global_batch=args.global_batch,
                       step_ms=args.step_ms, windows=args.windows,
                       bandwidth_mbs=args.bandwidth_mbs, latency_ms=args.latency_ms,
                       concurrency=args.concurrency)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------------------ quality

# The defaults of bertscale.bench.quality (kept here so that `--help` imports no benchmark).
QUALITY_TASKS = ("CoLA", "MRPC", "RTE", "STS-B")
QUALITY_RECIPE = "quality_mini"


def _quality_parser(sub: Subparsers) -> None:
    p = sub.add_parser("quality", help="prepare, pretrain bertscale and transformers on the same "
                       "samples in the same time, fine-tune both and random init on GLUE "
                       "(bertscale.bench.quality)")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="raw text: the Wikipedia extracts folder (WikiExtractor .gz files) or files")
    p.add_argument("--glue", type=Path, required=True, help="the GLUE folder (<Task>/train.tsv ...)")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", type=Path, help="WordPiece vocab.txt (e.g. Google's BERT uncased)")
    vocab.add_argument("--train-vocab", type=int, metavar="SIZE",
                       help="train a WordPiece vocabulary of SIZE tokens from --data instead "
                            "(`bertscale prepare --train-vocab`; small toy runs)")
    p.add_argument("--out", type=Path, required=True, help="work and result folder (resumable)")
    p.add_argument("--recipe", default=QUALITY_RECIPE,
                   help=f"pretraining recipe, name or TOML (default {QUALITY_RECIPE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="recipe override for both sides, e.g. model.preset=small (repeatable)")
    p.add_argument("--budget-min", type=float, default=30.0,
                   help="pretraining wall-clock budget per side, minutes of training (default 30)")
    p.add_argument("--calibrate-steps", type=int, default=20,
                   help="steps each side is timed for to size its run (default 20)")
    p.add_argument("--evals", type=int, default=10,
                   help="held-out evaluations per pretraining run, besides the one at step 0")
    p.add_argument("--eval-samples", type=int, default=1024,
                   help="held-out samples per evaluation, the same on both sides (default 1024)")
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--tasks", default=",".join(QUALITY_TASKS), help="comma list of GLUE tasks")
    p.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds (default 1,2,3)")
    p.add_argument("--lr", default="1e-4", help="fine-tuning learning rate(s), comma list "
                   "(default 1e-4, Turc et al.'s rate for small BERTs)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch")
    p.add_argument("--max-train-samples", type=int, default=2000,
                   help="fine-tuning examples per task (default 2000; 0: all)")
    p.add_argument("--max-eval-samples", type=int, default=0, help="dev examples (0: all)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every stage (default: the machine's cores)")
    p.set_defaults(func=_quality)


def _quality(args: argparse.Namespace) -> int:
    from bertscale.bench.quality import QualityConfig, run

    run(_config(QualityConfig, args, tasks=parse_list(args.tasks, str, "--tasks"),
                seeds=parse_list(args.seeds, int, "--seeds")))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.bench model ...`: the same as `bertscale bench model ...`."""
    from bertscale.commands import run_subcommand
    return run_subcommand("bench", argv)


if __name__ == "__main__":
    sys.exit(main())
