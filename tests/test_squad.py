"""SQuAD v1.1 / v2.0: reading, windows, span decoding and the official metrics, on the real
SQuAD v1.1 dev set and on hand-written v2.0 fixtures in the official format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bertscale.errors import UserError
from bertscale.finetune import squad
from bertscale.finetune.models import load_checkpoint, load_task_tokenizer
from bertscale.finetune import metrics as M
from finetune_helpers import finetune_cli, tiny_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "finetune" / "squad"


@pytest.fixture(scope="module")
def dev11(shared_data: Path) -> squad.SquadFile:
    return squad.read_squad(shared_data / "squad" / "v1.1" / "dev-v1.1.json", "1.1")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path):
    return load_task_tokenizer(load_checkpoint(minilm_dir))


def test_gold_answers_score_100_on_the_real_dev_set(dev11: squad.SquadFile) -> None:
    assert len(dev11.examples) == 10570 and len(dev11.contexts) == 2067
    gold = {e.qid: e.answers[0][0] for e in dev11.examples}
    assert M.squad_v1_evaluate(dev11.dataset, gold) == {"exact_match": 100.0, "f1": 100.0}
    # Another gold answer scores the same (max over the gold answers), with one quirk of the
    # official v1.1 F1 that we reproduce: question 57340d12... has the gold answer ".", which
    # normalises to nothing, so predicting it is an exact match but shares no token (F1 0).
    last = {e.qid: e.answers[-1][0] for e in dev11.examples}
    assert last["57340d124776f419006617bf"] == "."
    assert M.squad_v1_evaluate(dev11.dataset, last) == {"exact_match": 100.0,
                                                        "f1": 100.0 * 10569 / 10570}
    # ... and a wrong answer to every question scores 0.
    wrong = {e.qid: "zxqv" for e in dev11.examples}
    assert M.squad_v1_evaluate(dev11.dataset, wrong) == {"exact_match": 0.0, "f1": 0.0}


def _gold_token_span(off: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """Context tokens covering [start_char, end_char), found by a plain scan (independent of
    the searchsorted in squad.featurize)."""
    s = next(i for i in range(len(off)) if off[i, 1] > start_char)
    e = max(i for i in range(len(off)) if off[i, 0] < end_char)
    return s, e


@pytest.mark.parametrize("max_seq_length,doc_stride", [(384, 128), (128, 48)])
def test_perfect_logits_decode_to_the_gold_span(dev11: squad.SquadFile, tokenizer,
                                                max_seq_length: int, doc_stride: int) -> None:
    """Given logits that peak at the gold answer in every window that holds it, n-best decoding
    returns the gold text from the original context, also when the answer first appears in a
    second or later window."""
    data = squad.subset(dev11, 3000 if max_seq_length == 128 else None)
    feats = squad.featurize(tokenizer, data, training=False, max_seq_length=max_seq_length,
                            doc_stride=doc_stride)
    starts, ends, windows_of, spans, first_window = [], [], {}, {}, {}
    for fi, m in enumerate(feats.meta):
        ex = data.examples[m.example_index]
        text, start_char = ex.answers[0]
        off = feats.offsets[ex.context_index]
        if m.example_index not in spans:
            spans[m.example_index] = _gold_token_span(off, start_char, start_char + len(text))
            first_window[m.example_index] = fi
        ts, te = spans[m.example_index]
        n = len(feats.inputs[fi]["input_ids"])
        s_log, e_log = np.zeros(n), np.zeros(n)
        if m.doc_start <= ts and te < m.doc_start + m.doc_len:
            s_log[ts - m.doc_start + m.ctx_offset] = 10.0
            e_log[te - m.doc_start + m.ctx_offset] = 10.0
            windows_of.setdefault(m.example_index, []).append(fi)
        else:
            s_log[0] = e_log[0] = 5.0      # a model that says "not in this window"
        starts.append(s_log)
        ends.append(e_log)
    decoded = squad.decode(data, feats, starts, ends, version_2=False)

    exact = contained = later_window = 0
    for ei, ex in enumerate(data.examples):
        text, start_char = ex.answers[0]
        ts, te = spans[ei]
        if te - ts + 1 > 30 or ei not in windows_of:
            continue                       # longer than max_answer_length / split by windows
        pred = decoded.predictions[ex.qid]
        off = feats.offsets[ex.context_index]
        aligned = off[ts, 0] == start_char and off[te, 1] == start_char + len(text)
        if aligned:
            assert pred == text, (ex.qid, text, pred)
            exact += 1
        else:   # the answer starts or ends inside a word piece ("gold" of "golden")
            assert text in pred, (ex.qid, text, pred)
            contained += 1
        if windows_of[ei][0] != first_window[ei]:
            later_window += 1
            assert pred == text or (not aligned and text in pred)
    assert exact > 0.99 * (exact + contained)
    # The real dev set has answers beyond the first window (34 at 384/128 with this vocab).
    assert later_window >= (30 if max_seq_length == 384 else 300)


def test_training_labels_cover_the_answer(dev11: squad.SquadFile, tokenizer) -> None:
    data = squad.subset(dev11, 2000)
    feats = squad.featurize(tokenizer, data, training=True, max_seq_length=128, doc_stride=48)
    assert feats.skipped == 0
    labelled = set()
    for f, m in zip(feats.inputs, feats.meta):
        ex = data.examples[m.example_index]
        text, start_char = ex.answers[0]
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0
            continue
        labelled.add(m.example_index)
        off = feats.offsets[ex.context_index]
        cs, ce = off[s - m.ctx_offset + m.doc_start, 0], off[e - m.ctx_offset + m.doc_start, 1]
        assert cs <= start_char and start_char + len(text) <= ce
        assert text in data.contexts[ex.context_index][cs:ce]
        assert f["token_type_ids"][s] == 1 and f["input_ids"][-1] == tokenizer.token_to_id("[SEP]")
        assert len(f["input_ids"]) <= 128
    assert labelled == set(range(len(data.examples)))   # every answer lies whole in some window


def test_windows_cover_every_token_with_the_given_stride() -> None:
    assert squad.windows(10, 4, 2) == [(0, 4), (2, 4), (4, 4), (6, 4)]
    assert squad.windows(3, 4, 2) == [(0, 3)]
    assert squad.windows(0, 4, 2) == [(0, 0)]
    # A token is scored only in the window that gives it the most context on both sides.
    spans = squad.windows(10, 4, 2)
    assert [i for i in range(len(spans)) if squad.max_context(spans, i, 5)] == [2]


def test_v2_null_answer_and_threshold(tokenizer) -> None:
    data = squad.read_squad(FIXTURES / "dev-v2.0.json", "2.0")
    feats = squad.featurize(tokenizer, data, training=False)
    assert len(feats.meta) == len(data.examples)          # short contexts: one window each
    starts, ends = [], []
    for m in feats.meta:
        ex = data.examples[m.example_index]
        n = len(feats.inputs[len(starts)]["input_ids"])
        s_log, e_log = np.zeros(n), np.zeros(n)
        if ex.is_impossible:
            s_log[0] = e_log[0] = 4.0                      # null wins by 8 - 2 = 6
            # The decoy span is the context's second word piece: the first is often "The",
            # which normalises to "" and would count as a correct no-answer.
            s_log[m.ctx_offset + 1] = e_log[m.ctx_offset + 1] = 1.0
        else:
            text, start_char = ex.answers[0]
            ts, te = _gold_token_span(feats.offsets[ex.context_index], start_char,
                                      start_char + len(text))
            s_log[ts + m.ctx_offset] = e_log[te + m.ctx_offset] = 3.0
            s_log[0] = e_log[0] = 1.0                      # span wins by 6 - 2 = 4
        starts.append(s_log)
        ends.append(e_log)
    dec = squad.decode(data, feats, starts, ends, version_2=True)
    for ex in data.examples:
        if ex.is_impossible:
            assert dec.predictions[ex.qid] == "" and dec.null_odds[ex.qid] == pytest.approx(6.0)
        else:
            assert dec.predictions[ex.qid] == ex.answers[0][0]
            assert dec.null_odds[ex.qid] == pytest.approx(-4.0)
        assert any(c["text"] == "" for c in dec.nbest[ex.qid])   # null always in the n-best
    res = squad.evaluate(data, dec)
    assert res["exact"] == 100.0 and res["f1"] == 100.0
    assert res["HasAns_total"] == 7 and res["NoAns_total"] == 3
    # A threshold above the null margin answers every question: the unanswerable ones go wrong.
    loose = squad.decode(data, feats, starts, ends, version_2=True, null_score_diff_threshold=7.0)
    assert all(loose.predictions[e.qid] for e in data.examples)
    assert M.squad_v2_evaluate(data.dataset, loose.predictions)["NoAns_exact"] == 0.0
    # Scored as `evaluate-v2.0.py dev.json predictions.json --na-prob-file null_odds.json`
    # does it: null odds above the script's --na-prob-thresh (1.0) count as "no answer" ...
    official = squad.evaluate(data, loose)
    assert official["NoAns_exact"] == 100.0 and official["exact"] == 100.0
    # ... and the threshold search on the null odds finds a cut that answers all correctly.
    assert official["best_exact"] == 100.0 and -4.0 <= official["best_exact_thresh"] < 6.0


def test_reader_errors_name_file_line_and_problem(tmp_path: Path, shared_data: Path) -> None:
    with pytest.raises(UserError, match=r"train-v2\.0\.json:\d+: .*question 5a8d7.*run with --version 2\.0"):
        squad.read_squad(FIXTURES / "train-v2.0.json", "1.1")
    dev = shared_data / "squad" / "v1.1" / "dev-v1.1.json"
    with pytest.raises(UserError, match=r"dev-v1\.1\.json:1: .*is_impossible.*v1\.1 file.*--version 1\.1"):
        squad.read_squad(dev, "2.0")
    bad = tmp_path / "broken.json"
    bad.write_text('{"version": "1.1", "data": [\n  {"title": "x",, }\n]}')
    with pytest.raises(UserError, match=r"broken\.json:2: not valid JSON"):
        squad.read_squad(bad, "1.1")
    data = json.loads((FIXTURES / "dev-v2.0.json").read_text())
    qa = data["data"][0]["paragraphs"][0]["qas"][4]
    assert qa["is_impossible"]
    qa["answers"] = [{"text": "346 kilometres", "answer_start": 74}]
    contradictory = tmp_path / "contradictory.json"
    contradictory.write_text(json.dumps(data, indent=1))
    with pytest.raises(UserError, match=r"contradictory\.json:\d+: article 'River_Thames', "
                                        r"paragraph 0, question .*is_impossible is true but it has answers"):
        squad.read_squad(contradictory, "2.0")
    qa["answers"] = [{"text": "346 kilometres", "answer_start": 10_000}]
    qa["is_impossible"] = False
    contradictory.write_text(json.dumps(data, indent=1))
    with pytest.raises(UserError, match=r"answer_start 10000 is outside the context"):
        squad.read_squad(contradictory, "2.0")


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_squad_entrypoint_end_to_end(tmp_path: Path, minilm_dir: Path, shared_data: Path,
                                     version: str) -> None:
    """`bertscale finetune squad` from a (tiny, random) checkpoint: trains, decodes, writes the
    official files, and the metrics in results.json are the official metric of those files."""
    ckpt = tiny_hf_checkpoint(tmp_path / "ckpt", minilm_dir / "vocab.txt")
    if version == "1.1":
        dev = shared_data / "squad" / "v1.1" / "dev-v1.1.json"
        train_file = predict_file = dev
        limits = ["--max-train-samples", "48", "--max-eval-samples", "40"]
    else:
        train_file, predict_file = FIXTURES / "train-v2.0.json", FIXTURES / "dev-v2.0.json"
        limits = []
    out = tmp_path / "out"
    rc = finetune_cli(["finetune", "squad", "--version", version, "--train-file", str(train_file),
               "--predict-file", str(predict_file), "--checkpoint", str(ckpt),
               "--output-dir", str(out), "--lr", "1e-3", "--seeds", "1,2", "--epochs", "1",
               "--batch-size", "8", "--write-nbest", "--log-every", "0", *limits,
               *(["--save-model"] if version == "1.1" else [])])
    assert rc == 0
    task_dir = out / f"SQuAD-v{version}"
    results = json.loads((task_dir / "results.json").read_text())
    preds = json.loads((task_dir / "predictions.json").read_text())
    data = squad.subset(squad.read_squad(predict_file, version), 40 if version == "1.1" else None)
    assert list(preds) == [e.qid for e in data.examples]
    for e in data.examples:      # every answer is a piece of its own context, or "" (v2.0)
        assert preds[e.qid] in data.contexts[e.context_index]
    best = [r for r in results["runs"] if r["seed"] == results["best_seed"]][0]
    if version == "1.1":
        assert best["metrics"] == M.squad_v1_evaluate(data.dataset, preds)
        assert not (task_dir / "null_odds.json").exists()
    else:
        null_odds = json.loads((task_dir / "null_odds.json").read_text())
        assert list(null_odds) == list(preds)
        assert best["metrics"] == M.squad_v2_evaluate(data.dataset, preds, null_odds)
        for qid, text in preds.items():   # "" exactly when null beats the best span by > 0
            assert (text == "") == (null_odds[qid] > 0.0)
    assert len(results["runs"]) == 2 and set(results["metrics"]["f1"]) == {"mean", "std"}
    if version == "1.1":
        # --max-eval-samples: the printed score is the official one of predictions.json against
        # the subset file written beside it (the full file would count the rest as wrong).
        subset = json.loads((task_dir / "predict_subset.json").read_text())
        assert subset["version"] == "1.1"
        assert M.squad_v1_evaluate(subset["data"], preds) == best["metrics"]
        assert results["scored_questions"] == 40
        assert results["predict_file_questions"] == len(squad.read_squad(predict_file, "1.1").examples)
        # --eval-only with the saved best model re-scores the same file to the same numbers.
        model = task_dir / "runs" / best["folder"] / "model"
        assert (model / "bertscale_task.json").is_file()
        rc = finetune_cli(["finetune", "squad", "--version", "1.1", "--predict-file",
                           str(predict_file), "--checkpoint", str(model), "--output-dir",
                           str(tmp_path / "eval"), "--eval-only", "--max-eval-samples", "40"])
        assert rc == 0
        again = json.loads((tmp_path / "eval" / "SQuAD-v1.1" / "results.json").read_text())
        assert again["metrics"] == best["metrics"]
        assert json.loads((tmp_path / "eval" / "SQuAD-v1.1" / "predictions.json").read_text()) == preds
    nbest = json.loads((task_dir / "nbest_predictions.json").read_text())
    assert all(abs(sum(c["probability"] for c in v) - 1) < 1e-6 for v in nbest.values())
