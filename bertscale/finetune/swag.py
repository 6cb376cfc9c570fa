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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.errors import UserError
from bertscale.finetune import metrics as M
from bertscale.finetune.data import Feature, model_inputs
from bertscale.finetune.grid import check_eval_dir, run_grid
from bertscale.finetune.models import (Pretrained, build_model, check_casing, finetuned_task,
                                       load_checkpoint, load_task_tokenizer, save_model,
                                       pad_id_of, unk_fraction)
from bertscale.finetune.predict import predict
from bertscale.finetune.recipe import SwagRecipe
from bertscale.finetune.results import finish
from bertscale.finetune.runtime import Runtime
from bertscale.finetune.train import RunSpec, fit
from bertscale.parallelize import FastPaths

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
    return F.cross_entropy(model(**model_inputs(batch)).float(), batch["label"])  # (B, 4)


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits: Tensor = model(**model_inputs(batch))
    return logits


Split = tuple[list[SwagExample], Sequence[Feature]]


def predictions_csv(examples: Sequence[SwagExample], preds: np.ndarray,
                    with_label: bool = False) -> str:
    """`index,pred` (plus `label` for val_predictions.csv, to re-score or inspect)."""
    rows = ["index,pred" + (",label" if with_label else "")]
    rows += [f"{e.index},{int(p)}" + (f",{e.label}" if with_label else "")
             for e, p in zip(examples, preds)]
    return "\n".join(rows) + "\n"


def _fast(recipe: SwagRecipe) -> FastPaths:
    f = recipe.fast
    return FastPaths(unpad=f.unpad, compile=f.compile, checkpoint_activations=f.checkpoint_activations)


def score_and_write(model: nn.Module, val: Split, test: Split, recipe: SwagRecipe, rt: Runtime,
                    pad_id: int, run_dir: Path, label: str) -> dict[str, float]:
    """Predict val (scored; val_predictions.csv) and test (predictions.csv) into `run_dir`;
    returns the val metrics. Training and --eval-only share it, which is why re-scoring a saved
    model gives the run's own numbers."""
    (val_ex, val_f), (test_ex, test_f) = val, test
    batch_size, fast = recipe.train.eval_batch_size, _fast(recipe)
    (logits,) = predict(model, val_f, logits_of, rt, batch_size=batch_size, fast=fast,
                        pad_id=pad_id, label=label, what="val")
    gold = [f["label"] for f in val_f]
    metrics = {"accuracy": M.accuracy(logits.argmax(-1), gold)}
    _warn_one_ending(logits.argmax(-1), "val.csv", rt, label, gold)
    rt.write_text(run_dir / "val_predictions.csv",
                  predictions_csv(val_ex, logits.argmax(-1), with_label=True))
    if test_f:
        (logits,) = predict(model, test_f, logits_of, rt, batch_size=batch_size, fast=fast,
                            pad_id=pad_id, label=label, what="test")
        _warn_one_ending(logits.argmax(-1), "test.csv", rt, label)
        rt.write_text(run_dir / "predictions.csv", predictions_csv(test_ex, logits.argmax(-1)))
    return metrics


def _warn_one_ending(preds: np.ndarray, what: str, rt: Runtime, label: str,
                     gold: Sequence[int] | None = None) -> None:
    """One line when the model chose the same ending for every example of a file."""
    found = M.one_class(preds, [f"ending {k}" for k in range(4)], gold)
    if found:
        rt.log(f"warning: {label}, {what}: {found}: the model chooses by position only")


def _eval_sets(recipe: SwagRecipe, tok: Any) -> tuple[Split, Split]:
    """(val examples, features) cut to data.max_eval_samples, and test's (empty without
    test.csv or with data.predict_test off)."""
    d = recipe.data
    assert d.data_dir is not None
    val_ex = _need_split(d.data_dir, "val", labelled=True)[:d.max_eval_samples or None]
    test_ex = (read_split(d.data_dir, "test", labelled=False) or []) if d.predict_test else []
    return (val_ex, featurize(tok, val_ex)), (test_ex, featurize(tok, test_ex))


def load_saved(checkpoint: Path, rt: Runtime) -> tuple[nn.Module, Any, dict[str, Any], Pretrained]:
    """A `--save-model` folder: (model with its trained head, tokenizer, saved task)."""
    pretrained = load_checkpoint(checkpoint)
    saved = finetuned_task(pretrained, "swag")
    model = build_model(None, pretrained, rt)
    return model, load_task_tokenizer(pretrained, saved["max_seq_length"]), saved, pretrained


