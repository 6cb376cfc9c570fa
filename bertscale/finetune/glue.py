"""GLUE: the nine tasks in the TSV layout of the GLUE distribution, official metrics, and test
predictions in the GLUE server's submission format.

The tasks, their layouts and the readers of the GLUE download and Hugging Face's copies:
bertscale.finetune.glue_tasks.

Written per task: results.json (dev metrics, mean ± std over seeds per learning rate) and the
chosen run's test predictions `<Task>.tsv` (`index<TAB>prediction`, labels as the task spells
them, STS-B scores as floats; MNLI-m.tsv, MNLI-mm.tsv, AX.tsv), the names the GLUE server
expects in the submission zip.

Limits: sentence pairs are truncated longest-first to --max-seq-length (128, Google's
run_classifier default).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.data import tables
from bertscale.errors import UserError
from bertscale.finetune import metrics as M
from bertscale.finetune.data import Feature, model_inputs
from bertscale.finetune.grid import check_eval_dir, run_grid
from bertscale.finetune.glue_tasks import (AX_LAYOUT, HF_SPLITS, HF_TASKS, TASKS, Example, Layout,
                                           Task, TaskFiles, find_task_dir, read_hf, read_tsv,
                                           submission_name, task_by_name, task_files, tasks_in)
from bertscale.finetune.models import (Pretrained, build_model, check_casing, finetuned_task,
                                       load_checkpoint, load_task_tokenizer, save_model,
                                       pad_id_of, unk_fraction)
from bertscale.finetune.predict import predict
from bertscale.finetune.recipe import GlueRecipe
from bertscale.finetune.results import finish
from bertscale.finetune.runtime import Runtime
from bertscale.finetune.train import RunSpec, fit
from bertscale.parallelize import FastPaths


# --------------------------------------------------------------------------- features


def featurize(tok: Any, examples: Sequence[Example], regression: bool) -> list[dict[str, Any]]:
    if not examples:
        return []
    inputs = ([e.text_a for e in examples] if examples[0].text_b is None
              else [(e.text_a, e.text_b) for e in examples])
    encodings = tok.encode_batch(inputs)
    feats = []
    for e, enc in zip(examples, encodings):
        f: dict[str, Any] = {"input_ids": enc.ids, "token_type_ids": enc.type_ids}
        if e.label is not None:
            f["label"] = float(e.label) if regression else int(e.label)
        feats.append(f)
    return feats


def loss_fn(regression: bool):
    def compute(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(**model_inputs(batch))                          # (B, labels)
        if regression:
            return F.mse_loss(logits.squeeze(-1).float(), batch["label"].float())
        return F.cross_entropy(logits.float(), batch["label"])
    return compute


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits: Tensor = model(**model_inputs(batch))
    return logits


def compute_metrics(task: Task, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The official GLUE metric(s) of `task` from predictions (class indices, or scores)."""
    if task.labels is None:
        p, s = M.pearson(preds, labels), M.spearman(preds, labels)
        return {"pearson": p, "spearman": s, "pearson_spearman": (p + s) / 2}
    if task.main_metric == "mcc":
        return {"mcc": M.matthews_corrcoef(preds, labels)}
    acc = M.accuracy(preds, labels)
    if task.main_metric == "f1_accuracy":
        f1 = M.f1_binary(preds, labels)
        return {"f1": f1, "accuracy": acc, "f1_accuracy": (f1 + acc) / 2}
    return {"accuracy": acc}


def dev_predictions_name(dev_file: str) -> str:
    return dev_file.replace(".tsv", "_predictions.tsv")


def dev_predictions_tsv(task: Task, examples: Sequence[Example], preds: np.ndarray) -> str:
    """`id<TAB>prediction<TAB>label` for error analysis (id: the file's index column, or
    file:line for files without one); labels spelled as in the task's files."""
    def spell(v: float | None) -> str:   # scores in full (repr) precision: re-scorable
        assert v is not None
        return repr(float(v)) if task.labels is None else task.labels[int(v)]
    rows = ["id\tprediction\tlabel"]
    rows += [f"{e.guid}\t{spell(p)}\t{spell(e.label)}" for e, p in zip(examples, preds)]
    return "\n".join(rows) + "\n"


