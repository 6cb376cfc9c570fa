"""SWAG: choose the right ending of a sentence among four, the paper's multiple-choice setup.

Reads the official CSV files of the swagaf release (train.csv, val.csv with a `label` column,
test.csv without): a leading unnamed index column, then video-id, fold-ind, startphrase, sent1,
sent2, gold-source, ending0..ending3[, label]. Standard CSV quoting (the files quote endings that
hold commas). Columns are found by name, so a file without the index column reads too. Or, when
the folder has no train.csv, Hugging Face's SWAG (allenai/swag, config `regular`): Parquet files
per split (train, validation, test; in the folder or its `regular/`) or a `save_to_disk` folder,
the same columns with the label a class index (-1 in test); an example's index is its row.

Each choice is encoded as ([CLS] sent1 [SEP] sent2 + " " + ending_i [SEP]), truncated
longest-first to --max-seq-length (128); BertForMultipleChoice scores each with a vector dotted
with its pooled [CLS] and the four scores go through one softmax (the paper's Section 4.4).
Metric: accuracy on val.csv (its predictions: val_predictions.csv, `index,pred,label`).
test.csv -> predictions.csv (`index,pred`: the file's index column, or the 0-based row when it
has none, and the chosen ending 0-3).

--save-model writes each run's model (head included) with bertscale_task.json; `--eval-only`
re-scores val.csv with such a folder (through the same prediction and scoring code as training,
so it reproduces the run's numbers), and `finetune predict` writes predictions.csv for any CSV in
this layout (its label column, if any, is ignored).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.errors import UserError
from bertscale.finetune import common
from bertscale.finetune import metrics as M

NUM_CHOICES = 4
_TEXT_COLUMNS = ("sent1", "sent2", *(f"ending{i}" for i in range(NUM_CHOICES)))


@dataclass
class SwagExample:
    index: str
    context: str
    start_ending: str
    endings: list[str]
    label: int | None


def read_swag(path: Path, labelled: bool) -> list[SwagExample]:
    """Read one official SWAG CSV; errors name the file, the line and the problem."""
    try:
        f = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{path}: the file is empty") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}:1: cannot read the CSV header ({e})") from None
        need = _TEXT_COLUMNS + (("label",) if labelled else ())
        missing = [c for c in need if c not in header]
        if missing:
            raise UserError(f"{path}:1: header lacks {', '.join(missing)} (it has: "
                            f"{', '.join(header)}); is this the official SWAG "
                            f"{'train/val' if labelled else 'test'} CSV?")
        col = {c: header.index(c) for c in need}
        has_index = header[0] == ""
        out: list[SwagExample] = []
        try:
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise UserError(f"{path}:{line}: {len(row)} fields, but the header has "
                                    f"{len(header)}")
                label = None
                if labelled:
                    raw = row[col["label"]]
                    if raw not in {str(i) for i in range(NUM_CHOICES)}:
                        raise UserError(f"{path}:{line}: label {raw!r} is not an ending number "
                                        f"0-{NUM_CHOICES - 1}")
                    label = int(raw)
                out.append(SwagExample(
                    index=row[0] if has_index else str(len(out)),
                    context=row[col["sent1"]], start_ending=row[col["sent2"]],
                    endings=[row[col[f"ending{i}"]] for i in range(NUM_CHOICES)], label=label))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise UserError(f"{path}: the file has no examples")
    return out


_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def read_split(folder: Path, name: str, labelled: bool) -> list[SwagExample] | None:
    """`name` (train, val or test) of a SWAG folder in either layout; None when it is absent."""
    from bertscale.data import tables

    csv_file = folder / f"{name}.csv"
    if csv_file.is_file() or (folder / "train.csv").is_file():
        return read_swag(csv_file, labelled) if csv_file.is_file() else None
    for cand in (folder / "regular", folder):
        files = tables.split_files(cand, _HF_SPLITS[name])
        if files:
            return read_swag_hf(files, labelled)
    return None


def read_swag_hf(files: list[Path], labelled: bool) -> list[SwagExample]:
    """One split of Hugging Face's SWAG (`regular`); errors name the file and the row."""
    from bertscale.data import tables

    columns = [*_TEXT_COLUMNS, "label"]
    out: list[SwagExample] = []
    for path in files:
        for row, values in tables.iter_rows(path, columns, "; is this SWAG's regular config?"):
            v = dict(zip(columns, values))
            if not all(isinstance(v[c], str) for c in _TEXT_COLUMNS):
                raise UserError(f"{path}: row {row}: a text column is empty (null)")
            label = None
            if labelled:
                if v["label"] not in range(NUM_CHOICES):
                    raise UserError(f"{path}: row {row}: label {v['label']!r} is not an ending "
                                    f"number 0-{NUM_CHOICES - 1}")
                label = int(v["label"])
            out.append(SwagExample(index=str(len(out)), context=v["sent1"],
                                   start_ending=v["sent2"],
                                   endings=[v[f"ending{i}"] for i in range(NUM_CHOICES)],
                                   label=label))
    if not out:
        raise UserError(f"{files[0]}: the split has no examples")
    return out


