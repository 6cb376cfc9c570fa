"""The official GLUE / SQuAD metrics against hand-computed cases, scikit-learn and scipy.

The official SQuAD scripts (evaluate-v1.1.py, evaluate-v2.0.py) are not published on PyPI
(the `evaluate` / `datasets` packages fetch them from a hub at run time, which these machines
cannot), so the SQuAD side is checked against cases computed by hand from the scripts'
published definitions, including the corner cases where v1.1 and v2.0 differ and the tie order
of the v2.0 threshold search.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from bertscale.finetune import metrics as M

# ------------------------------------------------------------------------------ GLUE


def test_glue_metrics_hand_computed() -> None:
    # tp=3 fn=1 fp=1 tn=2
    labels = [1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 0, 0]
    assert M.accuracy(preds, labels) == pytest.approx(5 / 7)
    assert M.f1_binary(preds, labels) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    mcc = (3 * 2 - 1 * 1) / math.sqrt((3 + 1) * (3 + 1) * (2 + 1) * (2 + 1))
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(mcc)
    # A constant prediction has no correlation (CoLA's scorer and scikit-learn say 0).
    assert M.matthews_corrcoef([1] * 7, labels) == 0.0
    # No positives predicted or true: F1 is 0, as scikit-learn's zero_division=0.
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    # Spearman with ties: ranks x = 1, 2.5, 2.5, 4 and y = 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5).
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert M.rankdata([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    assert M.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_glue_metrics_match_sklearn_and_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=500)
    noisy = np.where(rng.random(500) < 0.7, labels, 1 - labels)
    assert M.accuracy(noisy, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, noisy))
    assert M.f1_binary(noisy, labels) == pytest.approx(sklearn.metrics.f1_score(labels, noisy))
    assert M.matthews_corrcoef(noisy, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, noisy))
    # Three classes (MNLI-like): the multi-class Matthews correlation.
    y3 = rng.integers(0, 3, size=400)
    p3 = np.where(rng.random(400) < 0.5, y3, rng.integers(0, 3, size=400))
    assert M.matthews_corrcoef(p3, y3) == pytest.approx(sklearn.metrics.matthews_corrcoef(y3, p3))
    # STS-B-like scores on a 0.2 grid: many ties, which Spearman must average.
    gold = np.round(rng.uniform(0, 5, size=300) * 5) / 5
    pred = np.round((gold + rng.normal(0, 1.0, size=300)) * 2) / 2
    assert M.pearson(pred, gold) == pytest.approx(scipy.stats.pearsonr(pred, gold)[0], abs=1e-12)
    assert M.spearman(pred, gold) == pytest.approx(scipy.stats.spearmanr(pred, gold)[0], abs=1e-12)
    assert np.array_equal(M.rankdata(pred), scipy.stats.rankdata(pred))


# ----------------------------------------------------------------------------- SQuAD


def test_normalize_answer_hand_cases() -> None:
    assert M.normalize_answer("The  Cat!") == "cat"
    assert M.normalize_answer("an apple, a pear and the plum.") == "apple pear and plum"
    # Articles only as whole words; punctuation is deleted, not replaced by a space.
    assert M.normalize_answer("Theater-goers") == "theatergoers"
    assert M.normalize_answer("A-Team") == "ateam"
    assert M.normalize_answer("\u00a0Denver  Broncos\n") == "denver broncos"
    assert M.normalize_answer("“quoted”") == "“quoted”"   # not in string.punctuation: kept


def test_squad_f1_partial_credit_hand_cases() -> None:
    # pred {big, red, dog} vs gold {red, dog}: P = 2/3, R = 1, F1 = 0.8
    assert M.f1_v1("the big red dog", "red dog") == pytest.approx(0.8)
    assert M.f1_v2("red dog", "the big red dog") == pytest.approx(0.8)
    # Repeated tokens count as often as both sides have them: {a1 x2, b} vs {a1 x1}
    assert M.f1_v1("apple apple pie", "apple") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert M.f1_v1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    assert M.f1_v1("Panthers", "Denver Broncos") == 0
    # Empty answers: v1.1 gives F1 0 even when both are empty, v2.0 gives 1 (no-answer agreed).
    assert M.f1_v1("", "the") == 0 and M.exact_match_v1("", "the")
    assert M.f1_v2("", "") == 1 and M.f1_v2("", "something") == 0 and M.f1_v2("x", "") == 0


def _dataset(qas: list[dict]) -> list[dict]:
    return [{"title": "t", "paragraphs": [{"context": "unused", "qas": qas}]}]


def test_squad_v1_evaluate_hand_case() -> None:
    data = _dataset([
        {"id": "q1", "answers": [{"text": "Denver Broncos"}, {"text": "the Broncos"}]},
        {"id": "q2", "answers": [{"text": "red dog"}]},
        {"id": "q3", "answers": [{"text": "1990"}]},         # left unanswered: counts as 0
    ])
    res = M.squad_v1_evaluate(data, {"q1": "Broncos", "q2": "the big red dog"})
    # q1: EM 1 (matches "the Broncos"), F1 1; q2: EM 0, F1 0.8; q3: 0 / 0
    assert res == {"exact_match": 100.0 * 1 / 3, "f1": 100.0 * (1 + 0.8) / 3}


def test_squad_v2_evaluate_and_threshold_search_hand_case() -> None:
    data = _dataset([
        {"id": "q1", "answers": [{"text": "Denver Broncos"}]},     # answered correctly
        {"id": "q2", "answers": []},                                # unanswerable, answered "x"
        {"id": "q3", "answers": [{"text": "red dog"}]},            # partly right (F1 0.8)
        {"id": "q4", "answers": []},                                # unanswerable, answered ""
    ])
    preds = {"q1": "Denver Broncos", "q2": "purple", "q3": "big red dog", "q4": ""}
    na = {"q1": -2.0, "q2": 1.0, "q3": 0.7, "q4": 0.5}
    res = M.squad_v2_evaluate(data, preds, na)
    # Raw (na-prob threshold 1.0 leaves every prediction alone here): EM 1,0,0,1; F1 1,0,.8,1
    assert res["exact"] == 50.0 and res["f1"] == pytest.approx(70.0) and res["total"] == 4
    assert res["HasAns_exact"] == 50.0 and res["HasAns_f1"] == pytest.approx(90.0)
    assert res["NoAns_exact"] == 50.0 and res["NoAns_f1"] == 50.0
    assert res["HasAns_total"] == 2 and res["NoAns_total"] == 2
    # Threshold walk in increasing na order q1 (-2), q4 (.5), q3 (.7), q2 (1); start = 2
    # no-answer questions right. Exact: 2 -> 3 (q1, thresh -2) -> 3 -> 3 -> 2: best 3/4 at -2.
    assert res["best_exact"] == 75.0 and res["best_exact_thresh"] == -2.0
    # F1: 2 -> 3 (q1) -> 3 (q4) -> 3.8 (q3, thresh .7) -> 2.8: best 3.8/4 at 0.7.
    assert res["best_f1"] == pytest.approx(95.0) and res["best_f1_thresh"] == 0.7
    assert list(res) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                         "NoAns_exact", "NoAns_f1", "NoAns_total", "best_exact",
                         "best_exact_thresh", "best_f1", "best_f1_thresh"]
    # A no-answer probability above --na-prob-thresh turns the prediction into "no answer".
    strict = M.squad_v2_evaluate(data, preds, na, na_prob_thresh=0.6)
    # q2 (1.0) and q3 (0.7) now count as "no answer": q2 right (1), q3 wrong (0).
    assert strict["exact"] == 75.0 and strict["f1"] == 75.0
    # Without a null-odds file there is no threshold search.
    assert "best_f1" not in M.squad_v2_evaluate(data, preds)


def test_squad_v2_threshold_ties_follow_the_mapping_order() -> None:
    """Equal no-answer scores are walked in the order the null-odds mapping lists them (the
    official script sorts with Python's stable sort), which changes the best threshold."""
    data = _dataset([{"id": "a", "answers": []}, {"id": "b", "answers": [{"text": "yes"}]}])
    preds = {"a": "something", "b": "yes"}
    first_a = M.squad_v2_evaluate(data, preds, {"a": 0.3, "b": 0.3})
    first_b = M.squad_v2_evaluate(data, preds, {"b": 0.3, "a": 0.3})
    # a first: 1 -> 0 -> 1, never above the start -> 50 % at 0.0; b first: 1 -> 2 (0.3) -> 1.
    assert (first_a["best_exact"], first_a["best_exact_thresh"]) == (50.0, 0.0)
    assert (first_b["best_exact"], first_b["best_exact_thresh"]) == (100.0, 0.3)


def test_squad_v2_gold_that_normalises_to_nothing_is_no_answer() -> None:
    # A gold answer "The" normalises to "": v2.0 drops it and scores against "" instead, but
    # the question still counts as HasAns (its answers list is not empty).
    data = _dataset([{"id": "q", "answers": [{"text": "The"}]}])
    res = M.squad_v2_evaluate(data, {"q": ""})
    assert res["exact"] == 100.0 and res["HasAns_total"] == 1 and "NoAns_total" not in res
