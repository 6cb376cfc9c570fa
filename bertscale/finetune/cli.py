"""`bertscale finetune glue|squad|swag|ner`: the paper's fine-tuning recipes from a bertscale or
Hugging Face checkpoint.

Defaults are the paper's (Devlin et al. 2018, Sections 4.1-4.4): GLUE batch 32, 3 epochs, the
best of lr 5e-5/4e-5/3e-5/2e-5 on dev; SQuAD v1.1 3 epochs, lr 5e-5, batch 32; SQuAD v2.0
2 epochs, lr 5e-5, batch 48; SWAG 3 epochs, lr 2e-5, batch 16. Warmup is 10% of the steps.
NER: see `bertscale finetune ner --help` (bertscale.finetune.ner).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bertscale.errors import UserError

_RECIPES: dict[str, dict[str, Any]] = {
    "glue": {"lr": "5e-5,4e-5,3e-5,2e-5", "epochs": 3.0, "batch_size": 32},
    "squad1.1": {"lr": "5e-5", "epochs": 3.0, "batch_size": 32},
    "squad2.0": {"lr": "5e-5", "epochs": 2.0, "batch_size": 48},
    "swag": {"lr": "2e-5", "epochs": 3.0, "batch_size": 16},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune on GLUE, SQuAD v1.1/v2.0, SWAG or CoNLL-2003 NER",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="finetune_task", metavar="TASK")
    tasks.required = True

    g = tasks.add_parser("glue", help="a GLUE task (or several) from the GLUE TSV files")
    _common(g, save_model=True)
    g.add_argument("--task", required=True,
                   help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI; a comma list; "
                        "or 'all' (every task folder with a train.tsv under --data-dir)")
    g.add_argument("--data-dir", type=Path, required=True,
                   help="the GLUE folder holding <Task>/train.tsv ... (or one task's folder)")
    g.add_argument("--max-seq-length", type=int, default=128)
    g.add_argument("--no-test", action="store_true", help="skip the test-set predictions")
    g.set_defaults(func=_glue)

    s = tasks.add_parser("squad", help="SQuAD v1.1 or v2.0 from the official JSON files")
    _common(s, save_model=True)
    s.add_argument("--version", required=True, choices=("1.1", "2.0"))
    s.add_argument("--train-file", type=Path, required=True, help="e.g. train-v1.1.json")
    s.add_argument("--predict-file", type=Path, required=True, help="e.g. dev-v1.1.json")
    s.add_argument("--max-seq-length", type=int, default=384)
    s.add_argument("--doc-stride", type=int, default=128)
    s.add_argument("--max-query-length", type=int, default=64)
    s.add_argument("--n-best-size", type=int, default=20)
    s.add_argument("--max-answer-length", type=int, default=30)
    s.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                   help="v2.0: answer '' when null score - best span score exceeds this")
    s.add_argument("--write-nbest", action="store_true", help="also write nbest_predictions.json")
    s.set_defaults(func=_squad)

    w = tasks.add_parser("swag", help="SWAG from the official train/val/test CSV files")
    _common(w, save_model=True)
    w.add_argument("--data-dir", type=Path, required=True, help="folder with train.csv, val.csv "
                   "and optionally test.csv")
    w.add_argument("--max-seq-length", type=int, default=128)
    w.add_argument("--no-test", action="store_true", help="skip the test-set predictions")
    w.set_defaults(func=_swag)

    # NER (CoNLL-2003) lives in its own module and adds its own parser.
    from bertscale.finetune.ner import register_ner
    register_ner(tasks)


def _common(p: argparse.ArgumentParser, save_model: bool = False) -> None:
    """Flags every task shares (bertscale.finetune.ner uses them too)."""
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a Hugging Face BERT folder or a bertscale run / checkpoint folder")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="results.json and prediction files go to OUTPUT_DIR/<task>/")
    p.add_argument("--lr", help="learning rate(s), comma-separated (default: the paper's)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds; mean ± std is reported")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per run")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-train-samples", type=int, help="use the first N training examples")
    p.add_argument("--max-eval-samples", type=int, help="score the first N dev examples")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    if save_model:
        p.add_argument("--save-model", action="store_true",
                       help="also write each run's fine-tuned model (Hugging Face folder, head "
                            "included) to OUTPUT_DIR/<task>/runs/<run>/model")


def _train_config(args: argparse.Namespace, recipe: str):
    from bertscale.finetune.common import TrainConfig, parse_list
    r = _RECIPES[recipe]
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--max-steps", args.max_steps), ("--eval-batch-size", args.eval_batch_size)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value:g}")
    for name in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size",
                 "max_answer_length", "max_train_samples", "max_eval_samples"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.warmup < 1:
        raise UserError(f"--warmup is a fraction in [0, 1), got {args.warmup:g}")
    lrs = parse_list(args.lr or r["lr"], float, "--lr")
    if any(lr <= 0 for lr in lrs):
        raise UserError(f"--lr {args.lr}: learning rates must be positive")
    cfg = TrainConfig(epochs=args.epochs or r["epochs"], batch_size=args.batch_size or r["batch_size"],
                      warmup=args.warmup, weight_decay=args.weight_decay, max_steps=args.max_steps,
                      eval_batch_size=args.eval_batch_size, precision=args.precision,
                      device=args.device, log_every=args.log_every)
    return cfg, lrs, parse_list(args.seeds, int, "--seeds")


def _glue(args: argparse.Namespace) -> int:
    from bertscale.finetune import glue
    cfg, lrs, seeds = _train_config(args, "glue")
    if args.task.lower() == "all":
        names = [t for t in glue.TASKS if (args.data_dir / t / "train.tsv").is_file()]
        if not names:
            raise UserError(f"{args.data_dir}: no <Task>/train.tsv for any GLUE task")
    else:
        names = [glue.task_by_name(t.strip()).name for t in args.task.split(",") if t.strip()]
    lines = []
    for name in names:
        summary = glue.run(glue.GlueArgs(
            task=name, data_dir=args.data_dir, checkpoint=args.checkpoint,
            output_dir=args.output_dir, lrs=lrs, seeds=seeds, train=cfg,
            max_seq_length=args.max_seq_length, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples, predict_test=not args.no_test,
            save_model=args.save_model))
        from bertscale.finetune.common import console_line
        lines.append(console_line(summary, glue.TASKS[name].metric_names, summary["seconds"]))
    if len(lines) > 1:
        print("\n".join(["GLUE summary:"] + lines), flush=True)
    return 0


def _squad(args: argparse.Namespace) -> int:
    from bertscale.finetune import squad
    cfg, lrs, seeds = _train_config(args, f"squad{args.version}")
    squad.run(squad.SquadArgs(
        version=args.version, train_file=args.train_file, predict_file=args.predict_file,
        checkpoint=args.checkpoint, output_dir=args.output_dir, lrs=lrs, seeds=seeds, train=cfg,
        max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
        max_query_length=args.max_query_length, n_best_size=args.n_best_size,
        max_answer_length=args.max_answer_length,
        null_score_diff_threshold=args.null_score_diff_threshold,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        write_nbest=args.write_nbest, save_model=args.save_model))
    return 0


def _swag(args: argparse.Namespace) -> int:
    from bertscale.finetune import swag
    cfg, lrs, seeds = _train_config(args, "swag")
    swag.run(swag.SwagArgs(
        data_dir=args.data_dir, checkpoint=args.checkpoint, output_dir=args.output_dir,
        lrs=lrs, seeds=seeds, train=cfg, max_seq_length=args.max_seq_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        predict_test=not args.no_test, save_model=args.save_model))
    return 0
