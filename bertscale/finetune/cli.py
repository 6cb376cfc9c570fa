"""`bertscale finetune glue|squad|swag|ner`: the paper's fine-tuning recipes from a bertscale or
Hugging Face checkpoint.

Defaults are the paper's (Devlin et al. 2018, Sections 4.1-4.4): GLUE batch 32, 3 epochs, the
best of lr 5e-5/4e-5/3e-5/2e-5 on dev; SQuAD v1.1 3 epochs, lr 5e-5, batch 32; SQuAD v2.0
2 epochs, lr 5e-5, batch 48; SWAG 3 epochs, lr 2e-5, batch 16. Warmup is 10% of the steps.
NER: see `bertscale finetune ner --help`.
"""
# Every parser lives here and imports nothing heavy: a task's module (and torch) is imported only
# when that task runs, so `bertscale --help` stays fast. (The docstring above is the command's
# --help text: notes for developers go here, not there.)

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bertscale.commands import parse_list
from bertscale.errors import UserError

_RECIPES: dict[str, dict[str, Any]] = {
    "glue": {"lr": "5e-5,4e-5,3e-5,2e-5", "epochs": 3.0, "batch_size": 32},
    "squad1.1": {"lr": "5e-5", "epochs": 3.0, "batch_size": 32},
    "squad2.0": {"lr": "5e-5", "epochs": 2.0, "batch_size": 48},
    "swag": {"lr": "2e-5", "epochs": 3.0, "batch_size": 16},
    # NER fine-tuning: the paper's fine-tuning ranges; feature mode: the tagger trains from
    # scratch on fixed features, so a larger lr and more epochs.
    "ner-finetune": {"lr": "5e-5", "epochs": 3.0, "batch_size": 32},
    "ner-feature": {"lr": "1e-3", "epochs": 10.0, "batch_size": 32},
}

