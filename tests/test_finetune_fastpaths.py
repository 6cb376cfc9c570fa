"""The fine-tuning and feature-extraction entrypoints with the model's fast paths: the same
results as the plain path, on real weights and real GLUE text.

Parity needs the same arithmetic on both sides, so the fine-tuning runs use a copy of the real
all-MiniLM-L6-v2 checkpoint whose config.json turns dropout off: with dropout on, the unpadded
path draws its dropout masks over (tokens, H) instead of (B, T, H), a different (equally
valid) random stream, and no two runs could be compared number for number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.cli import main as bertscale
from bertscale.finetune import glue, squad
from bertscale.finetune.data import collate
from bertscale.finetune.models import (Pretrained, build_model, load_checkpoint,
                                       load_task_tokenizer)
from bertscale.finetune.predict import predict
from bertscale.finetune.runtime import start as runtime_on
from bertscale.model import BertForQuestionAnswering, BertForSequenceClassification


@pytest.fixture(scope="module")
def pretrained(minilm_dir: Path) -> Pretrained:
    return load_checkpoint(minilm_dir)


@pytest.fixture(scope="module")
def mrpc_features(pretrained: Pretrained, shared_data: Path) -> list[dict]:
    task = glue.task_by_name("MRPC")
    folder = glue.find_task_dir(shared_data / "glue", task)
    ex = glue.read_tsv(folder / "dev.tsv", task, task.train, labelled=True)[:40]
    tok = load_task_tokenizer(pretrained, 128)
    return glue.featurize(tok, ex, regression=False)


def _one_by_one(model: torch.nn.Module, features: list[dict], forward) -> list[tuple]:
    """Each feature alone: a batch of one has no padding, so this is the reference."""
    model.eval()   # predict() leaves the model in train mode
    out = []
    with torch.no_grad():
        for f in features:
            b = collate([f])
            r = forward(model, b)
            out.append(tuple(x[0].numpy() for x in (r if isinstance(r, tuple) else (r,))))
    return out


def test_length_sorted_prediction_comes_back_in_input_order(pretrained, mrpc_features) -> None:
    lengths = [len(f["input_ids"]) for f in mrpc_features]
    assert len(set(lengths)) > 10 and lengths != sorted(lengths), "needs varied, unsorted lengths"
    torch.manual_seed(0)
    rt = runtime_on("cpu", "fp32")
    model = build_model(BertForSequenceClassification, pretrained, rt, num_labels=2).eval()
    (batched,) = predict(model, mrpc_features, glue.logits_of, rt, batch_size=6)
    reference = np.stack([r[0] for r in _one_by_one(model, mrpc_features, glue.logits_of)])
    assert batched.shape == reference.shape == (len(mrpc_features), 2)
    np.testing.assert_allclose(batched, reference, atol=2e-5, rtol=0)
    # The check has teeth: the logits differ from example to example far more than the tolerance.
    assert np.abs(reference - reference[::-1]).max() > 1e-2


def test_ragged_outputs_are_restored_per_example(pretrained, mrpc_features) -> None:
    """SQuAD's start/end logits are (B, T): ragged across length-sorted batches, padded, and
    returned in input order; each example's first len(input_ids) values are its own."""
    torch.manual_seed(0)
    model = BertForQuestionAnswering(pretrained.config).eval()
    start, end = predict(model, mrpc_features, squad.logits_of, runtime_on("cpu", "fp32"),
                         batch_size=7)
    assert start.shape == end.shape == (len(mrpc_features),
                                        max(len(f["input_ids"]) for f in mrpc_features))
    reference = _one_by_one(model, mrpc_features, squad.logits_of)
    for i, f in enumerate(mrpc_features):
        n = len(f["input_ids"])
        np.testing.assert_allclose(start[i, :n], reference[i][0], atol=2e-5, rtol=0)
        np.testing.assert_allclose(end[i, :n], reference[i][1], atol=2e-5, rtol=0)


