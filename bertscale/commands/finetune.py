"""`bertscale finetune glue|squad|swag|ner [RECIPE]`: the paper's fine-tuning recipes from a
bertscale or Hugging Face checkpoint.

A recipe is a TOML file or a built-in name (`--list` shows them; the default is the paper's:
GLUE batch 32, 3 epochs, the best of lr 5e-5/4e-5/3e-5/2e-5 on dev; SQuAD v1.1 3 epochs, lr
5e-5, batch 32; SQuAD v2.0 2 epochs, lr 5e-5, batch 48; SWAG 3 epochs, lr 2e-5, batch 16; warmup
10% of the steps). Every flag sets a recipe key (`--lr` is train.lr), as does `--set KEY=VALUE`;
`--print-config` shows the result. NER: see `bertscale finetune ner --help`.

Exit codes: 0 done; 2 bad input; 3 the loss became NaN/inf (one line; nothing saved from that
step on); 75 preempted (SIGTERM / SIGUSR1) after committing the run's checkpoint, and 130 after a
Ctrl-C: the same command continues the grid (finished runs are skipped, an unfinished one goes
on from its newest committed checkpoint).
"""
# Every parser lives here and imports nothing heavy: a task's module (and torch) is imported only
# when that task runs, so `bertscale --help` stays fast. (The docstring above is the command's
# --help text: notes for developers go here, not there.)

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertscale.commands.args import Subparsers, parse_list
from bertscale.errors import UserError
from bertscale.finetune import recipes
from bertscale.config import parse_override
from bertscale.finetune.recipe import FAMILIES, FinetuneRecipe

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

# flag -> (recipe key, how argparse reads it). The flags every family shares, then each family's.
Flag = tuple[str, dict[str, Any]]
COMMON: dict[str, Flag] = {
    "--checkpoint": ("pretrained", {"type": Path}),
    "--output-dir": ("output_dir", {"type": Path}),
    "--lr": ("train.lr", {}),
    "--seeds": ("train.seeds", {}),
    "--epochs": ("train.epochs", {"type": float}),
    "--batch-size": ("train.batch_size", {"type": int}),
    "--warmup": ("train.warmup", {"type": float}),
    "--weight-decay": ("train.weight_decay", {"type": float}),
    "--max-steps": ("train.max_steps", {"type": int}),
    "--eval-batch-size": ("train.eval_batch_size", {"type": int}),
    "--precision": ("train.precision", {"choices": ("auto", "fp32", "bf16", "fp16")}),
    "--device": ("train.device", {}),
    "--max-train-samples": ("data.max_train_samples", {"type": int}),
    "--max-eval-samples": ("data.max_eval_samples", {"type": int}),
    "--log-every": ("logging.every", {"type": int}),
    "--progress": ("logging.progress", {"choices": ("auto", "bar", "plain")}),
    "--wandb": ("logging.wandb", {"action": argparse.BooleanOptionalAction}),
    "--tensorboard": ("logging.tensorboard", {"action": "store_const", "const": True}),
    "--checkpoint-every": ("checkpoint.every", {"type": int, "metavar": "N"}),
    "--overwrite": ("output.overwrite", {"action": "store_const", "const": True}),
    "--save-model": ("output.save_model", {"action": "store_const", "const": True}),
    "--unpad": ("fast.unpad", {"action": "store_const", "const": True}),
    "--compile": ("fast.compile", {"action": "store_const", "const": True}),
    "--checkpoint-activations": ("fast.checkpoint_activations",
                                 {"action": "store_const", "const": True}),
}
_NO_TEST: Flag = ("data.predict_test", {"action": "store_const", "const": False})
FAMILY: dict[str, dict[str, Flag]] = {
    "glue": {"--task": ("data.task", {}), "--data-dir": ("data.data_dir", {"type": Path}),
             "--max-seq-length": ("data.max_seq_length", {"type": int}), "--no-test": _NO_TEST},
    "squad": {"--version": ("data.version", {"choices": ("1.1", "2.0")}),
              "--train-file": ("data.train_file", {"type": Path}),
              "--predict-file": ("data.predict_file", {"type": Path}),
              "--max-seq-length": ("data.max_seq_length", {"type": int}),
              "--doc-stride": ("data.doc_stride", {"type": int}),
              "--max-query-length": ("data.max_query_length", {"type": int}),
              "--n-best-size": ("decode.n_best_size", {"type": int}),
              "--max-answer-length": ("decode.max_answer_length", {"type": int}),
              "--null-score-diff-threshold": ("decode.null_score_diff_threshold",
                                              {"type": float}),
              "--write-nbest": ("decode.write_nbest", {"action": "store_const", "const": True})},
    "swag": {"--data-dir": ("data.data_dir", {"type": Path}),
             "--max-seq-length": ("data.max_seq_length", {"type": int}), "--no-test": _NO_TEST},
    "ner": {"--train-file": ("data.train_file", {"type": Path}),
            "--dev-file": ("data.dev_file", {"type": Path}),
            "--test-file": ("data.test_file", {"type": Path}),
            "--mode": ("ner.mode", {"choices": ("finetune", "feature")}),
            "--max-seq-length": ("data.max_seq_length", {"type": int}),
            "--tag-scheme": ("data.tag_scheme", {"choices": ("iob2", "keep")}),
            "--layers": ("ner.layers", {}), "--layer-weights": ("ner.layer_weights", {}),
            "--tagger": ("ner.tagger", {"choices": ("bilstm", "linear")}),
            "--tagger-hidden": ("ner.tagger_hidden", {"type": int}),
            "--tagger-layers": ("ner.tagger_layers", {"type": int}),
            "--tagger-dropout": ("ner.tagger_dropout", {"type": float})},
}
LISTS = {"train.lr": float, "train.seeds": int, "ner.layer_weights": float}
"""Keys whose flag takes a comma-separated list."""