def evaluate_saved(recipe: SwagRecipe, rt: Runtime) -> dict[str, Any]:
    """--eval-only: score val.csv (and predict test.csv) with a saved fine-tuned model."""
    t0 = time.perf_counter()
    assert recipe.pretrained is not None
    model, tok, saved, pretrained = load_saved(recipe.pretrained, rt)
    val, test = _eval_sets(recipe, tok)
    out_dir = Path(recipe.output_dir or ".") / "SWAG"
    check_eval_dir(out_dir)
    metrics = score_and_write(model, val, test, recipe, rt, pad_id_of(tok), out_dir,
                              "SWAG eval-only")
    summary = {"task": "SWAG", "eval_only": True, "checkpoint": pretrained.source,
               "trained": saved, "metrics": metrics, "data": str(recipe.data.data_dir),
               "max_eval_samples": recipe.data.max_eval_samples or None,
               "predictions": ["predictions.csv"] if test[1] else [],
               "seconds": time.perf_counter() - t0}
    rt.write_json(out_dir / "results.json", summary)
    if rt.is_main:
        print(f"SWAG (eval-only, {pretrained.source})  accuracy {100 * metrics['accuracy']:.2f}",
              flush=True)
    return summary


def predict_file(checkpoint: Path, input_file: Path, output: Path, rt: Runtime,
                 batch_size: int) -> Path:
    """`finetune predict` for a SWAG model: a CSV in the official layout (a label column, if
    any, is ignored) -> `index,pred` (the chosen ending 0-3 per example id), as predictions.csv."""
    from bertscale.data import tables

    model, tok, _, _ = load_saved(checkpoint, rt)
    examples = (read_swag_hf([input_file], labelled=False)
                if input_file.is_file() and tables.file_kind(input_file) is not None
                else read_swag(input_file, labelled=False))
    (logits,) = predict(model, featurize(tok, examples), logits_of, rt, batch_size=batch_size,
                        pad_id=pad_id_of(tok), label="SWAG predict",
                        what=input_file.name)
    rt.write_text(output, predictions_csv(examples, logits.argmax(-1)))
    return output


def run(recipe: SwagRecipe, rt: Runtime) -> dict[str, Any]:
    """Fine-tune and evaluate SWAG over the recipe's lr x seed grid; the summary."""
    t0 = time.perf_counter()
    d = recipe.data
    assert d.data_dir is not None and recipe.pretrained is not None
    train_ex = _need_split(d.data_dir, "train", labelled=True)[:d.max_train_samples or None]
    pretrained = load_checkpoint(recipe.pretrained)
    tok = load_task_tokenizer(pretrained, d.max_seq_length)
    train_f = featurize(tok, train_ex)
    val, test = _eval_sets(recipe, tok)
    check_casing(pretrained, unk_fraction(
        tok, (ids for f in train_f for ids in f["input_ids"])), f"{d.data_dir / 'train.csv'}",
        [e.context for e in train_ex[:2000]])
    pad_id = pad_id_of(tok)
    from bertscale.model import BertForMultipleChoice
    out_dir = Path(recipe.output_dir or ".") / "SWAG"

    def train_one(run: RunSpec) -> tuple[dict[str, float], dict[str, Any]]:
        model = build_model(BertForMultipleChoice, pretrained, rt)
        stats = fit(model, train_f, _loss, recipe, run, rt, pad_id)
        metrics = score_and_write(model, val, test, recipe, rt, pad_id, run.folder, run.name)
        if recipe.output.save_model:
            save_model(model, pretrained, run.folder, "BertForMultipleChoice", rt,
                       {"family": "swag", "task": "SWAG",
                        "labels": [str(i) for i in range(NUM_CHOICES)], "lr": run.lr,
                        "seed": run.seed, "max_seq_length": d.max_seq_length,
                        "recipe": recipe.summary()})
        return metrics, stats

    extra = dict(**pretrained.identity(),
                 lowercase=pretrained.lowercase, data=str(d.data_dir), train_examples=len(train_f),
                 max_seq_length=d.max_seq_length, max_eval_samples=d.max_eval_samples or None,
                 save_model=recipe.output.save_model, predict_test=d.predict_test)
    runs = run_grid("SWAG", out_dir, recipe, len(train_f), "examples", train_one, extra, rt)
    return finish("SWAG", "accuracy", runs, out_dir, ["predictions.csv"] if test[1] else [],
                  recipe, rt, t0, ("accuracy",), **extra)