def _need_split(folder: Path, name: str, labelled: bool) -> list[SwagExample]:
    got = read_split(folder, name, labelled)
    if got is None:
        raise UserError(f"{folder}: no {name}.csv, nor Hugging Face's {_HF_SPLITS[name]} split "
                        f"({_HF_SPLITS[name]}-*.parquet here or in regular/)")
    return got


def featurize(tok: Any, examples: Sequence[SwagExample]) -> list[dict[str, Any]]:
    pairs = [(e.context, f"{e.start_ending} {ending}".strip())
             for e in examples for ending in e.endings]
    enc = tok.encode_batch(pairs)
    feats = []
    for i, e in enumerate(examples):
        choices = enc[i * NUM_CHOICES:(i + 1) * NUM_CHOICES]
        f: dict[str, Any] = {"input_ids": [c.ids for c in choices],
                             "token_type_ids": [c.type_ids for c in choices]}
        if e.label is not None:
            f["label"] = e.label
        feats.append(f)
    return feats


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(**common.model_inputs(batch)).float(), batch["label"])  # (B, 4)


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**common.model_inputs(batch))


@dataclass
class SwagArgs:
    data_dir: Path
    checkpoint: Path
    output_dir: Path
    lrs: list[float] = field(default_factory=lambda: [2e-5])
    seeds: list[int] = field(default_factory=lambda: [1])
    train: common.TrainConfig = field(default_factory=lambda: common.TrainConfig(batch_size=16))
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    predict_test: bool = True
    save_model: bool = False
    eval_only: bool = False


def predictions_csv(examples: Sequence[SwagExample], preds: np.ndarray,
                    with_label: bool = False) -> str:
    """`index,pred` (plus `label` for val_predictions.csv, to re-score or inspect)."""
    rows = ["index,pred" + (",label" if with_label else "")]
    rows += [f"{e.index},{int(p)}" + (f",{e.label}" if with_label else "")
             for e, p in zip(examples, preds)]
    return "\n".join(rows) + "\n"


def score_and_write(model: nn.Module, val: tuple[list[SwagExample], list[dict[str, Any]]],
                    test: tuple[list[SwagExample], list[dict[str, Any]]],
                    cfg: common.TrainConfig, pad_id: int, run_dir: Path) -> dict[str, float]:
    """Predict val (scored; val_predictions.csv) and test (predictions.csv) into `run_dir`;
    returns the val metrics. Training and --eval-only share it, which is why re-scoring a saved
    model gives the run's own numbers."""
    (val_ex, val_f), (test_ex, test_f) = val, test
    (logits,) = common.predict(model, val_f, logits_of, cfg, pad_id, what="val")
    gold = [f["label"] for f in val_f]
    metrics = {"accuracy": M.accuracy(logits.argmax(-1), gold)}
    _warn_one_ending(logits.argmax(-1), "val.csv", cfg, gold)
    common.write_text_on_main(run_dir / "val_predictions.csv",
                              predictions_csv(val_ex, logits.argmax(-1), with_label=True))
    if test_f:
        (logits,) = common.predict(model, test_f, logits_of, cfg, pad_id, what="test")
        _warn_one_ending(logits.argmax(-1), "test.csv", cfg)
        common.write_text_on_main(run_dir / "predictions.csv",
                                  predictions_csv(test_ex, logits.argmax(-1)))
    return metrics


def _warn_one_ending(preds: np.ndarray, what: str, cfg: common.TrainConfig,
                     gold: Sequence[int] | None = None) -> None:
    """One line when the model chose the same ending for every example of a file."""
    found = M.one_class(preds, [f"ending {k}" for k in range(4)], gold)
    if found:
        common.log(f"warning: {cfg.run.name if cfg.run else 'SWAG'}, {what}: {found}: the model "
                   f"chooses by position only")


def _eval_sets(a: SwagArgs, tok: Any) -> tuple[tuple[list, list], tuple[list, list]]:
    """(val examples, features) cut to --max-eval-samples, and test's (empty without test.csv
    or with --no-test)."""
    d = Path(a.data_dir)
    val_ex = _need_split(d, "val", labelled=True)[:a.max_eval_samples or None]
    test_ex = (read_split(d, "test", labelled=False) or []) if a.predict_test else []
    return (val_ex, featurize(tok, val_ex)), (test_ex, featurize(tok, test_ex))


