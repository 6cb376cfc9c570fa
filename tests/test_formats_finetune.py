"""Fine-tuning from Hugging Face's dataset files: GLUE (all nine tasks and AX), SQuAD v1.1 /
v2.0 and SWAG, converted here from the official files (the shared GLUE TSVs and SQuAD dev set,
the fixtures for the rest) to Hugging Face's exact column names, types and label encodings by
the `datasets` library itself, in the Hub's layouts. `bertscale finetune` on both must train on
the same examples and give the same predictions and metrics.

The conversion below is written from Hugging Face's dataset cards (nyu-mll/glue, rajpurkar/squad,
allenai/swag), independently of bertscale's readers: e.g. MNLI's labels are stored as class
indices in the order entailment, neutral, contradiction, while the TSVs spell the words.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets", reason="needs the test extra (datasets)")
pytest.importorskip("pyarrow", reason="needs the parquet extra (pyarrow)")

from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value  # noqa: E402

from bertscale.errors import UserError  # noqa: E402
from bertscale.finetune import glue, squad  # noqa: E402
from finetune_helpers import finetune_cli, tiny_hf_checkpoint  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"
NLI3 = ["entailment", "neutral", "contradiction"]

# task folder -> (HF config, HF text columns <- TSV columns, TSV label column, HF label names
# (None: a float score), TSV index column or None (then: the row number))
GLUE_HF = {
    "CoLA": ("cola", {"sentence": 3}, 1, ["unacceptable", "acceptable"], None),
    "SST-2": ("sst2", {"sentence": "sentence"}, "label", ["negative", "positive"], None),
    "MRPC": ("mrpc", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality",
             ["not_equivalent", "equivalent"], None),
    "STS-B": ("stsb", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", None, "index"),
    "QQP": ("qqp", {"question1": "question1", "question2": "question2"}, "is_duplicate",
            ["not_duplicate", "duplicate"], "id"),
    "MNLI": ("mnli", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label", NLI3,
             "index"),
    "QNLI": ("qnli", {"question": "question", "sentence": "sentence"}, "label",
             ["entailment", "not_entailment"], "index"),
    "RTE": ("rte", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label",
            ["entailment", "not_entailment"], "index"),
    "WNLI": ("wnli", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label",
             ["not_entailment", "entailment"], "index"),
}
SPLITS = {"train.tsv": "train", "dev.tsv": "validation", "test.tsv": "test",
          "dev_matched.tsv": "validation_matched", "dev_mismatched.tsv": "validation_mismatched",
          "test_matched.tsv": "test_matched", "test_mismatched.tsv": "test_mismatched"}
# TSV labels spelled as numbers are HF's class indices already (0 = the first name)
_WORD_LABELS = {"MNLI", "QNLI", "RTE"}


def _glue_tree(root: Path, shared_data: Path) -> Path:
    """All nine tasks in the GLUE download layout (as tests/test_glue.py builds it)."""
    for task in ("CoLA", "MRPC", "RTE", "STS-B", "QNLI", "WNLI"):
        shutil.copytree(shared_data / "glue" / task, root / task)
    for task in ("QNLI", "WNLI"):
        shutil.copyfile(root / task / "dev.tsv", root / task / "train.tsv")
    for task in ("SST-2", "QQP", "MNLI"):
        shutil.copytree(FIXTURES / task, root / task)
    return root


def _tsv(path: Path, header: bool) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8-sig").rstrip("\n").split("\n")
    rows = [ln.rstrip("\r").split("\t") for ln in lines]
    return (rows[0], rows[1:]) if header else ([], rows)


def _hf_split(task: str, tsv: Path, test: bool) -> Dataset:
    config, text_cols, label_col, names, index_col = GLUE_HF[task]
    if tsv.name == "AX.tsv":
        text_cols, index_col = {"premise": "sentence1", "hypothesis": "sentence2"}, "index"
    if task == "CoLA" and test:   # CoLA's test file alone has a header
        text_cols = {"sentence": "sentence"}
    header, rows = _tsv(tsv, header=not (task == "CoLA" and not test))
    wanted = [*text_cols.values()] + ([] if test else [label_col, index_col])
    col = {c: (header.index(c) if isinstance(c, str) else c) for c in wanted if c is not None}
    if test:   # the GLUE test files have an index column and no label
        col[index_col or "index"] = header.index("id" if task == "QQP" else "index")
    data: dict[str, list] = {k: [r[col[v]] for r in rows] for k, v in text_cols.items()}
    if test:
        data["label"] = [-1] * len(rows)
    elif names is None:
        data["label"] = [float(r[col[label_col]]) for r in rows]
    elif task in _WORD_LABELS:
        data["label"] = [names.index(r[col[label_col]]) for r in rows]
    else:
        data["label"] = [int(r[col[label_col]]) for r in rows]
    key = index_col or ("index" if test else None)
    data["idx"] = [int(r[col[key]]) for r in rows] if key else list(range(len(rows)))
    features = Features({**{k: Value("string") for k in text_cols},
                         "label": Value("float32") if names is None else ClassLabel(names=names),
                         "idx": Value("int32")})
    return Dataset.from_dict(data, features=features)


def _hf_glue(tsv_root: Path, out: Path) -> Path:
    """The same tasks in Hugging Face's layouts: Parquet per split in <config>/ as on the Hub's
    main branch, MNLI as the Parquet converter lays it out (<split>/0000.parquet), MRPC as a
    DatasetDict.save_to_disk folder, and AX (from MNLI's AX.tsv) in ax/."""
    for task, (config, *_rest) in GLUE_HF.items():
        splits = {SPLITS[f.name]: _hf_split(task, f, f.name.startswith("test"))
                  for f in sorted((tsv_root / task).glob("*.tsv"))
                  if f.name in SPLITS}
        folder = out / config
        if task == "MRPC":
            DatasetDict(splits).save_to_disk(str(folder))
            continue
        for split, ds in splits.items():
            path = (folder / split / "0000.parquet" if task == "MNLI"
                    else folder / f"{split}-00000-of-00001.parquet")
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(path))
    ax = _hf_split("MNLI", tsv_root / "MNLI" / "AX.tsv", test=True)
    (out / "ax").mkdir(parents=True)
    ax.to_parquet(str(out / "ax" / "test-00000-of-00001.parquet"))
    return out