HELP: dict[str, str] = {
    "pretrained": "a local Hugging Face BERT folder or a bertscale run / checkpoint folder; Hub "
                  "names are not downloaded (with --eval-only: a fine-tuned model folder written "
                  "by --save-model)",
    "output_dir": "results.json and prediction files go to OUTPUT_DIR/<task>/",
    "train.seeds": "comma-separated seeds; mean ± std over them is reported",
    "train.epochs": "passes over the training set",
    "train.batch_size": "the global batch",
    "train.warmup": "warmup fraction of the steps",
    "train.weight_decay": "AdamW's weight decay",
    "train.max_steps": "cap on optimizer steps per run (0: none)",
    "train.eval_batch_size": "examples per prediction batch",
    "train.precision": "auto is bf16 (or fp16) on a GPU, fp32 on the CPU",
    "train.device": "auto, cpu, cuda or cuda:N",
    "data.max_train_samples": "use the first N training examples (0: all)",
    "logging.every": "the progress line's loss is the mean of the last N steps; without a "
                     "terminal, a line every N steps",
    "logging.progress": "a progress bar with ETA on a terminal, plain lines otherwise (auto "
                        "picks by the terminal)",
    "logging.wandb": "log each run to Weights & Biases, offline without an API key",
    "logging.tensorboard": "also write TensorBoard events to each run folder",
    "checkpoint.every": "also commit each run's checkpoint every N steps (one is always "
                        "committed when preempted); a re-run continues it; finished runs are "
                        "always skipped",
    "output.overwrite": "delete OUTPUT_DIR/<task>/ when it holds results of other settings "
                        "(default: refuse)",
    "output.save_model": "also write each run's fine-tuned model (Hugging Face folder, head "
                         "included, with its task in bertscale_task.json) to "
                         "OUTPUT_DIR/<task>/runs/<run>/model",
    "fast.unpad": "run the encoder on the real tokens only: no work on padding",
    "fast.compile": "torch.compile the encoder layers (eager, with a warning, on failure)",
    "fast.checkpoint_activations": "recompute each layer in the backward: less memory, more "
                                   "time",
    "data.task": "CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI; a comma list; or 'all' "
                 "(every task with a training set under --data-dir)",
    "data.predict_test": "skip the test-set predictions",
    "data.version": "the SQuAD version of the files (v2.0 has unanswerable questions); picks "
                    "the paper's recipe for it",
    "data.train_file": "the training file (not with --eval-only)",
    "data.predict_file": "e.g. dev-v1.1.json, or Hugging Face's "
                         "validation-00000-of-00001.parquet",
    "data.doc_stride": "tokens between window starts over a long context",
    "data.max_query_length": "question word pieces kept",
    "decode.n_best_size": "start/end candidates per window when decoding",
    "decode.max_answer_length": "longest answer in tokens",
    "decode.null_score_diff_threshold": "v2.0: answer '' when null score - best span score "
                                        "exceeds this",
    "decode.write_nbest": "also write nbest_predictions.json",
    "data.dev_file": "e.g. eng.testa",
    "data.test_file": "e.g. eng.testb (scored, not used to choose)",
    "ner.mode": "finetune the whole model, or train a tagger on frozen BERT features (picks "
                "the recipe for it)",
    "data.tag_scheme": "train on IOB2 tags or on the tags as written",
    "ner.layers": "hidden states to use, as `bertscale embed --layers`",
    "ner.layer_weights": "weighted-sum: one comma-separated weight per layer",
    "ner.tagger": "the paper's two-layer BiLSTM or one linear layer",
    "ner.tagger_hidden": "BiLSTM units per direction",
    "ner.tagger_layers": "BiLSTM layers",
    "ner.tagger_dropout": "dropout on the features and between layers",
}
DATA_HELP = {"glue": {"data.data_dir": "the GLUE folder holding <Task>/train.tsv ... (or one "
                                       "task's folder), or Hugging Face's GLUE: "
                                       "<config>/train-*.parquet ... or a save_to_disk folder",
                      "data.max_seq_length": "word pieces per pair, truncated longest-first",
                      "data.max_eval_samples": "score only the first N examples of each dev "
                                               "file"},
             "squad": {"data.max_seq_length": "word pieces per window",
                       "data.max_eval_samples": "the first N questions of --predict-file; "
                                                "predictions.json then holds only those, and "
                                                "OUTPUT_DIR/<task>/predict_subset.json (the same "
                                                "N questions in the official layout) is what "
                                                "the printed score is computed against"},
             "swag": {"data.data_dir": "folder with train.csv, val.csv and optionally test.csv, "
                                       "or Hugging Face's SWAG",
                      "data.max_seq_length": "word pieces per context + ending",
                      "data.max_eval_samples": "the first N val.csv examples"},
             "ner": {"data.max_seq_length": "word pieces per sentence",
                     "data.max_eval_samples": "the first N sentences of --dev-file (and "
                                              "--test-file)"}}


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune on GLUE, SQuAD v1.1/v2.0, SWAG or CoNLL-2003 NER",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="finetune_task", metavar="TASK")
    tasks.required = True
    helps = {"glue": "a GLUE task (or several) from the GLUE TSV files",
             "squad": "SQuAD v1.1 or v2.0 from the official JSON files",
             "swag": "SWAG from the official train/val/test CSV files",
             "ner": "named entity recognition from CoNLL-2003-style files"}
    for family in FAMILIES:
        kwargs: dict[str, Any] = {}
        if family == "ner":
            kwargs = {"description": NER_DESCRIPTION,
                      "formatter_class": argparse.RawDescriptionHelpFormatter}
        _task_parser(tasks.add_parser(family, help=helps[family], **kwargs), family)
    _predict_parser(tasks)