def _finetune_sts_b(checkpoint: Path, out: Path, shared_data: Path, *fast: str) -> dict:
    argv = ["finetune", "glue", "--task", "STS-B", "--data-dir", str(shared_data / "glue"),
            "--checkpoint", str(checkpoint), "--output-dir", str(out), "--lr", "5e-5",
            "--batch-size", "8", "--max-steps", "6", "--max-train-samples", "48",
            "--max-eval-samples", "48", "--eval-batch-size", "16", "--no-test",
            "--device", "cpu", "--precision", "fp32", "--log-every", "0", *fast]
    assert bertscale(argv) == 0
    return json.loads((out / "STS-B" / "results.json").read_text())


def _dev_scores(out: Path) -> np.ndarray:
    rows = (out / "STS-B" / "runs" / "lr5e-05-seed1" / "dev_predictions.tsv").read_text()
    lines = rows.strip().splitlines()
    return np.array([float(line.split("\t")[1]) for line in lines[1:]])


def test_unpad_and_checkpointing_fine_tune_to_the_plain_results(
        minilm_no_dropout: Path, shared_data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Count what the encoder really ran: packed (unpadded) forwards and checkpointed layers.
    import bertscale.model as model_module
    calls = {"pack": 0, "checkpoint": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(model_module, "_pack", counted("pack", model_module._pack))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        counted("checkpoint", torch.utils.checkpoint.checkpoint))
    plain = _finetune_sts_b(minilm_no_dropout, tmp_path / "plain", shared_data)
    assert calls == {"pack": 0, "checkpoint": 0}
    fast = _finetune_sts_b(minilm_no_dropout, tmp_path / "fast", shared_data,
                           "--unpad", "--checkpoint-activations")
    # 6 training steps + 3 dev batches are unpadded; only the training steps (6 x 6 layers)
    # are checkpointed (no activations are kept in a no-grad forward anyway).
    assert calls == {"pack": 6 + 3, "checkpoint": 6 * 6}
    assert fast["recipe"]["fast_paths"]["unpad"] and fast["recipe"]["fast_paths"]["checkpoint_activations"]
    assert not plain["recipe"]["fast_paths"]["unpad"]
    p_run, f_run = plain["runs"][0], fast["runs"][0]
    assert p_run["train_steps"] == f_run["train_steps"] == 6
    assert math.isclose(p_run["train_loss_last20_mean"], f_run["train_loss_last20_mean"], rel_tol=1e-4)
    p_scores, f_scores = _dev_scores(tmp_path / "plain"), _dev_scores(tmp_path / "fast")
    assert p_scores.shape == f_scores.shape == (48,)
    # Six steps moved the model: the scores spread, so matching them is not trivial.
    assert p_scores.std() > 1e-3
    np.testing.assert_allclose(f_scores, p_scores, atol=1e-3, rtol=0)
    for k in ("pearson", "spearman"):
        assert f_run["metrics"][k] == pytest.approx(p_run["metrics"][k], abs=1e-3)


def test_embed_unpad_gives_the_same_features(pretrained) -> None:
    from bertscale import features
    texts = ["A short one.",
             "A much longer sentence, with several clauses, that pads every other member of "
             "the batch by dozens of positions before it ends.",
             "Medium length text here, really.", "x"]
    words = [t.split() for t in texts]
    plain = features.FeatureExtractor(pretrained, "concat-last-four", device="cpu")
    fast = features.FeatureExtractor(pretrained, "concat-last-four", device="cpu", unpad=True)
    assert fast.model.unpad and not plain.model.unpad
    for pooling in ("cls", "mean"):
        a, _ = plain.embed_texts(texts, pooling)
        b, _ = fast.embed_texts(texts, pooling)
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)
    a_words, _ = plain.embed_words(words)
    b_words, _ = fast.embed_words(words)
    for x, y in zip(a_words, b_words):
        np.testing.assert_allclose(y, x, atol=2e-5, rtol=0)