def _steps(task_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, gradient norm) of every training step of the task's runs, step by step."""
    out = []
    for f in sorted((task_dir / "runs").glob("*/metrics.jsonl")):
        for r in map(json.loads, f.read_text().splitlines()):
            if r["kind"] == "train":
                out.append((r["step"], r["loss"], r["grad_norm"]))
    assert out
    return out


def _predictions(path: Path) -> list[tuple[str, str]]:
    """(prediction, label) of a dev predictions file: its ids are file:line for TSVs without an
    index column and HF's idx otherwise, so they are left out."""
    rows = [ln.split("\t") for ln in path.read_text().rstrip("\n").split("\n")[1:]]
    return [(r[1], r[2]) for r in rows]


def test_glue_labels_read_alike_in_both_layouts(tmp_path: Path, shared_data: Path) -> None:
    """Library level, to show label parity example by example (the command shows metrics):
    every task's train and dev examples, read from the TSVs and from HF's files, are the same
    texts with the same class, MNLI's reordered labels included; a Parquet whose label names
    come in another order (its `datasets` features say so) is read by the names."""
    tsv = _glue_tree(tmp_path / "tsv", shared_data)
    hf = _hf_glue(tsv, tmp_path / "hf")
    for name, task in glue.TASKS.items():
        a, b = glue.task_files(tsv, task), glue.task_files(hf, task)
        assert a.hf is None and b.hf is not None
        for fname, _ in [("train.tsv", ""), *task.dev_files]:
            ours, theirs = a.read(fname, task.train, True), b.read(fname, task.train, True)
            assert len(ours) == len(theirs) > 0
            for x, y in zip(ours, theirs):
                assert (x.text_a, x.text_b) == (y.text_a, y.text_b), (name, fname)
                if task.labels is None:   # HF keeps STS-B's scores as float32: 2.11111111111111
                    assert np.float32(x.label) == np.float32(y.label)   # in one train row
                else:
                    assert x.label == y.label, (name, fname)
    mnli = glue.task_files(hf, glue.TASKS["MNLI"]).read("train.tsv", glue.TASKS["MNLI"].train, True)
    assert {glue.TASKS["MNLI"].labels[e.label] for e in mnli} == set(NLI3)

    # Another order of the names, recorded in the file's features: read by name.
    ds = _hf_split("RTE", tsv / "RTE" / "dev.tsv", test=False)
    flipped = ds.cast_column("label", ClassLabel(names=["not_entailment", "entailment"]))
    flipped = flipped.map(lambda r: {"label": 1 - r["label"]})
    flipped.to_parquet(str(tmp_path / "flipped.parquet"))
    rte = glue.TASKS["RTE"]
    got = glue.read_hf([tmp_path / "flipped.parquet"], rte, glue.HF_TASKS["RTE"], True)
    want = glue.read_tsv(tsv / "RTE" / "dev.tsv", rte, rte.train, True)
    assert [e.label for e in got] == [e.label for e in want]
    # A label name that is not the task's is one line naming the file.
    bad = ds.cast_column("label", ClassLabel(names=["yes", "no"]))
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match=r"bad\.parquet: label names yes, no are not RTE labels"):
        glue.read_hf([tmp_path / "bad.parquet"], rte, glue.HF_TASKS["RTE"], True)