NER_DESCRIPTION = """\
Named entity recognition on CoNLL-2003 files: `bertscale finetune ner`, in the paper's two
ways (Devlin et al. 2018, Section 5.3).

Data: the CoNLL-2003 layout. One token per line, whitespace-separated columns, the word first and
its tag last (`EU NNP B-NP B-ORG`, or just `EU B-ORG`); a blank line ends a sentence;
`-DOCSTART-` lines are document separators, not tokens. Tags are O or B-/I-/E-/S-<TYPE>, in any
scheme (IOB1 as the original files, IOB2/BIO, IOBES). With `--tag-scheme iob2` (the default) the
training tags are rewritten to IOB2 first, so that every entity opens with a B- the classifier can
learn; `keep` trains on the tags as written.

Modes:
  finetune  BertForTokenClassification: every word is split into word pieces and only the FIRST
            piece of each word carries its label (the others and [CLS] / [SEP] are ignored by
            the loss); a word's prediction is the argmax at its first piece, as the paper does
            (no CRF). The whole model is trained (AdamW, warmup, linear decay).
  feature   BERT stays frozen: the features of each word's first piece (`--layers`, default the
            paper's best, concat-last-four) are computed ONCE with `bertscale.embed`'s extractor
            and a small tagger is trained on them: the paper's two-layer BiLSTM (`--tagger
            bilstm`, 768 units per direction by default) or a linear layer (`--tagger linear`).
            Every learning rate and seed of the grid reuses the same features.

Scores (`bertscale.finetune.seqeval`): entity-level precision / recall / F1 with the conlleval
definition, per entity type too, and token accuracy (tags compared in the training scheme).
The dev F1 picks the learning rate, as in the paper; `--test-file` is scored with the chosen run.

Output: OUTPUT_DIR/NER (or NER-feature)/results.json, runs/lr<lr>-seed<seed>/ with
dev_predictions.txt (and test_predictions.txt): `word gold predicted` per line, a blank line
between sentences, gold written in the training scheme, which conlleval scores as is.
--save-model (finetune mode) also writes runs/<run>/model with its labels and tag scheme;
`--eval-only --checkpoint <that folder>` re-scores --dev-file (and --test-file) without
--train-file, and `bertscale finetune predict` tags a new file (word<TAB>tag lines).

Limits, stated honestly:
- Sentences are encoded alone, without document context. Words past --max-seq-length word
  pieces get no prediction and are scored as O (counted and warned about).
- Feature mode holds the features of every train/dev/test word in memory (fp32): CoNLL-2003's
  ~300k words x 4096 (BERT-Large, four layers) is ~5 GB; use fewer layers for less.
- One process per device; several under a launcher train data-parallel (docs/finetuning.md).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune on GLUE, SQuAD v1.1/v2.0, SWAG or CoNLL-2003 NER",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="finetune_task", metavar="TASK")
    tasks.required = True

    g = tasks.add_parser("glue", help="a GLUE task (or several) from the GLUE TSV files")
    _common(g, "glue", save_model=True, eval_what="the first N examples of each dev file")
    g.add_argument("--task", required=True,
                   help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI; a comma list; "
                        "or 'all' (every task with a training set under --data-dir)")
    g.add_argument("--data-dir", type=Path, required=True,
                   help="the GLUE folder holding <Task>/train.tsv ... (or one task's folder), "
                        "or Hugging Face's GLUE: <config>/train-*.parquet ... (cola, sst2, mnli, "
                        "...) or a save_to_disk folder")
    g.add_argument("--max-seq-length", type=int, default=128,
                   help="word pieces per pair, truncated longest-first (default: 128)")
    g.add_argument("--no-test", action="store_true", help="skip the test-set predictions")
    g.set_defaults(func=_glue)

    s = tasks.add_parser("squad", help="SQuAD v1.1 or v2.0 from the official JSON files")
    _common(s, "squad", save_model=True, eval_what=(
        "the first N questions of --predict-file; predictions.json then holds only those, and "
        "OUTPUT_DIR/<task>/predict_subset.json (the same N questions in the official layout) "
        "is what the printed score is computed against: give it, not the full file, to the "
        "official evaluate script"))
    s.add_argument("--version", required=True, choices=("1.1", "2.0"),
                   help="the SQuAD version of the files (v2.0 has unanswerable questions)")
    s.add_argument("--train-file", type=Path,
                   help="e.g. train-v1.1.json, or Hugging Face's train-00000-of-00001.parquet "
                        "(not with --eval-only)")
    s.add_argument("--predict-file", type=Path, required=True,
                   help="e.g. dev-v1.1.json, or Hugging Face's validation-00000-of-00001.parquet")
    s.add_argument("--max-seq-length", type=int, default=384,
                   help="word pieces per window (default: 384)")
    s.add_argument("--doc-stride", type=int, default=128,
                   help="tokens between window starts over a long context (default: 128)")
    s.add_argument("--max-query-length", type=int, default=64,
                   help="question word pieces kept (default: 64)")
    s.add_argument("--n-best-size", type=int, default=20,
                   help="start/end candidates per window when decoding (default: 20)")
    s.add_argument("--max-answer-length", type=int, default=30,
                   help="longest answer in tokens (default: 30)")
    s.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                   help="v2.0: answer '' when null score - best span score exceeds this "
                        "(default: 0.0)")
    s.add_argument("--write-nbest", action="store_true", help="also write nbest_predictions.json")
    s.set_defaults(func=_squad)

    w = tasks.add_parser("swag", help="SWAG from the official train/val/test CSV files")
    _common(w, "swag", save_model=True, eval_what="the first N val.csv examples")
    w.add_argument("--data-dir", type=Path, required=True, help="folder with train.csv, val.csv "
                   "and optionally test.csv, or Hugging Face's SWAG (regular/train-*.parquet, "
                   "validation, test)")
    w.add_argument("--max-seq-length", type=int, default=128,
                   help="word pieces per context + ending (default: 128)")
    w.add_argument("--no-test", action="store_true", help="skip the test-set predictions")
    w.set_defaults(func=_swag)

    n = tasks.add_parser("ner", help="named entity recognition from CoNLL-2003-style files",
                         description=NER_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(n, "ner", save_model=True,
            eval_what="the first N sentences of --dev-file (and --test-file)")
    n.add_argument("--train-file", type=Path, help="e.g. eng.train (not with --eval-only)")
    n.add_argument("--dev-file", type=Path, required=True, help="e.g. eng.testa")
    n.add_argument("--test-file", type=Path, help="e.g. eng.testb (scored, not used to choose)")
    n.add_argument("--mode", default="finetune", choices=("finetune", "feature"),
                   help="finetune the whole model, or train a tagger on frozen BERT features "
                        "(default: finetune)")
    n.add_argument("--max-seq-length", type=int, default=256,
                   help="word pieces per sentence (default: 256)")
    n.add_argument("--tag-scheme", default="iob2", choices=("iob2", "keep"),
                   help="train on IOB2 tags (default) or on the tags as written")
    f = n.add_argument_group("feature mode")
    f.add_argument("--layers", default="concat-last-four",
                   help="hidden states to use, as `bertscale embed --layers` (default: "
                        "concat-last-four, the paper's best)")
    f.add_argument("--layer-weights", help="weighted-sum: one comma-separated weight per layer")
    f.add_argument("--tagger", default="bilstm", choices=("bilstm", "linear"),
                   help="the paper's two-layer BiLSTM or one linear layer (default: bilstm)")
    f.add_argument("--tagger-hidden", type=int, default=768,
                   help="BiLSTM units per direction (default: 768)")
    f.add_argument("--tagger-layers", type=int, default=2, help="BiLSTM layers (default: 2)")
    f.add_argument("--tagger-dropout", type=float, default=0.5,
                   help="dropout on the features and between layers (default: 0.5)")
    n.set_defaults(func=_ner)

    r = tasks.add_parser(
        "predict", help="predict a new file with a fine-tuned model (--save-model folder)",
        description="Write predictions for a new file with a model saved by `finetune "
                    "glue|squad|swag|ner --save-model`: its task, labels and lengths come from "
                    "the folder's bertscale_task.json. GLUE: a TSV in the task's test layout (an "
                    "index column and the text columns) -> the GLUE submission TSV "
                    "(index<TAB>prediction). SQuAD: a SQuAD JSON file (answers not needed) -> "
                    "predictions.json ({id: answer}; v2.0 also null_odds.json beside it). SWAG: "
                    "a CSV in the official layout (label not needed) -> index,pred (the chosen "
                    "ending 0-3 per example id). NER: a CoNLL-style file (the word first on each "
                    "line, other columns ignored) -> word<TAB>predicted tag lines, a blank line "
                    "between sentences.")
    r.add_argument("--checkpoint", type=Path, required=True,
                   help="the fine-tuned model folder (OUTPUT_DIR/<task>/runs/<run>/model)")
    r.add_argument("--input", type=Path, required=True, help="the file to predict")
    r.add_argument("--output", type=Path, required=True, help="the prediction file to write")
    r.add_argument("--eval-batch-size", type=int, default=64, help="default: 64")
    r.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="default: auto, which is bf16 (or fp16) on a GPU, fp32 on the CPU")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    r.add_argument("--progress", default="auto", choices=("auto", "bar", "plain"),
                   help="a progress bar on a terminal, a closing line otherwise (default: auto)")
    r.add_argument("--verbose", action="store_true", help="show third-party library messages")
    r.set_defaults(func=_predict)


_RECIPE_NAMES = {"glue": "glue", "squad": "squad1.1", "swag": "swag", "ner": "ner-finetune"}


def _lr_help(family: str) -> str:
    if family == "squad":
        grids = f"{_RECIPES['squad1.1']['lr']} (v1.1), {_RECIPES['squad2.0']['lr']} (v2.0)"
    elif family == "ner":
        grids = (f"{_RECIPES['ner-finetune']['lr']} (--mode finetune), "
                 f"{_RECIPES['ner-feature']['lr']} (--mode feature)")
    else:
        grids = _RECIPES[family]["lr"]
    n = len(_RECIPES[_RECIPE_NAMES[family]]["lr"].split(","))
    cost = f": {n} runs per seed" if n > 1 else ""
    return f"learning rate(s), comma-separated (default: {grids}{cost})"


def _default_help(family: str, key: str) -> str:
    if family == "squad":
        return f"{_RECIPES['squad1.1'][key]:g} (v1.1), {_RECIPES['squad2.0'][key]:g} (v2.0)"
    if family == "ner":
        return (f"{_RECIPES['ner-finetune'][key]:g} (finetune), "
                f"{_RECIPES['ner-feature'][key]:g} (feature)")
    return f"{_RECIPES[family][key]:g}"


def _common(p: argparse.ArgumentParser, family: str, save_model: bool = False,
            eval_what: str = "the first N dev examples") -> None:
    """Flags every task shares (bertscale.finetune.ner uses them too)."""
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a local Hugging Face BERT folder or a bertscale run / checkpoint "
                        "folder; Hub names are not downloaded (with --eval-only: a fine-tuned "
                        "model folder written by --save-model)")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="results.json and prediction files go to OUTPUT_DIR/<task>/")
    p.add_argument("--lr", help=_lr_help(family))
    p.add_argument("--seeds", default="1",
                   help="comma-separated seeds; mean ± std over them is reported (default: 1)")
    p.add_argument("--epochs", type=float, help=f"default: {_default_help(family, 'epochs')}")
    p.add_argument("--batch-size", type=int,
                   help=f"the global batch (default: {_default_help(family, 'batch_size')})")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="warmup fraction of the steps (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW (default: 0.01)")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps per run")
    p.add_argument("--eval-batch-size", type=int, default=64, help="default: 64")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="default: auto, which is bf16 (or fp16) on a GPU, fp32 on the CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--max-train-samples", type=int, help="use the first N training examples")
    p.add_argument("--max-eval-samples", type=int, help=f"score only {eval_what}")
    p.add_argument("--log-every", type=int, default=50,
                   help="the progress line's loss is the mean of the last N steps; without a "
                        "terminal, a line every N steps (default: 50)")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "plain"),
                   help="a progress bar with ETA on a terminal, plain lines otherwise "
                        "(default: auto, which picks by the terminal)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                   help="log each run to Weights & Biases, offline without an API key "
                        "(default: off)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events to each run folder")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save each run's training state every N steps; a re-run continues it "
                        "(finished runs are always skipped; default: 0, never)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete OUTPUT_DIR/<task>/ when it holds results of other settings "
                        "(default: refuse)")
    p.add_argument("--verbose", action="store_true",
                   help="show third-party library messages (DeepSpeed, transformers, W&B)")
    if family in ("glue", "squad", "swag", "ner"):
        p.add_argument("--eval-only", action="store_true",
                       help="no training: score the dev data with the fine-tuned model in "
                            "--checkpoint (a --save-model folder: its task, labels and lengths)")
    fast = p.add_argument_group("fast paths (off by default; same results, see docs/finetuning.md)")
    fast.add_argument("--unpad", action="store_true",
                      help="run the encoder on the real tokens only: no work on padding")
    fast.add_argument("--compile", action="store_true",
                      help="torch.compile the encoder layers (eager, with a warning, on failure)")
    fast.add_argument("--checkpoint-activations", action="store_true",
                      help="recompute each layer in the backward: less memory, more time")
    if save_model:
        p.add_argument("--save-model", action="store_true",
                       help="also write each run's fine-tuned model (Hugging Face folder, head "
                            "included, with its task in bertscale_task.json) to "
                            "OUTPUT_DIR/<task>/runs/<run>/model")


def _train_config(args: argparse.Namespace, recipe: str):
    from bertscale.finetune.common import TrainConfig
    from bertscale.parallelize import FastPaths
    r = _RECIPES[recipe]
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--max-steps", args.max_steps), ("--eval-batch-size", args.eval_batch_size)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value:g}")
    for name in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size",
                 "max_answer_length", "max_train_samples", "max_eval_samples", "tagger_hidden",
                 "tagger_layers"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.warmup < 1:
        raise UserError(f"--warmup is a fraction in [0, 1), got {args.warmup:g}")
    lrs = parse_list(args.lr or r["lr"], float, "--lr")
    if any(lr <= 0 for lr in lrs):
        raise UserError(f"--lr {args.lr}: learning rates must be positive")
    fast = FastPaths(unpad=args.unpad, compile=args.compile,
                     checkpoint_activations=args.checkpoint_activations)
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 or positive, got {args.checkpoint_every}")
    from bertscale.reporting import quiet_third_party
    quiet_third_party(args.verbose)
    cfg = TrainConfig(epochs=args.epochs or r["epochs"], batch_size=args.batch_size or r["batch_size"],
                      warmup=args.warmup, weight_decay=args.weight_decay, max_steps=args.max_steps,
                      eval_batch_size=args.eval_batch_size, precision=args.precision,
                      device=args.device, log_every=args.log_every, fast=fast,
                      progress=args.progress, wandb=args.wandb, tensorboard=args.tensorboard,
                      checkpoint_every=args.checkpoint_every, overwrite=args.overwrite)
    return cfg, lrs, parse_list(args.seeds, int, "--seeds")


def _glue(args: argparse.Namespace) -> int:
    from bertscale.finetune import common, glue
    cfg, lrs, seeds = _train_config(args, "glue")
    if args.task.lower() == "all":
        names = glue.tasks_in(args.data_dir)
        if not names:
            raise UserError(f"{args.data_dir}: no <Task>/train.tsv (nor Hugging Face's "
                            f"<config>/train-*.parquet) for any GLUE task")
    else:
        names = [glue.task_by_name(t.strip()).name for t in args.task.split(",") if t.strip()]
    lines = []
    for name in names:
        summary = glue.run(glue.GlueArgs(
            task=name, data_dir=args.data_dir, checkpoint=args.checkpoint,
            output_dir=args.output_dir, lrs=lrs, seeds=seeds, train=cfg,
            max_seq_length=args.max_seq_length, max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples, predict_test=not args.no_test,
            save_model=args.save_model, eval_only=args.eval_only))
        if args.eval_only:
            continue
        lines.append(common.console_line(summary, glue.TASKS[name].metric_names,
                                         summary["seconds"]))
    if len(lines) > 1 and common.ranks().is_main:
        print("\n".join(["GLUE summary:"] + lines), flush=True)
    return 0


def _squad(args: argparse.Namespace) -> int:
    from bertscale.finetune import squad
    cfg, lrs, seeds = _train_config(args, f"squad{args.version}")
    if args.train_file is None and not args.eval_only:
        raise UserError("--train-file is required (unless --eval-only)")
    squad.run(squad.SquadArgs(
        version=args.version, train_file=args.train_file, predict_file=args.predict_file,
        checkpoint=args.checkpoint, output_dir=args.output_dir, lrs=lrs, seeds=seeds, train=cfg,
        max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
        max_query_length=args.max_query_length, n_best_size=args.n_best_size,
        max_answer_length=args.max_answer_length,
        null_score_diff_threshold=args.null_score_diff_threshold,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        write_nbest=args.write_nbest, save_model=args.save_model, eval_only=args.eval_only))
    return 0


def _swag(args: argparse.Namespace) -> int:
    from bertscale.finetune import swag
    cfg, lrs, seeds = _train_config(args, "swag")
    swag.run(swag.SwagArgs(
        data_dir=args.data_dir, checkpoint=args.checkpoint, output_dir=args.output_dir,
        lrs=lrs, seeds=seeds, train=cfg, max_seq_length=args.max_seq_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        predict_test=not args.no_test, save_model=args.save_model, eval_only=args.eval_only))
    return 0


def _ner(args: argparse.Namespace) -> int:
    if not 0 <= args.tagger_dropout < 1:
        raise UserError(f"--tagger-dropout is a probability in [0, 1), got {args.tagger_dropout:g}")
    from bertscale.finetune import ner
    cfg, lrs, seeds = _train_config(args, f"ner-{args.mode}")
    weights = (parse_list(args.layer_weights, float, "--layer-weights")
               if args.layer_weights else None)
    ner.run(ner.NerArgs(
        train_file=args.train_file, dev_file=args.dev_file, test_file=args.test_file,
        checkpoint=args.checkpoint, output_dir=args.output_dir, mode=args.mode, lrs=lrs,
        seeds=seeds, train=cfg, max_seq_length=args.max_seq_length, tag_scheme=args.tag_scheme,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        layers=args.layers, layer_weights=weights, tagger=args.tagger,
        tagger_hidden=args.tagger_hidden, tagger_layers=args.tagger_layers,
        tagger_dropout=args.tagger_dropout, save_model=args.save_model,
        eval_only=args.eval_only))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from bertscale.finetune import common
    from bertscale.reporting import quiet_third_party
    if args.eval_batch_size <= 0:
        raise UserError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")
    quiet_third_party(args.verbose)
    cfg = common.TrainConfig(eval_batch_size=args.eval_batch_size, precision=args.precision,
                             device=args.device, progress=args.progress)
    common.ranks(cfg.device)
    family = (common.load_task_info(args.checkpoint) or {}).get("family")
    if family == "glue":
        from bertscale.finetune.glue import predict_file
    elif family == "squad":
        from bertscale.finetune.squad import predict_file
    elif family == "swag":
        from bertscale.finetune.swag import predict_file
    elif family == "ner":
        from bertscale.finetune.ner import predict_file
    else:
        raise UserError(f"{args.checkpoint}: not a model saved by `finetune --save-model` (no "
                        f"bertscale_task.json naming a glue, squad, swag or ner task)")
    out = predict_file(args.checkpoint, args.input, args.output, cfg)
    common.log(f"wrote {out}")
    return 0
