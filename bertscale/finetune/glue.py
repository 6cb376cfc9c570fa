"""GLUE: the nine tasks in the TSV layout of the GLUE distribution, official metrics, and test
predictions in the GLUE server's submission format.

Layouts read, picked by what the folder holds:

- The GLUE download (one folder per task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI):
  train.tsv, dev.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv), test.tsv (MNLI:
  test_matched.tsv, test_mismatched.tsv). Fields are tab-separated with no quoting (quotes are
  text, as the GLUE files need); CoLA's train/dev have no header, every other file has one and
  columns are found by name. MNLI's folder (or the GLUE root's diagnostic/diagnostic.tsv) may
  hold the diagnostic set AX.tsv, predicted with the MNLI model.
- Hugging Face's GLUE (nyu-mll/glue; one folder per config: cola, sst2, mrpc, stsb, qqp, mnli,
  qnli, rte, wnli, ax): Parquet files per split (`train-00000-of-00001.parquet`,
  `validation_matched/0000.parquet`, `glue-train.parquet`, `data/train-*.parquet`) or a
  `DatasetDict.save_to_disk` folder, with HF's column names (`sentence`, `sentence1/2`,
  `question1/2`, `premise/hypothesis`, `question/sentence`, `label`, `idx`). HF's labels are
  class indices in its own order (MNLI: entailment, neutral, contradiction; the TSVs spell
  the words, which we keep in Google's order): they are mapped by their names, read from the
  file's `datasets` features when present, else HF's published names; -1 is "no label" (the
  test splits). `idx` is the example id in prediction files.

Written per task: results.json (dev metrics, mean ± std over seeds per learning rate) and the
chosen run's test predictions `<Task>.tsv` (`index<TAB>prediction`, labels as the task spells
them, STS-B scores as floats; MNLI-m.tsv, MNLI-mm.tsv, AX.tsv), the names the GLUE server
expects in the submission zip.

Limits: sentence pairs are truncated longest-first to --max-seq-length (128, Google's
run_classifier default); a line with the wrong number of fields, a missing column or a label
outside the task's set stops the run with the file and line named.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.data import tables
from bertscale.errors import UserError
from bertscale.files import read_text
from bertscale.finetune import metrics as M
from bertscale.finetune.data import Feature, model_inputs
from bertscale.finetune.grid import check_eval_dir, run_grid
from bertscale.finetune.models import (Pretrained, build_model, check_casing, finetuned_task,
                                       load_checkpoint, load_task_tokenizer, save_model,
                                       pad_id_of, unk_fraction)
from bertscale.finetune.predict import predict
from bertscale.finetune.recipe import GLUE_TASKS, GlueRecipe, glue_task
from bertscale.finetune.results import finish
from bertscale.finetune.runtime import Runtime
from bertscale.finetune.train import RunSpec, fit
from bertscale.parallelize import FastPaths


@dataclass(frozen=True)
class Layout:
    """Where the fields of one kind of file are: column names (headered files) or indices."""

    text_a: str | int
    text_b: str | int | None
    label: str | int | None
    index: str | int | None = None
    header: bool = True
    num_fields: int | None = None
    """Headerless files: the exact number of fields per line."""


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...] | None
    """The label strings in the files, in class-index order; None = regression (STS-B)."""
    train: Layout
    test: Layout
    dev_files: tuple[tuple[str, str], ...] = (("dev.tsv", ""),)
    """(file, metric suffix): MNLI has matched and mismatched dev sets."""
    test_files: tuple[tuple[str, str], ...] = (("test.tsv", ""),)
    """(file, submission file name)."""
    metric_names: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    score_range: tuple[float, float] = (0.0, 5.0)


def _pair_layout(a: str, b: str, label: str | None, index: str | None = "index") -> Layout:
    return Layout(text_a=a, text_b=b, label=label, index=index)


_MNLI_TRAIN = _pair_layout("sentence1", "sentence2", "gold_label")
TASKS: dict[str, Task] = {
    "CoLA": Task("CoLA", ("0", "1"),
                 train=Layout(text_a=3, text_b=None, label=1, header=False, num_fields=4),
                 test=Layout(text_a="sentence", text_b=None, label=None, index="index"),
                 metric_names=("mcc",), main_metric="mcc"),
    "SST-2": Task("SST-2", ("0", "1"),
                  train=Layout(text_a="sentence", text_b=None, label="label"),
                  test=Layout(text_a="sentence", text_b=None, label=None, index="index")),
    "MRPC": Task("MRPC", ("0", "1"),
                 train=_pair_layout("#1 String", "#2 String", "Quality", None),
                 test=_pair_layout("#1 String", "#2 String", None),
                 metric_names=("f1", "accuracy"), main_metric="f1_accuracy"),
    "STS-B": Task("STS-B", None,
                  train=_pair_layout("sentence1", "sentence2", "score"),
                  test=_pair_layout("sentence1", "sentence2", None),
                  metric_names=("pearson", "spearman"), main_metric="pearson_spearman"),
    "QQP": Task("QQP", ("0", "1"),
                train=_pair_layout("question1", "question2", "is_duplicate", "id"),
                test=_pair_layout("question1", "question2", None, "id"),
                metric_names=("f1", "accuracy"), main_metric="f1_accuracy"),
    "MNLI": Task("MNLI", ("contradiction", "entailment", "neutral"),
                 train=_MNLI_TRAIN, test=_pair_layout("sentence1", "sentence2", None),
                 dev_files=(("dev_matched.tsv", ""), ("dev_mismatched.tsv", "_mm")),
                 test_files=(("test_matched.tsv", "MNLI-m.tsv"),
                             ("test_mismatched.tsv", "MNLI-mm.tsv")),
                 metric_names=("accuracy", "accuracy_mm")),
    "QNLI": Task("QNLI", ("entailment", "not_entailment"),
                 train=_pair_layout("question", "sentence", "label"),
                 test=_pair_layout("question", "sentence", None)),
    "RTE": Task("RTE", ("entailment", "not_entailment"),
                train=_pair_layout("sentence1", "sentence2", "label"),
                test=_pair_layout("sentence1", "sentence2", None)),
    "WNLI": Task("WNLI", ("0", "1"),
                 train=_pair_layout("sentence1", "sentence2", "label"),
                 test=_pair_layout("sentence1", "sentence2", None)),
}
AX_LAYOUT = _pair_layout("sentence1", "sentence2", None)
assert tuple(TASKS) == GLUE_TASKS


@dataclass(frozen=True)
class HFTask:
    """A task in Hugging Face's GLUE: its config folder, columns and ClassLabel names."""

    config: str
    text_a: str
    text_b: str | None
    names: tuple[str, ...] | None
    """HF's label names in its class-index order; None = regression (a float label)."""
    ours: tuple[str, ...] | None = None
    """Our label string (Task.labels) for each of `names`; None = the names themselves."""