def _task_parser(p: argparse.ArgumentParser, family: str) -> None:
    p.add_argument("recipe", nargs="?",
                   help=f"recipe TOML file or built-in name (default: the paper's, "
                        f"{' or '.join(recipes.builtin_names(family))}; --list shows them)")
    p.add_argument("--list", action="store_true", help="list the built-in recipes and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (after the flags and --set) and exit")
    p.add_argument("--set", dest="overrides", action="append", metavar="A.B=VALUE",
                   help="set a recipe key, e.g. --set train.epochs=2 (repeatable; wins over the "
                        "flags)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: score the dev data with the fine-tuned model in "
                        "--checkpoint (a --save-model folder: its task, labels and lengths)")
    p.add_argument("--verbose", action="store_true",
                   help="show third-party library messages (DeepSpeed, transformers, W&B)")
    fast = None
    for flag, (key, how) in {**COMMON, **FAMILY[family]}.items():
        text = _flag_help(family, flag, key)
        if key.startswith("fast."):
            fast = fast or p.add_argument_group(
                "fast paths (off by default; same results, see docs/finetuning.md)")
            fast.add_argument(flag, dest=key, default=None, help=text, **how)
        else:
            p.add_argument(flag, dest=key, default=None, help=text, **how)
    p.set_defaults(func=functools.partial(_handle, family=family))