@pytest.mark.slow
def test_glue_from_hugging_face_files_gives_the_tsv_results(tmp_path: Path, shared_data: Path,
                                                           minilm_dir: Path) -> None:
    """`bertscale finetune glue --task all` on the TSVs and on HF's files: the same tasks, the
    same dev predictions and metrics, the same test submissions (HF's idx is the index)."""
    tsv = _glue_tree(tmp_path / "tsv", shared_data)
    hf = _hf_glue(tsv, tmp_path / "hf")
    ckpt = tiny_hf_checkpoint(tmp_path / "ckpt", minilm_dir / "vocab.txt")
    outs = {}
    for name, data in (("tsv", tsv), ("hf", hf)):
        outs[name] = tmp_path / f"out-{name}"
        assert finetune_cli(["finetune", "glue", "--task", "all", "--data-dir", str(data),
                             "--checkpoint", str(ckpt), "--output-dir", str(outs[name]),
                             "--lr", "1e-4", "--max-steps", "2", "--batch-size", "8",
                             "--max-train-samples", "16", "--max-eval-samples", "40",
                             "--eval-batch-size", "256", "--log-every", "0"]) == 0
    for name, task in glue.TASKS.items():
        a, b = (json.loads((outs[k] / name / "results.json").read_text()) for k in ("tsv", "hf"))
        assert a["runs"][0]["metrics"] == b["runs"][0]["metrics"], name
        assert _steps(outs["tsv"] / name) == _steps(outs["hf"] / name), name
        assert a["predictions"] == b["predictions"] and a["train_examples"] == b["train_examples"]
        for dev_file, _ in task.dev_files:
            pred = Path("runs") / a["runs"][0]["folder"] / glue.dev_predictions_name(dev_file)
            assert _predictions(outs["tsv"] / name / pred) == _predictions(outs["hf"] / name / pred)
        for sub in a["predictions"]:
            assert (outs["tsv"] / name / sub).read_text() == (outs["hf"] / name / sub).read_text()
    assert json.loads((outs["hf"] / "MNLI" / "results.json").read_text())["predictions"] == [
        "MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]


SQUAD = Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                  "question": Value("string"),
                  "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")})})