def submission_tsv(task: Task, guids: Sequence[str], preds: np.ndarray) -> str:
    rows = ["index\tprediction"]
    for g, p in zip(guids, preds):
        if task.labels is None:
            rows.append(f"{g}\t{float(p):.3f}")
        else:
            rows.append(f"{g}\t{task.labels[int(p)]}")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------- run


def task_names(recipe: GlueRecipe) -> list[str]:
    """The tasks `data.task` names: one, a comma list, or "all" (every task with a training set
    under data.data_dir)."""
    d = recipe.data
    if d.task.strip().lower() == "all":
        assert d.data_dir is not None
        names = tasks_in(d.data_dir)
        if not names:
            raise UserError(f"{d.data_dir}: no <Task>/train.tsv (nor Hugging Face's "
                            f"<config>/train-*.parquet) for any GLUE task")
        return names
    return [task_by_name(t.strip()).name for t in d.task.split(",") if t.strip()]


def run(recipe: GlueRecipe, task_name: str, rt: Runtime) -> dict[str, Any]:
    """Fine-tune and evaluate one GLUE task over the recipe's lr x seed grid; the summary."""
    t0 = time.perf_counter()
    task = task_by_name(task_name)
    d = recipe.data
    assert d.data_dir is not None and recipe.pretrained is not None
    files = task_files(d.data_dir, task)
    folder = files.folder
    regression = task.labels is None
    train_ex = files.read("train.tsv", task.train, labelled=True)
    dev_sets, tests = read_eval_sets(files, task, recipe)
    if d.max_train_samples:
        train_ex = train_ex[:d.max_train_samples]

    pretrained = load_checkpoint(recipe.pretrained)
    tok = load_task_tokenizer(pretrained, d.max_seq_length)
    train_f = featurize(tok, train_ex, regression)
    dev_f = [(f, s, featurize(tok, ex, regression), ex) for f, s, ex in dev_sets]
    test_f = [(name, featurize(tok, ex, regression), ex) for name, ex in tests]
    check_casing(pretrained, unk_fraction(tok, (f["input_ids"] for f in train_f)),
                 f"{task.name} training text", [e.text_a for e in train_ex[:2000]])
    pad_id = pad_id_of(tok)

    from bertscale.model import BertForSequenceClassification
    out_dir = Path(recipe.output_dir or ".") / task.name
    extra = dict(**pretrained.identity(),
                 lowercase=pretrained.lowercase, data=str(folder), train_examples=len(train_f),
                 max_seq_length=d.max_seq_length, max_eval_samples=d.max_eval_samples or None,
                 save_model=recipe.output.save_model, predict_test=d.predict_test)
    fast = FastPaths(unpad=recipe.fast.unpad, compile=recipe.fast.compile,
                     checkpoint_activations=recipe.fast.checkpoint_activations)

    def train_one(run: RunSpec) -> tuple[dict[str, float], dict[str, Any]]:
        model = build_model(BertForSequenceClassification, pretrained, rt,
                            num_labels=1 if regression else len(task.labels or ()))
        stats = fit(model, train_f, loss_fn(regression), recipe, run, rt, pad_id)
        metrics = score_and_write(task, model, dev_f, test_f, rt, recipe.train.eval_batch_size,
                                  fast, pad_id, run.folder, run.name)
        if recipe.output.save_model:
            save_model(model, pretrained, run.folder, "BertForSequenceClassification", rt,
                       saved_task(task, d.max_seq_length, run, recipe))
        return metrics, stats

    runs = run_grid(task.name, out_dir, recipe, len(train_f), "examples", train_one, extra, rt)
    return finish(task.name, task.main_metric, runs, out_dir, [name for name, _, _ in test_f],
                  recipe, rt, t0, task.metric_names, **extra)