@functools.cache
def _default(family: str, key: str) -> str:
    return recipes.describe_defaults(family, key)


def _flag_help(family: str, flag: str, key: str) -> str:
    text = DATA_HELP[family].get(key) or HELP.get(key) or ""
    if key == "train.lr":
        n = max(len(recipes.load_recipe(family, name).train.lr)
                for name in recipes.builtin_names(family))
        cost = f": {n} runs per seed" if n > 1 else ""
        text = f"learning rate(s), comma-separated (default: {_default(family, key)}{cost})"
    elif key not in ("pretrained", "output_dir", "data.task") and "default" not in text:
        shown = _default(family, key)
        if shown not in ("None", "", "False", "[]"):
            text += f" (default: {shown})"
    return f"{text} [{key}]"


def _predict_parser(tasks: Subparsers) -> None:
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


# ------------------------------------------------------------------------------ the recipe


class Spelling:
    """How the user spelled each recipe key: the flag it has in this command, unless the user
    set it by its key (a recipe file of theirs, --set). Messages name it so."""

    def __init__(self, family: str, keyed: set[str], overrides: list[str] | None = None,
                 origin: str = ""):
        self.flags = {key: flag for flag, (key, _) in {**COMMON, **FAMILY[family]}.items()}
        self.keyed, self.overrides, self.origin = keyed, overrides or [], origin

    def __call__(self, key: str) -> str:
        return key if key in self.keyed else self.flags.get(key, key)

    def blame(self, text: str) -> str:
        """A check's message about a key the user set by its key, prefixed with where: the
        `--set` that set it (as pretraining's errors), or their recipe file."""
        for o in self.overrides:
            if _names(text, ".".join(parse_override(o)[0])):
                return f"--set {o} (over {self.origin}): {text}"
        if any(_names(text, key) for key in self.keyed):
            return f"{self.origin}: {text}"
        return text

    def message(self, text: str) -> str:
        """`text` with every key the user knows by its flag spelled as that flag."""
        for key in sorted(self.flags, key=len, reverse=True):
            if key not in self.keyed:
                text = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w])", self.flags[key], text)
        return text


def _names(text: str, key: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(key)}(?![\w])", text) is not None


def load(args: argparse.Namespace, family: str) -> tuple[FinetuneRecipe, Spelling]:
    """The recipe the command line asks for: RECIPE (or the family's paper recipe), the flags
    given, then --set."""
    values: dict[str, Any] = {}
    for flag, (key, _) in {**COMMON, **FAMILY[family]}.items():
        value = getattr(args, key)
        if value is None:
            continue
        if key in LISTS:
            value = parse_list(value, LISTS[key], flag)
        values[key] = str(value) if isinstance(value, Path) else value
    data, origin, builtin = recipes.read_source(args.recipe or _default_recipe(family, values))
    overrides = args.overrides or []
    spell = Spelling(family, set() if builtin else recipes.flat_keys(data), overrides, origin)
    spell.keyed |= {".".join(parse_override(o)[0]) for o in overrides}
    for key, value in values.items():
        node = data
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = value
    return recipes.load_recipe(family, data, overrides, origin), spell


def _default_recipe(family: str, values: dict[str, Any]) -> str:
    if family == "squad":
        if "data.version" not in values:
            raise UserError("give --version 1.1 or 2.0 (or a recipe: `bertscale finetune squad "
                            "--list`)")
        return f"squad_v{values['data.version']}"
    if family == "ner" and values.get("ner.mode") == "feature":
        return "ner_feature"
    return family


