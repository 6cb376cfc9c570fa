"""GLUE's nine tasks as files: each task's layouts and labels, and the readers of the two
layouts GLUE comes in. The run is bertscale.finetune.glue.

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

Limits: a line with the wrong number of fields, a missing column or a label outside the task's
set stops the run with the file and line named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertscale.data import tables
from bertscale.errors import UserError
from bertscale.files import read_text
from bertscale.finetune.recipe import GLUE_TASKS, glue_task


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