def load_saved(checkpoint: Path) -> tuple[nn.Module, Any, dict[str, Any], common.Pretrained]:
    """A `--save-model` folder: (model with its trained head, tokenizer, saved task)."""
    pretrained = common.load_checkpoint(checkpoint)
    saved = common.finetuned_task(pretrained, "swag")
    model = common.build_model(None, pretrained)
    return model, common.load_task_tokenizer(pretrained, saved["max_seq_length"]), saved, pretrained


def evaluate_saved(a: SwagArgs, t0: float) -> dict[str, Any]:
    """--eval-only: score val.csv (and predict test.csv) with a saved fine-tuned model."""
    model, tok, saved, pretrained = load_saved(a.checkpoint)
    val, test = _eval_sets(a, tok)
    out_dir = Path(a.output_dir) / "SWAG"
    common.check_eval_dir(out_dir)
    cfg = dataclasses.replace(a.train)
    cfg.run = common.RunContext(out_dir, "SWAG eval-only")
    metrics = score_and_write(model, val, test, cfg, tok.token_to_id("[PAD]"), out_dir)
    summary = {"task": "SWAG", "eval_only": True, "checkpoint": pretrained.source,
               "trained": saved, "metrics": metrics, "data": str(a.data_dir),
               "max_eval_samples": a.max_eval_samples,
               "predictions": ["predictions.csv"] if test[1] else [],
               "seconds": time.perf_counter() - t0}
    common.write_json_on_main(out_dir / "results.json", summary)
    if common.ranks().is_main:
        print(f"SWAG (eval-only, {pretrained.source})  accuracy {100 * metrics['accuracy']:.2f}",
              flush=True)
    return summary


def predict_file(checkpoint: Path, input_file: Path, output: Path,
                 cfg: common.TrainConfig) -> Path:
    """`finetune predict` for a SWAG model: a CSV in the official layout (a label column, if
    any, is ignored) -> `index,pred` (the chosen ending 0-3 per example id), as predictions.csv."""
    from bertscale.data import tables

    model, tok, _, _ = load_saved(checkpoint)
    examples = (read_swag_hf([input_file], labelled=False)
                if input_file.is_file() and tables.file_kind(input_file) is not None
                else read_swag(input_file, labelled=False))
    cfg = dataclasses.replace(cfg)
    cfg.run = common.RunContext(output.parent, "SWAG predict")
    (logits,) = common.predict(model, featurize(tok, examples), logits_of, cfg,
                               tok.token_to_id("[PAD]"), what=input_file.name)
    common.write_text_on_main(output, predictions_csv(examples, logits.argmax(-1)))
    return output


def run(a: SwagArgs) -> dict[str, Any]:
    common.ranks(a.train.device)  # one process, or the data-parallel group of a launcher
    t0 = time.perf_counter()
    if a.eval_only:
        return evaluate_saved(a, t0)
    d = Path(a.data_dir)
    train_ex = _need_split(d, "train", labelled=True)[:a.max_train_samples or None]
    pretrained = common.load_checkpoint(a.checkpoint)
    tok = common.load_task_tokenizer(pretrained, a.max_seq_length)
    train_f = featurize(tok, train_ex)
    val, test = _eval_sets(a, tok)
    common.check_casing(pretrained, common.unk_fraction(
        tok, (ids for f in train_f for ids in f["input_ids"])), f"{d / 'train.csv'}",
        [e.context for e in train_ex[:2000]])
    pad_id = tok.token_to_id("[PAD]")
    from bertscale.model import BertForMultipleChoice
    out_dir = Path(a.output_dir) / "SWAG"

    def train_one(cfg: common.TrainConfig, run_dir: Path) -> tuple[dict[str, float], dict[str, Any]]:
        model = common.build_model(BertForMultipleChoice, pretrained)
        stats = common.fit(model, train_f, _loss, cfg, pad_id)
        metrics = score_and_write(model, val, test, cfg, pad_id, run_dir)
        if a.save_model:
            common.save_model(model, pretrained, run_dir, "BertForMultipleChoice",
                              {"family": "swag", "task": "SWAG",
                               "labels": [str(i) for i in range(NUM_CHOICES)], "lr": cfg.lr,
                               "seed": cfg.seed, "max_seq_length": a.max_seq_length,
                               "recipe": common.recipe(cfg)})
        return metrics, stats

    extra = dict(**pretrained.identity(),
                 lowercase=pretrained.lowercase, data=str(d), train_examples=len(train_f),
                 max_seq_length=a.max_seq_length, max_eval_samples=a.max_eval_samples,
                 save_model=a.save_model, predict_test=a.predict_test)
    runs = common.run_grid("SWAG", out_dir, a.lrs, a.seeds, a.train, len(train_f), "examples",
                           train_one, extra)
    return common.finish("SWAG", "accuracy", runs, out_dir,
                         ["predictions.csv"] if test[1] else [], a.train, t0, ("accuracy",),
                         **extra)