def _listing(family: str) -> str:
    from bertscale.commands.pretrain import _first_sentence as first_sentence

    lines = [f"built-in {family} recipes (bertscale finetune {family} NAME; files in "
             f"bertscale/recipes/finetune/):"]
    width = max(60, shutil.get_terminal_size().columns - 1)
    for name in recipes.builtin_names(family):
        text = recipes.builtin(name).read_text(encoding="utf-8")
        lines += textwrap.wrap(first_sentence(text), width, initial_indent=f"  {name:<14} ",
                               subsequent_indent=" " * 17, break_on_hyphens=False)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ running


def _handle(args: argparse.Namespace, family: str) -> int:
    if args.list:
        print(_listing(family))
        return 0
    recipe, spell = load(args, family)
    try:
        _check(recipe, family, args, spell)
    except UserError as e:   # named as the user wrote it: where a key was set, a flag, a key
        e.args = (spell.message(spell.blame(str(e))),)
        raise
    if args.print_config:
        print(json.dumps(recipe.to_dict(), indent=2, default=str))
        return 0
    try:
        return _run(recipe, family, args.eval_only, args.verbose)
    except UserError as e:
        e.args = (spell.message(str(e)),)
        raise


def _check(recipe: FinetuneRecipe, family: str, args: argparse.Namespace,
           spell: Spelling) -> None:
    """The recipe's checks; --print-config leaves out what only a run needs (paths)."""
    if family == "ner" and recipe.ner.mode == "feature" and (  # type: ignore[attr-defined]
            args.eval_only or recipe.output.save_model):
        raise UserError(f"{spell('output.save_model')} and --eval-only are for "
                        f"{spell('ner.mode')} finetune (feature mode's tagger is not saved)")
    recipe.validate(spell, eval_only=args.eval_only, runnable=not args.print_config)


def _run(recipe: FinetuneRecipe, family: str, eval_only: bool, verbose: bool) -> int:
    """Start the runtime (the process group of a launcher's ranks), run the grid or the
    re-scoring, end it. Training commands install the preemption handlers: SIGTERM / SIGUSR1 /
    Ctrl-C commit the run's checkpoint at the next read and exit 75 (130)."""
    from bertscale import distributed
    from bertscale.finetune import runtime
    from bertscale.reporting import quiet_third_party
    from bertscale.training.stop import StopTraining

    quiet_third_party(verbose)
    t = recipe.train
    rt = runtime.start(t.device, t.precision, recipe.logging.progress)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    if not eval_only:
        distributed.install_signal_handlers()
    try:
        return _dispatch(recipe, family, eval_only, rt)
    except StopTraining as stop:   # said why already, on every rank alike
        return stop.exit_code
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        runtime.stop()


def _dispatch(recipe: Any, family: str, eval_only: bool, rt: Any) -> int:
    if family == "glue":
        from bertscale.finetune import glue
        from bertscale.finetune.results import console_line
        lines = []
        for name in glue.task_names(recipe):
            if eval_only:
                glue.evaluate_saved(recipe, name, rt)
                continue
            summary = glue.run(recipe, name, rt)
            lines.append(console_line(summary, glue.TASKS[name].metric_names,
                                      summary["seconds"]))
        if len(lines) > 1 and rt.is_main:
            print("\n".join(["GLUE summary:"] + lines), flush=True)
        return 0
    module: Any
    if family == "squad":
        from bertscale.finetune import squad as module
    elif family == "swag":
        from bertscale.finetune import swag as module
    else:
        from bertscale.finetune import ner as module
    (module.evaluate_saved if eval_only else module.run)(recipe, rt)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from bertscale.finetune import runtime
    from bertscale.finetune.models import load_task_info
    from bertscale.reporting import quiet_third_party

    if args.eval_batch_size <= 0:
        raise UserError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")
    quiet_third_party(args.verbose)
    family = (load_task_info(args.checkpoint) or {}).get("family")
    predict_file: Callable[..., Path]
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
    rt = runtime.start(args.device, args.precision, args.progress)
    try:
        out = predict_file(args.checkpoint, args.input, args.output, rt, args.eval_batch_size)
    finally:
        runtime.stop()
    rt.log(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.finetune ...`: the same command, without importing the
    other subcommands."""
    from bertscale.commands import run_subcommand
    return run_subcommand("finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