_BINARY = ("0", "1")
HF_TASKS: dict[str, HFTask] = {
    "CoLA": HFTask("cola", "sentence", None, ("unacceptable", "acceptable"), _BINARY),
    "SST-2": HFTask("sst2", "sentence", None, ("negative", "positive"), _BINARY),
    "MRPC": HFTask("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), _BINARY),
    "STS-B": HFTask("stsb", "sentence1", "sentence2", None),
    "QQP": HFTask("qqp", "question1", "question2", ("not_duplicate", "duplicate"), _BINARY),
    "MNLI": HFTask("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction")),
    "QNLI": HFTask("qnli", "question", "sentence", ("entailment", "not_entailment")),
    "RTE": HFTask("rte", "sentence1", "sentence2", ("entailment", "not_entailment")),
    "WNLI": HFTask("wnli", "sentence1", "sentence2", ("not_entailment", "entailment"), _BINARY),
}
HF_AX = HFTask("ax", "premise", "hypothesis", ("entailment", "neutral", "contradiction"))
# The TSV file each Hugging Face split stands for (the names our outputs are named after).
HF_SPLITS = {"train.tsv": "train", "dev.tsv": "validation", "test.tsv": "test",
             "dev_matched.tsv": "validation_matched", "dev_mismatched.tsv": "validation_mismatched",
             "test_matched.tsv": "test_matched", "test_mismatched.tsv": "test_mismatched"}