def read_eval_sets(files: TaskFiles, task: Task, recipe: GlueRecipe
                   ) -> tuple[list[tuple[str, str, list[Example]]], list[tuple[str, list[Example]]]]:
    """The dev sets [(file, metric suffix, examples)] (first data.max_eval_samples of each) and
    the test sets [(submission name, examples)] of a task folder (either layout)."""
    d = recipe.data
    dev_sets = []
    for fname, suffix in task.dev_files:
        if not files.has(fname):
            what = f"the {HF_SPLITS[fname]} split" if files.hf else fname
            raise UserError(f"{files.folder}: no {what}; the dev set is needed to score the run")
        dev_sets.append((fname, suffix, files.read(fname, task.train, labelled=True)
                         [:d.max_eval_samples or None]))
    tests: list[tuple[str, list[Example]]] = []
    if d.predict_test:
        for fname, _ in task.test_files:
            if files.has(fname):
                tests.append((submission_name(task, fname),
                              files.read(fname, task.test, labelled=False)))
        if task.name == "MNLI":
            ax = files.ax()
            if ax is not None:
                tests.append(("AX.tsv", ax))
    return dev_sets, tests


def load_saved(checkpoint: Path, rt: Runtime, task_name: str | None = None
               ) -> tuple[Task, nn.Module, Any, dict[str, Any], Pretrained]:
    """A `--save-model` folder: (task, model with its trained head, tokenizer, saved task)."""
    pretrained = load_checkpoint(checkpoint)
    saved = finetuned_task(pretrained, "glue")
    task = task_by_name(saved["task"])
    if task_name is not None and task_by_name(task_name).name != task.name:
        raise UserError(f"{checkpoint}: fine-tuned for {task.name}, not {task_name}")
    model = build_model(None, pretrained, rt)
    tok = load_task_tokenizer(pretrained, saved["max_seq_length"])
    return task, model, tok, saved, pretrained


def evaluate_saved(recipe: GlueRecipe, task_name: str, rt: Runtime) -> dict[str, Any]:
    """--eval-only: score the dev sets (and predict the test sets) with a saved fine-tuned
    model, through the same prediction and scoring code as training."""
    t0 = time.perf_counter()
    assert recipe.pretrained is not None and recipe.data.data_dir is not None
    task, model, tok, saved, pretrained = load_saved(recipe.pretrained, rt, task_name)
    files = task_files(recipe.data.data_dir, task, task.dev_files[0][0])
    folder = files.folder
    dev_sets, tests = read_eval_sets(files, task, recipe)
    regression = task.labels is None
    dev_f = [(f, s, featurize(tok, ex, regression), ex) for f, s, ex in dev_sets]
    test_f = [(name, featurize(tok, ex, regression), ex) for name, ex in tests]
    out_dir = Path(recipe.output_dir or ".") / task.name
    check_eval_dir(out_dir)
    fast = FastPaths(unpad=recipe.fast.unpad, compile=recipe.fast.compile,
                     checkpoint_activations=recipe.fast.checkpoint_activations)
    metrics = score_and_write(task, model, dev_f, test_f, rt, recipe.train.eval_batch_size, fast,
                              pad_id_of(tok), out_dir, f"{task.name} eval-only")
    summary = {"task": task.name, "eval_only": True, "checkpoint": pretrained.source,
               "trained": saved, "metrics": metrics, "data": str(folder),
               "max_eval_samples": recipe.data.max_eval_samples or None,
               "predictions": [name for name, _, _ in test_f],
               "seconds": time.perf_counter() - t0}
    rt.write_json(out_dir / "results.json", summary)
    if rt.is_main:
        shown = "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in task.metric_names if k in metrics)
        print(f"{task.name} (eval-only, {pretrained.source})  {shown}", flush=True)
    return summary


