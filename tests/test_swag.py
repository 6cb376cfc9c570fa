"""SWAG: the official CSV layout (hand-written fixtures: SWAG is not in the shared data), the
four-way multiple-choice features, bad input, and the entrypoint end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import sklearn.metrics
import torch

from bertscale.errors import UserError
from bertscale.finetune import swag
from bertscale.finetune.models import build_model, load_checkpoint, load_task_tokenizer
from bertscale.finetune.predict import predict
from bertscale.finetune.runtime import start
from finetune_helpers import finetune_cli, tiny_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "finetune" / "swag"


def test_reads_the_official_layout() -> None:
    train = swag.read_swag(FIXTURES / "train.csv", labelled=True)
    assert len(train) == 8 and [e.label for e in train] == [0, 1, 2, 3, 0, 1, 2, 3]
    # A quoted ending with a comma is one field.
    assert train[1].endings[1] == "cracks two eggs, then stirs the mixture."
    assert (train[1].context, train[1].start_ending) == ("Someone pours flour into a bowl.", "She")
    test = swag.read_swag(FIXTURES / "test.csv", labelled=False)
    assert [e.index for e in test] == ["0", "1"] and test[0].label is None
    # The test file has no label column, so it cannot be used for training.
    with pytest.raises(UserError, match=r"test\.csv:1: header lacks label"):
        swag.read_swag(FIXTURES / "test.csv", labelled=True)


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    rows = list(csv.reader((FIXTURES / "val.csv").open(newline="")))
    bad = [r[:] for r in rows]
    bad[3][-1] = "4"
    path = tmp_path / "val.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(bad)
    with pytest.raises(UserError, match=r"val\.csv:4: label '4' is not an ending number 0-3"):
        swag.read_swag(path, labelled=True)
    short = [r[:] for r in rows]
    short[2] = short[2][:-2]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(short)
    with pytest.raises(UserError, match=r"val\.csv:3: 10 fields, but the header has 12"):
        swag.read_swag(path, labelled=True)


def test_each_example_becomes_four_pairs(minilm_dir: Path) -> None:
    tok = load_task_tokenizer(load_checkpoint(minilm_dir), 128)
    ex = swag.read_swag(FIXTURES / "val.csv", labelled=True)[:1]
    (f,) = swag.featurize(tok, ex)
    assert len(f["input_ids"]) == 4 and f["label"] == 0
    for ids, types, ending in zip(f["input_ids"], f["token_type_ids"], ex[0].endings):
        # [CLS] context [SEP] start-of-ending + ending [SEP], lower-cased like the checkpoint.
        assert tok.decode(ids, skip_special_tokens=False) == (
            f"[CLS] {ex[0].context} [SEP] {ex[0].start_ending} {ending} [SEP]".lower()
            .replace("[cls]", "[CLS]").replace("[sep]", "[SEP]"))
        sep = ids.index(tok.token_to_id("[SEP]"))
        assert types == [0] * (sep + 1) + [1] * (len(ids) - sep - 1)


def test_swag_entrypoint_end_to_end(tmp_path: Path, minilm_dir: Path) -> None:
    ckpt = tiny_hf_checkpoint(tmp_path / "ckpt", minilm_dir / "vocab.txt")
    out = tmp_path / "out"
    assert finetune_cli(["finetune", "swag", "--data-dir", str(FIXTURES), "--checkpoint", str(ckpt),
                 "--output-dir", str(out), "--lr", "1e-4,5e-5", "--seeds", "1,2",
                 "--epochs", "2", "--log-every", "0", "--save-model"]) == 0
    results = json.loads((out / "SWAG" / "results.json").read_text())
    assert len(results["runs"]) == 4 and set(results["by_lr"]) == {"0.0001", "5e-05"}
    assert results["train_examples"] == 8 and results["predictions"] == ["predictions.csv"]
    # 8 examples, batch 16 (the paper's SWAG batch), 2 epochs: 2 optimizer steps per run.
    assert all(r["train_steps"] == 2 for r in results["runs"])
    for run in results["runs"]:
        rows = list(csv.DictReader((out / "SWAG" / "runs" / run["folder"] /
                                    "val_predictions.csv").open()))
        assert run["metrics"]["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(
            [int(r["label"]) for r in rows], [int(r["pred"]) for r in rows]))
    # Each run's saved model (a Hugging Face folder, head included) reloads into the same
    # predictions.
    from bertscale.model import BertForMultipleChoice
    val = swag.read_swag(FIXTURES / "val.csv", labelled=True)
    for run in results["runs"]:
        folder = out / "SWAG" / "runs" / run["folder"]
        saved = load_checkpoint(folder / "model")
        model = build_model(BertForMultipleChoice, saved, start("cpu"))
        assert torch.equal(model.classifier.weight, saved.state_dict["classifier.weight"])
        feats = swag.featurize(load_task_tokenizer(saved, 128), val)
        (logits,) = predict(model, feats, swag.logits_of, start("auto"), batch_size=64)
        rows = list(csv.DictReader((folder / "val_predictions.csv").open()))
        assert logits.argmax(-1).tolist() == [int(r["pred"]) for r in rows]
    preds = list(csv.DictReader((out / "SWAG" / "predictions.csv").open()))
    assert [r["index"] for r in preds] == ["0", "1"]
    assert all(r["pred"] in {"0", "1", "2", "3"} for r in preds)


def test_eval_only_and_predict_reproduce_the_run(tmp_path: Path, minilm_dir: Path) -> None:
    """The real MiniLM weights fine-tuned 2 steps with --save-model: `finetune swag --eval-only`
    on the saved folder gives the run's own val accuracy exactly and byte-equal prediction
    files, and `finetune predict` writes `index,pred` per example id, equal to what was scored."""
    out = tmp_path / "out"
    assert finetune_cli(["finetune", "swag", "--data-dir", str(FIXTURES), "--checkpoint",
                         str(minilm_dir), "--output-dir", str(out), "--max-steps", "2",
                         "--batch-size", "4", "--log-every", "0", "--save-model"]) == 0
    run_dir = out / "SWAG" / "runs" / "lr2e-05-seed1"
    saved = json.loads((run_dir / "model" / "bertscale_task.json").read_text())
    assert (saved["family"], saved["task"], saved["labels"]) == ("swag", "SWAG", ["0", "1", "2", "3"])
    assert saved["max_seq_length"] == 128 and saved["recipe"]["batch_size"] == 4
    run = json.loads((run_dir / "results.json").read_text())

    assert finetune_cli(["finetune", "swag", "--data-dir", str(FIXTURES), "--checkpoint",
                         str(run_dir / "model"), "--output-dir", str(tmp_path / "eval"),
                         "--eval-only"]) == 0
    again = json.loads((tmp_path / "eval" / "SWAG" / "results.json").read_text())
    assert again["eval_only"] and again["metrics"] == run["metrics"]
    for name in ("val_predictions.csv", "predictions.csv"):
        assert (tmp_path / "eval" / "SWAG" / name).read_bytes() == (run_dir / name).read_bytes()
    with pytest.raises(UserError, match="holds the results of a fine-tuning grid"):
        finetune_cli(["finetune", "swag", "--data-dir", str(FIXTURES), "--checkpoint",
                      str(run_dir / "model"), "--output-dir", str(out), "--eval-only"])

    # predict on val.csv (its label column ignored): the ids and endings --eval-only scored.
    pred = tmp_path / "pred" / "val.csv"
    assert finetune_cli(["finetune", "predict", "--checkpoint", str(run_dir / "model"),
                         "--input", str(FIXTURES / "val.csv"), "--output", str(pred)]) == 0
    rows = list(csv.DictReader(pred.open()))
    scored = list(csv.DictReader((run_dir / "val_predictions.csv").open()))
    assert list(rows[0]) == ["index", "pred"]
    assert [(r["index"], r["pred"]) for r in rows] == [(r["index"], r["pred"]) for r in scored]
    assert [r["index"] for r in rows] == [e.index for e in swag.read_swag(FIXTURES / "val.csv", True)]