def _hf_squad(official: Path, out: Path) -> Path:
    """An official SQuAD JSON as Hugging Face's rows (one per question) in a Parquet file."""
    rows: dict[str, list] = {k: [] for k in SQUAD}
    for article in json.loads(official.read_text())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows["id"].append(qa["id"])
                rows["title"].append(article["title"])
                rows["context"].append(para["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [a["answer_start"] for a in qa["answers"]]})
    out.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=SQUAD).to_parquet(str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_squad_from_hugging_face_files_gives_the_json_results(tmp_path: Path, shared_data: Path,
                                                             minilm_dir: Path, version: str) -> None:
    if version == "1.1":
        train = predict = shared_data / "squad" / "v1.1" / "dev-v1.1.json"
        limits = ["--max-train-samples", "48", "--max-eval-samples", "40"]
    else:
        train, predict = FIXTURES / "squad" / "train-v2.0.json", FIXTURES / "squad" / "dev-v2.0.json"
        limits = []
    hf_train = _hf_squad(train, tmp_path / "hf" / "train-00000-of-00001.parquet")
    hf_predict = _hf_squad(predict, tmp_path / "hf" / "validation-00000-of-00001.parquet")
    ckpt = tiny_hf_checkpoint(tmp_path / "ckpt", minilm_dir / "vocab.txt")
    outs = {}
    for name, (t, p) in (("json", (train, predict)), ("hf", (hf_train, hf_predict))):
        outs[name] = tmp_path / f"out-{name}" / f"SQuAD-v{version}"
        assert finetune_cli(["finetune", "squad", "--version", version, "--train-file", str(t),
                             "--predict-file", str(p), "--checkpoint", str(ckpt),
                             "--output-dir", str(outs[name].parent), "--lr", "1e-3",
                             "--epochs", "1", "--batch-size", "8", "--max-seq-length", "128",
                             "--doc-stride", "64", "--log-every", "0", *limits]) == 0
    a, b = (json.loads((outs[k] / "results.json").read_text()) for k in ("json", "hf"))
    assert a["runs"][0]["metrics"] == b["runs"][0]["metrics"]
    assert _steps(outs["json"]) == _steps(outs["hf"])
    assert a["train_windows"] == b["train_windows"] and a["scored_questions"] == b["scored_questions"]
    files = ["predictions.json"] + (["null_odds.json"] if version == "2.0" else [])
    for f in files:
        assert (outs["json"] / f).read_text() == (outs["hf"] / f).read_text()
    if version == "2.0":   # unanswerable questions came through as such
        data = squad.read_squad(hf_predict, "2.0")
        assert any(e.is_impossible for e in data.examples)
        assert [e.is_impossible for e in data.examples] == [
            e.is_impossible for e in squad.read_squad(predict, "2.0").examples]
        with pytest.raises(UserError, match="this is SQuAD v2.0; run with --version 2.0"):
            squad.read_squad(hf_predict, "1.1")


SWAG_COLUMNS = ["video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                "ending0", "ending1", "ending2", "ending3"]


@pytest.mark.slow
def test_swag_from_hugging_face_files_gives_the_csv_results(tmp_path: Path, minilm_dir: Path) -> None:
    hf = tmp_path / "hf" / "regular"
    hf.mkdir(parents=True)
    for name, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        with open(FIXTURES / "swag" / f"{name}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        data = {c: [r[c] for r in rows] for c in SWAG_COLUMNS}
        data["label"] = [int(r["label"]) if "label" in r else -1 for r in rows]
        features = Features({**{c: Value("string") for c in SWAG_COLUMNS},
                             "label": ClassLabel(names=["0", "1", "2", "3"])})
        Dataset.from_dict(data, features=features).to_parquet(
            str(hf / f"{split}-00000-of-00001.parquet"))
    ckpt = tiny_hf_checkpoint(tmp_path / "ckpt", minilm_dir / "vocab.txt")
    outs = {}
    for name, data_dir in (("csv", FIXTURES / "swag"), ("hf", hf.parent)):
        outs[name] = tmp_path / f"out-{name}"
        assert finetune_cli(["finetune", "swag", "--data-dir", str(data_dir), "--checkpoint",
                             str(ckpt), "--output-dir", str(outs[name]), "--lr", "1e-4",
                             "--epochs", "2", "--log-every", "0"]) == 0
    a, b = (json.loads((outs[k] / "SWAG" / "results.json").read_text()) for k in ("csv", "hf"))
    assert a["runs"][0]["metrics"] == b["runs"][0]["metrics"]
    assert _steps(outs["csv"] / "SWAG") == _steps(outs["hf"] / "SWAG")
    for f in (Path("runs") / a["runs"][0]["folder"] / "val_predictions.csv", "predictions.csv"):
        assert (outs["csv"] / "SWAG" / f).read_text() == (outs["hf"] / "SWAG" / f).read_text()