def predict_file(checkpoint: Path, input_file: Path, output: Path, rt: Runtime,
                 batch_size: int) -> Path:
    """`finetune predict` for a GLUE model: `input_file` in the task's test layout (index and
    text columns; the label column, if any, is ignored) -> the GLUE submission TSV."""
    task, model, tok, _, _ = load_saved(checkpoint, rt)
    layout = task.test if task.name != "MNLI" else AX_LAYOUT
    if input_file.is_file() and tables.file_kind(input_file) is not None:  # Hugging Face's split
        examples = read_hf([input_file], task, HF_TASKS[task.name], labelled=False)
    else:
        examples = read_tsv(input_file, task, layout, labelled=False)
    feats = featurize(tok, examples, task.labels is None)
    label = f"{task.name} predict"
    (logits,) = predict(model, feats, logits_of, rt, batch_size=batch_size,
                        pad_id=pad_id_of(tok), label=label, what=input_file.name)
    preds = predict_labels(task, logits)
    warn_one_class(task, preds, input_file.name, rt, label)
    rt.write_text(output, submission_tsv(task, [e.guid for e in examples], preds))
    return output


def saved_task(task: Task, max_seq_length: int, run: RunSpec,
               recipe: GlueRecipe) -> dict[str, Any]:
    return {"family": "glue", "task": task.name, "labels": list(task.labels) if task.labels
            else None, "max_seq_length": max_seq_length, "lr": run.lr, "seed": run.seed,
            "recipe": recipe.summary()}


def score_and_write(task: Task, model: nn.Module,
                    dev_f: Sequence[tuple[str, str, Sequence[Feature], list[Example]]],
                    test_f: Sequence[tuple[str, Sequence[Feature], list[Example]]], rt: Runtime,
                    batch_size: int, fast: FastPaths, pad_id: int, run_dir: Path,
                    label: str) -> dict[str, float]:
    """Predict the dev sets (scored; id/prediction/label files) and the test sets (submission
    files) into `run_dir`; returns the dev metrics. Training and --eval-only share it, which is
    why re-scoring a saved model gives the run's own numbers."""
    metrics: dict[str, float] = {}
    for fname, suffix, feats, ex in dev_f:
        (logits,) = predict(model, feats, logits_of, rt, batch_size=batch_size, fast=fast,
                            pad_id=pad_id, label=label, what=fname)
        preds = predict_labels(task, logits)
        labels = np.array([f["label"] for f in feats])
        for k, v in compute_metrics(task, preds, labels).items():
            metrics[k + suffix] = v
        warn_one_class(task, preds, fname, rt, label, labels)
        rt.write_text(run_dir / dev_predictions_name(fname), dev_predictions_tsv(task, ex, preds))
    for name, feats, ex in test_f:
        (logits,) = predict(model, feats, logits_of, rt, batch_size=batch_size, fast=fast,
                            pad_id=pad_id, label=label, what=name)
        preds = predict_labels(task, logits)
        warn_one_class(task, preds, name, rt, label)
        rt.write_text(run_dir / name, submission_tsv(task, [e.guid for e in ex], preds))
    return metrics


def warn_one_class(task: Task, preds: np.ndarray, what: str, rt: Runtime, label: str,
                   gold: np.ndarray | None = None) -> None:
    """One line when a classifier predicted a single class for a whole file."""
    found = M.one_class(preds, task.labels, gold) if task.labels else None
    if found:
        rt.log(f"warning: {label}, {what}: {found}: the model predicts one class only")


def predict_labels(task: Task, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.labels is None else logits.argmax(-1)


# The tasks and their readers (glue_tasks) are part of this module's interface too.
__all__ = ["TASKS", "HF_TASKS", "AX_LAYOUT", "Task", "Layout", "Example", "read_tsv", "read_hf",
           "find_task_dir", "task_files", "featurize", "compute_metrics", "submission_tsv",
           "run", "evaluate_saved", "task_by_name", "task_names"]