def task_by_name(name: str) -> Task:
    key = glue_task(name)
    if key is None:
        raise UserError(f"unknown GLUE task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[key]


def submission_name(task: Task, test_file: str) -> str:
    for f, sub in task.test_files:
        if f == test_file and sub:
            return sub
    return f"{task.name}.tsv"


# ------------------------------------------------------------------------------ reading


@dataclass
class Example:
    guid: str
    """The test index for the submission file, else file:line."""
    text_a: str
    text_b: str | None
    label: int | float | None


def read_tsv(path: Path, task: Task, layout: Layout, labelled: bool) -> list[Example]:
    """Read one GLUE TSV file; every problem names the file and the 1-based line."""
    # utf-8-sig: MRPC's files start with a byte-order mark. Line ends are split below.
    text = read_text(path, encoding="utf-8-sig", universal_newlines=False)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise UserError(f"{path}: the file is empty")

    def col(name: str | int | None, header: list[str]) -> int | None:
        if name is None or isinstance(name, int):
            return name
        if name not in header:
            raise UserError(f"{path}:1: header has no column {name!r} (it has: "
                            f"{', '.join(repr(h) for h in header)}); is this the {task.name} "
                            f"{'train/dev' if labelled else 'test'} file?")
        return header.index(name)

    def header_index(name: str | int, header: list[str]) -> int:
        found = col(name, header)
        assert found is not None
        return found

    n_fields: int | None
    if layout.header:
        header = lines[0].split("\t")
        n_fields, first = len(header), 1
    else:
        header, n_fields, first = [], layout.num_fields, 0
    ia, ib = header_index(layout.text_a, header), col(layout.text_b, header)
    il = col(layout.label, header) if labelled else None
    ii = col(layout.index, header)
    label_index = {s: i for i, s in enumerate(task.labels)} if task.labels else None
    out: list[Example] = []
    for n, line in enumerate(lines[first:], start=first + 1):
        fields = line.split("\t")
        if len(fields) != n_fields:
            what = "the header has" if layout.header else f"{task.name} rows have"
            raise UserError(f"{path}:{n}: {len(fields)} tab-separated fields, but {what} "
                            f"{n_fields}")
        label: int | float | None = None
        if il is not None:
            raw_label = fields[il]
            if label_index is not None:
                if raw_label not in label_index:
                    raise UserError(f"{path}:{n}: label {raw_label!r} is not a {task.name} label "
                                    f"(expected one of {', '.join(task.labels or ())})")
                label = label_index[raw_label]
            else:
                try:
                    label = float(raw_label)
                except ValueError:
                    label = float("nan")
                lo, hi = task.score_range
                if not lo <= label <= hi:
                    raise UserError(f"{path}:{n}: score {raw_label!r} is not a number in "
                                    f"[{lo:g}, {hi:g}]")
        guid = fields[ii] if ii is not None else f"{path.name}:{n}"
        out.append(Example(guid, fields[ia], fields[ib] if ib is not None else None, label))
    return out


def find_task_dir(data_dir: Path, task: Task, need: str = "train.tsv") -> Path:
    """`data_dir` is the GLUE root (holding <Task>/) or the task folder itself."""
    for cand in (data_dir / task.name, data_dir):
        if (cand / need).is_file():
            return cand
    raise UserError(f"{data_dir}: no {task.name}/{need} (nor {need}) here; pass the GLUE "
                    f"folder that holds {task.name}/ or the {task.name} folder itself")


@dataclass
class TaskFiles:
    """A task's files in either layout, named by the GLUE download's file names."""

    task: Task
    folder: Path
    hf: HFTask | None = None
    """Set for Hugging Face's layout."""

    def has(self, name: str) -> bool:
        if self.hf is None:
            return (self.folder / name).is_file()
        return bool(tables.split_files(self.folder, HF_SPLITS[name]))

    def read(self, name: str, layout: Layout, labelled: bool) -> list[Example]:
        if self.hf is None:
            return read_tsv(self.folder / name, self.task, layout, labelled)
        split = HF_SPLITS[name]
        files = tables.split_files(self.folder, split)
        if not files:
            raise UserError(f"{self.folder}: no {split} split ({split}-*.parquet, "
                            f"{split}/*.parquet or a saved {split}/ folder)")
        return read_hf(files, self.task, self.hf, labelled)

    def ax(self) -> list[Example] | None:
        """The diagnostic set AX (MNLI), unlabelled, when the layout has it."""
        if self.hf is None:
            for ax in (self.folder / "AX.tsv", self.folder.parent / "diagnostic" / "diagnostic.tsv"):
                if ax.is_file():
                    return read_tsv(ax, self.task, AX_LAYOUT, labelled=False)
            return None
        files = tables.split_files(self.folder.parent / "ax", "test")
        return read_hf(files, self.task, HF_AX, labelled=False) if files else None


def task_files(data_dir: Path, task: Task, need: str = "train.tsv") -> TaskFiles:
    """The task's files under `data_dir`: the GLUE root or the task's folder, in the GLUE
    download's layout or Hugging Face's (its config folder: mnli/, sst2/, ...)."""
    hf = HF_TASKS[task.name]
    for cand in (data_dir / task.name, data_dir):
        if (cand / need).is_file():
            return TaskFiles(task, cand)
    for cand in (data_dir / hf.config, data_dir / task.name, data_dir):
        if tables.split_files(cand, HF_SPLITS[need]):
            return TaskFiles(task, cand, hf)
    raise UserError(f"{data_dir}: no {task.name}/{need} (nor {need}) here, nor Hugging Face's "
                    f"{hf.config}/{HF_SPLITS[need]}-*.parquet; pass the GLUE folder that holds "
                    f"{task.name}/ (or {hf.config}/) or the task's folder itself")


def tasks_in(data_dir: Path) -> list[str]:
    """The tasks with a training set under the GLUE root `data_dir`, in either layout."""
    return [name for name, hf in HF_TASKS.items()
            if (data_dir / name / "train.tsv").is_file()
            or tables.split_files(data_dir / hf.config, "train")]


def read_hf(files: list[Path], task: Task, hf: HFTask, labelled: bool) -> list[Example]:
    """One split of Hugging Face's GLUE (Parquet or Arrow files, in order). Labels are mapped
    to ours by name; every problem names the file and the row."""
    columns = [hf.text_a] + ([hf.text_b] if hf.text_b else []) + ["label", "idx"]
    out: list[Example] = []
    for path in files:
        schema = tables.schema(path)
        names = hf.names
        if hf.names is not None:
            names = tuple(tables.class_names(schema, "label") or hf.names)
        # STS-B's scores are float32 in HF's files: read back as the decimal they stand for
        # (3.8, not 3.799999952...), the score the TSV spells, so that the metrics agree.
        single = "label" in schema.names and str(schema.field("label").type) == "float"
        ours = dict(zip(hf.names or (), hf.ours or hf.names or ()))
        label_index = {s: i for i, s in enumerate(task.labels or ())}
        unknown = [n for n in names or () if n not in ours]
        if unknown:
            raise UserError(f"{path}: label names {', '.join(unknown)} are not {task.name} "
                            f"labels (Hugging Face's are {', '.join(hf.names or ())})")
        hint = f"; is this Hugging Face's GLUE {hf.config}?"
        for row, values in tables.iter_rows(path, columns, hint):
            a, b = values[0], values[1] if hf.text_b else None
            raw_label, idx = values[-2], values[-1]
            if not isinstance(a, str) or (hf.text_b and not isinstance(b, str)):
                raise UserError(f"{path}: row {row}: a text column is empty (null)")
            label: int | float | None = None
            if labelled:
                if names is None:   # STS-B: a score
                    if not isinstance(raw_label, (int, float)) or not (
                            task.score_range[0] <= raw_label <= task.score_range[1]):
                        raise UserError(f"{path}: row {row}: score {raw_label!r} is not a number "
                                        f"in [{task.score_range[0]:g}, {task.score_range[1]:g}]")
                    label = float(str(np.float32(raw_label))) if single else float(raw_label)
                else:
                    if not isinstance(raw_label, int) or not 0 <= raw_label < len(names):
                        raise UserError(f"{path}: row {row}: label {raw_label!r} is not a class "
                                        f"of {', '.join(names)} (-1, no label, is for test "
                                        f"splits)")
                    label = label_index[ours[names[raw_label]]]
            out.append(Example(str(idx), a, b, label))
    return out


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


__all__ = ["TASKS", "Task", "Layout", "Example", "read_tsv", "featurize", "compute_metrics",
           "submission_tsv", "run", "evaluate_saved", "task_by_name", "task_names"]
