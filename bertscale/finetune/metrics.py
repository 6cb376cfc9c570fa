"""The official metrics of GLUE, SQuAD v1.1 / v2.0 and SWAG, in plain numpy and Python.

GLUE: accuracy, binary F1 (positive class 1), Matthews correlation, Pearson and Spearman
correlation (ties get their average rank, as scipy's `spearmanr` does). Values are fractions
(accuracy 0.84, not 84); the console multiplies by 100 as papers do.

SQuAD: the definitions of the official `evaluate-v1.1.py` and `evaluate-v2.0.py` scripts,
written here from their published behaviour (we do not ship their code):
  - normalisation: lower case, drop every character in `string.punctuation`, replace the
    whole words a / an / the by a space, collapse whitespace;
  - exact match: normalised strings equal; F1: bag-of-tokens overlap of the normalised strings,
    best over the gold answers;
  - v1.1 averages over every question of the dataset (a missing prediction scores 0);
  - v2.0 treats an empty gold list as the single gold answer "", gives F1 = 1 only when both
    sides are empty, averages over the questions that have a prediction, reports HasAns / NoAns
    breakdowns, and with no-answer scores searches the best threshold (`best_exact`,
    `best_exact_thresh`, `best_f1`, `best_f1_thresh`) walking the questions in increasing
    no-answer score, ties kept in the order the no-answer mapping lists them.
Scores are percentages (0..100) exactly as the official scripts print them: the sums are
accumulated in the same order with the same float operations, so the numbers are the same
floats, not merely close.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------ GLUE


def accuracy(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    p, y = _pair(preds, labels)
    return float((p == y).mean())


def f1_binary(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """F1 of the positive class 1 (MRPC "paraphrase", QQP "duplicate"). 0 when undefined
    (no predicted and no true positives), as scikit-learn's `zero_division=0`."""
    p, y = _pair(preds, labels)
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004), which reduces to
    (tp*tn - fp*fn) / sqrt(...) for two classes. 0 when a marginal is constant (CoLA's
    official scorer, like scikit-learn, reports 0 for a model that predicts one class)."""
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    pi = np.searchsorted(classes, p)
    yi = np.searchsorted(classes, y)
    k = len(classes)
    c = np.zeros((k, k), dtype=np.float64)
    np.add.at(c, (yi, pi), 1.0)
    t_sum = c.sum(axis=1)   # true counts per class
    p_sum = c.sum(axis=0)   # predicted counts per class
    n = c.sum()
    correct = np.trace(c)
    cov_yp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_yy = n * n - t_sum @ t_sum
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        return float("nan")   # constant input: undefined, as scipy reports
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0))


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start index of each run of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    run_rank = (starts + 1 + ends) / 2.0           # mean of ranks starts+1 .. ends
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def one_class(preds: Sequence[int] | np.ndarray, names: Sequence[str],
              gold: Sequence[int] | np.ndarray | None = None) -> str | None:
    """`1725/1725 predictions are "1"` when every prediction (of two or more) is one class,
    else None. A classifier that learnt only the majority class can still score well on
    accuracy or F1 (MRPC: F1 81.2 for all "1"); the count says what happened. With `gold`, the
    true labels' counts follow."""
    p = np.asarray(preds).reshape(-1)
    if p.size < 2 or (p != p[0]).any():
        return None
    text = f'{p.size}/{p.size} predictions are "{names[int(p[0])]}"'
    if gold is not None:
        counts = collections.Counter(int(g) for g in np.asarray(gold).reshape(-1))
        text += " (true labels: " + ", ".join(f'{n} "{names[k]}"'
                                              for k, n in counts.most_common()) + ")"
    return text


def _pair(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds)
    y = np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be 1-d of one length")
    if len(p) == 0:
        raise ValueError("no examples to score")
    return p, y


# ----------------------------------------------------------------------------- SQuAD

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official order:
    lower, punctuation, articles, whitespace)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_v1(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_v1(prediction: str, gold: str) -> float:
    """v1.1 F1: token overlap; 0 when nothing is shared (also when both are empty)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_v2(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1_v2(gold: str, prediction: str) -> float:
    """v2.0 F1: as v1.1, except that an empty side scores 1 when both are empty, else 0."""
    gold_tokens = normalize_answer(gold).split() if gold else []
    pred_tokens = normalize_answer(prediction).split() if prediction else []
    if not gold_tokens or not pred_tokens:
        return int(gold_tokens == pred_tokens)
    num_same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def _questions(dataset: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """The `qas` entries of the official file's `data` list, in file order."""
    for article in dataset:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def squad_v1_evaluate(dataset: Sequence[Mapping[str, Any]], predictions: Mapping[str, str]
                      ) -> dict[str, float]:
    """{"exact_match", "f1"} over every question of `dataset` (the file's "data" list);
    an unanswered question scores 0 and counts in the total, as in the official script."""
    f1 = exact_match = 0.0
    total = 0
    for qa in _questions(dataset):
        total += 1
        if qa["id"] not in predictions:
            continue
        golds = [a["text"] for a in qa["answers"]]
        pred = predictions[qa["id"]]
        exact_match += max(exact_match_v1(pred, g) for g in golds)
        f1 += max(f1_v1(pred, g) for g in golds)
    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total
    return {"exact_match": exact_match, "f1": f1}


def _v2_raw_scores(dataset: Sequence[Mapping[str, Any]], predictions: Mapping[str, str]
                   ) -> tuple[dict[str, int], dict[str, float]]:
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    for qa in _questions(dataset):
        qid = qa["id"]
        golds = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])]
        if not golds:
            golds = [""]      # unanswerable: the only correct answer is the empty string
        if qid not in predictions:
            continue
        pred = predictions[qid]
        exact[qid] = max(exact_v2(g, pred) for g in golds)
        f1[qid] = max(f1_v2(g, pred) for g in golds)
    return exact, f1


def _apply_no_answer_threshold(scores: Mapping[str, float], na_probs: Mapping[str, float],
                               has_ans: Mapping[str, bool], threshold: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for qid, s in scores.items():
        if na_probs[qid] > threshold:
            out[qid] = float(not has_ans[qid])
        else:
            out[qid] = s
    return out


def _eval_dict(exact: Mapping[str, float], f1: Mapping[str, float],
               qids: Sequence[str] | None = None) -> dict[str, float]:
    if not qids:
        total = len(exact)
        return {"exact": 100.0 * sum(exact.values()) / total,
                "f1": 100.0 * sum(f1.values()) / total, "total": total}
    total = len(qids)
    return {"exact": 100.0 * sum(exact[k] for k in qids) / total,
            "f1": 100.0 * sum(f1[k] for k in qids) / total, "total": total}


def best_threshold(predictions: Mapping[str, str], scores: Mapping[str, float],
                   na_probs: Mapping[str, float], has_ans: Mapping[str, bool]) -> tuple[float, float]:
    """(best score in %, threshold): start from "every question answered empty" (all NoAns
    correct), then answer questions in increasing no-answer score, keeping the best total."""
    cur: float = sum(1 for k in has_ans if not has_ans[k])
    best, best_thresh = cur, 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):   # stable: ties in mapping order
        if qid not in scores:
            continue
        if has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def squad_v2_evaluate(dataset: Sequence[Mapping[str, Any]], predictions: Mapping[str, str],
                      na_probs: Mapping[str, float] | None = None,
                      na_prob_thresh: float = 1.0) -> dict[str, float]:
    """The official v2.0 result dict: exact, f1, total, HasAns_* / NoAns_* when such
    questions exist, and with `na_probs` (the null-odds file) best_exact(_thresh) /
    best_f1(_thresh). Key order is the official script's."""
    given_na = na_probs is not None
    if na_probs is None:
        na_probs = {k: 0.0 for k in predictions}
    has_ans = {qa["id"]: bool(qa["answers"]) for qa in _questions(dataset)}
    has_ans_qids = [k for k, v in has_ans.items() if v]
    no_ans_qids = [k for k, v in has_ans.items() if not v]
    exact_raw, f1_raw = _v2_raw_scores(dataset, predictions)
    exact_t = _apply_no_answer_threshold(exact_raw, na_probs, has_ans, na_prob_thresh)
    f1_t = _apply_no_answer_threshold(f1_raw, na_probs, has_ans, na_prob_thresh)
    out: dict[str, float] = _eval_dict(exact_t, f1_t)
    if has_ans_qids:
        for k, v in _eval_dict(exact_t, f1_t, has_ans_qids).items():
            out[f"HasAns_{k}"] = v
    if no_ans_qids:
        for k, v in _eval_dict(exact_t, f1_t, no_ans_qids).items():
            out[f"NoAns_{k}"] = v
    if given_na:
        best_exact, exact_thresh = best_threshold(predictions, exact_raw, na_probs, has_ans)
        best_f1, f1_thresh = best_threshold(predictions, f1_raw, na_probs, has_ans)
        out["best_exact"] = best_exact
        out["best_exact_thresh"] = exact_thresh
        out["best_f1"] = best_f1
        out["best_f1_thresh"] = f1_thresh
    return out
