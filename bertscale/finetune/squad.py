"""SQuAD v1.1 and v2.0: windowed features, n-best span decoding, the official EM / F1 (v2.0:
with the no-answer threshold search), and prediction files in the official formats.

Files: bertscale.finetune.squad_files reads them.

Features follow Google's run_squad: [CLS] question [SEP] context-window [SEP], the question cut
to --max-query-length word pieces (64), windows of the context every --doc-stride tokens (128)
so that every token appears in at least one window of --max-seq-length (384). A token seen in
several windows is scored only in the window where it has the most context on both sides.
Training uses the first gold answer (v1.1 and v2.0 train files have one); a window that does not
contain the whole answer, and every window of an unanswerable v2.0 question, is labelled with
[CLS] (start = end = 0).

Decoding: the 20 best start and 20 best end positions of each window, spans inside the context
with end >= start and at most --max-answer-length (30) tokens, scored start + end logit; the
text is cut from the ORIGINAL context through the tokenizer's character offsets (no
de-tokenisation heuristics). v2.0: the null score is the smallest [CLS] start + end over the
question's windows; the question is answered "" when null - best span > --null-score-diff-threshold
(0.0), and that difference is written to null_odds.json, the file the official evaluate-v2.0.py
takes as --na-prob-file to search the best threshold.

Files written: predictions.json ({id: text}), null_odds.json (v2.0), nbest_predictions.json
(with --write-nbest), results.json (official metrics when the file has answers).

Limits: answers whose text does not match the context at answer_start are skipped for training
(counted and reported), as Google's reader skips unaligned answers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.errors import UserError
from bertscale.finetune import metrics as M
from bertscale.finetune.data import model_inputs
from bertscale.finetune.grid import check_eval_dir, run_grid
from bertscale.finetune.models import (Pretrained, build_model, check_casing, check_length,
                                       finetuned_task, load_checkpoint, load_task_tokenizer,
                                       pad_id_of, save_model, unk_fraction)
from bertscale.finetune.predict import predict
from bertscale.finetune.recipe import SquadDecode, SquadRecipe
from bertscale.finetune.results import finish
from bertscale.finetune.runtime import Runtime
from bertscale.finetune.squad_files import SquadFile, read_squad
from bertscale.finetune.train import RunSpec, fit
from bertscale.parallelize import FastPaths

# --------------------------------------------------------------------------- features


@dataclass
class FeatureMeta:
    """How one window maps back to its question's context."""

    example_index: int
    ctx_offset: int
    """Position in input_ids of the window's first context token."""
    doc_start: int
    """Index of that token among the context's tokens."""
    doc_len: int
    max_context: list[bool]
    """Per window token: this window gives it the most context of all windows."""


@dataclass
class Features:
    inputs: list[dict[str, Any]]
    meta: list[FeatureMeta]
    offsets: list[np.ndarray]
    """Per context: (n_tokens, 2) character [start, end) of each word piece."""
    skipped: int = 0
    """Training questions left out because their answer does not align with the context."""


def windows(n_tokens: int, max_doc: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) windows covering n_tokens, as Google's run_squad lays them out."""
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        length = min(n_tokens - start, max_doc)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, stride)


def max_context(spans: Sequence[tuple[int, int]], span_i: int, position: int) -> bool:
    best_score, best_i = None, None
    for i, (s, n) in enumerate(spans):
        if not s <= position < s + n:
            continue
        score = min(position - s, s + n - 1 - position) + 0.01 * n
        if best_score is None or score > best_score:
            best_score, best_i = score, i
    return best_i == span_i


def featurize(tok: Any, data: SquadFile, *, training: bool, max_seq_length: int = 384,
              doc_stride: int = 128, max_query_length: int = 64) -> Features:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ctx_enc = tok.encode_batch(data.contexts, add_special_tokens=False)
    q_enc = tok.encode_batch([e.question for e in data.examples], add_special_tokens=False)
    offsets = [np.array(enc.offsets, dtype=np.int64).reshape(-1, 2) for enc in ctx_enc]
    feats = Features([], [], offsets)
    for ei, (ex, qe) in enumerate(zip(data.examples, q_enc)):
        q_ids = qe.ids[:max_query_length]
        ctx = ctx_enc[ex.context_index]
        n_doc = len(ctx.ids)
        max_doc = max_seq_length - len(q_ids) - 3
        if max_doc <= 0:
            raise UserError(f"--max-seq-length {max_seq_length} leaves no room for the context "
                            f"after a {len(q_ids)}-token question")
        tok_start = tok_end = -1
        if training and not ex.is_impossible:
            if not ex.answers:
                raise UserError(f"{data.path}: question {ex.qid} has no answer to train on")
            text, start_char = ex.answers[0]
            context = data.contexts[ex.context_index]
            if context[start_char:start_char + len(text)] != text or not text.strip():
                feats.skipped += 1
                continue
            off = offsets[ex.context_index]
            end_char = start_char + len(text)
            tok_start = int(np.searchsorted(off[:, 1], start_char, side="right"))
            tok_end = int(np.searchsorted(off[:, 0], end_char, side="left")) - 1
            if not 0 <= tok_start <= tok_end < n_doc:
                feats.skipped += 1
                continue
        spans = windows(n_doc, max_doc, doc_stride)
        for si, (ds, dl) in enumerate(spans):
            input_ids = [cls_id, *q_ids, sep_id, *ctx.ids[ds:ds + dl], sep_id]
            type_ids = [0] * (len(q_ids) + 2) + [1] * (dl + 1)
            ctx_offset = len(q_ids) + 2
            f: dict[str, Any] = {"input_ids": input_ids, "token_type_ids": type_ids}
            if training:
                if tok_start >= ds and tok_end < ds + dl:
                    f["start_positions"] = tok_start - ds + ctx_offset
                    f["end_positions"] = tok_end - ds + ctx_offset
                else:
                    f["start_positions"] = f["end_positions"] = 0
            feats.inputs.append(f)
            feats.meta.append(FeatureMeta(ei, ctx_offset, ds, dl,
                                          [max_context(spans, si, ds + j) for j in range(dl)]))
    return feats


# ---------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    predictions: dict[str, str]
    null_odds: dict[str, float] = field(default_factory=dict)
    nbest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _top(logits: np.ndarray, n: int) -> list[int]:
    # Stable on ties: the lower position first, as a stable sort of (position, logit) would.
    return np.argsort(-logits, kind="stable")[:n].tolist()


# Over ruff's complexity limit on purpose: the official answer-span decoding, kept in one piece to
# compare with it.
def decode(data: SquadFile, feats: Features, start_logits: Sequence[np.ndarray],  # noqa: C901
           end_logits: Sequence[np.ndarray], *, version_2: bool, n_best: int = 20,
           max_answer_length: int = 30, null_score_diff_threshold: float = 0.0) -> Decoded:
    """Predictions from per-window logits (each 1-d over that window's input_ids)."""
    by_example: dict[int, list[int]] = {}
    for fi, m in enumerate(feats.meta):
        by_example.setdefault(m.example_index, []).append(fi)
    out = Decoded({})
    for ei, ex in enumerate(data.examples):
        context = data.contexts[ex.context_index]
        off = feats.offsets[ex.context_index]
        candidates: list[tuple[float, float, float, int, int]] = []  # score, s, e, char s, char e
        null_score: float | None = None
        null_pair = (0.0, 0.0)
        for fi in by_example.get(ei, []):
            m = feats.meta[fi]
            s_log = np.asarray(start_logits[fi], dtype=np.float64)
            e_log = np.asarray(end_logits[fi], dtype=np.float64)
            if version_2:
                score = s_log[0] + e_log[0]
                if null_score is None or score < null_score:
                    null_score, null_pair = score, (s_log[0], e_log[0])
            lo, hi = m.ctx_offset, m.ctx_offset + m.doc_len     # context positions [lo, hi)
            for s in _top(s_log, n_best):
                if not lo <= s < hi or not m.max_context[s - lo]:
                    continue
                for e in _top(e_log, n_best):
                    if not lo <= e < hi or e < s or e - s + 1 > max_answer_length:
                        continue
                    ts, te = m.doc_start + s - lo, m.doc_start + e - lo
                    candidates.append((s_log[s] + e_log[e], s_log[s], e_log[e],
                                       int(off[ts, 0]), int(off[te, 1])))
        candidates.sort(key=lambda c: c[0], reverse=True)
        nbest: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _score, sl, el, cs, ce in candidates:
            if len(nbest) >= n_best:
                break
            text = context[cs:ce]
            if text in seen:
                continue
            seen.add(text)
            nbest.append({"text": text, "start_logit": sl, "end_logit": el,
                          "char_start": cs, "char_end": ce})
        if version_2 and null_score is not None:
            # The null answer always stays in the n-best: at its rank when it is among the
            # n best, else after them (n + 1 entries), as Google's run_squad keeps it.
            null = {"text": "", "start_logit": null_pair[0], "end_logit": null_pair[1]}
            merged = sorted(nbest + [null], key=lambda c: c["start_logit"] + c["end_logit"],
                            reverse=True)
            rank = next(i for i, c in enumerate(merged) if c is null)
            nbest = merged[:n_best] if rank < n_best else merged
        if not nbest:
            nbest = [{"text": "", "start_logit": 0.0, "end_logit": 0.0}]
        scores = np.array([c["start_logit"] + c["end_logit"] for c in nbest])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for c, p in zip(nbest, probs):
            c["probability"] = float(p)
            c["start_logit"], c["end_logit"] = float(c["start_logit"]), float(c["end_logit"])
        out.nbest[ex.qid] = nbest
        non_null = next((c for c in nbest if c["text"]), None)
        if not version_2:
            out.predictions[ex.qid] = nbest[0]["text"]
            continue
        if non_null is None:
            # Nothing but [CLS] qualified (a context of no tokens): certainly no answer.
            out.null_odds[ex.qid] = 1e9
            out.predictions[ex.qid] = ""
            continue
        assert null_score is not None   # every window scores its [CLS]
        diff = float(null_score) - non_null["start_logit"] - non_null["end_logit"]
        out.null_odds[ex.qid] = diff
        out.predictions[ex.qid] = "" if diff > null_score_diff_threshold else non_null["text"]
    return out


def evaluate(data: SquadFile, decoded: Decoded) -> dict[str, float]:
    """The official script's numbers for these predictions (v2.0 with null_odds as the
    no-answer probabilities and the script's default --na-prob-thresh 1.0)."""
    if data.version == "1.1":
        return M.squad_v1_evaluate(data.dataset, decoded.predictions)
    return M.squad_v2_evaluate(data.dataset, decoded.predictions, decoded.null_odds)


# --------------------------------------------------------------------------------- run


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    start, end = model(**model_inputs(batch))                         # (B, T) each
    return (F.cross_entropy(start.float(), batch["start_positions"])
            + F.cross_entropy(end.float(), batch["end_positions"])) / 2


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    start, end = model(**model_inputs(batch))
    return start, end


def subset(data: SquadFile, n: int | None) -> SquadFile:
    """The first n questions (whole file when n is None); the dataset keeps only them, so the
    official metric is computed over what was predicted."""
    if not n or n >= len(data.examples):
        return data
    keep = {e.qid for e in data.examples[:n]}
    dataset = []
    for art in data.dataset:
        paras = []
        for p in art["paragraphs"]:
            qas = [q for q in p["qas"] if q["id"] in keep]
            if qas:
                paras.append({**p, "qas": qas})
        if paras:
            dataset.append({**art, "paragraphs": paras})
    return SquadFile(data.path, data.version, dataset, data.contexts, data.examples[:n])


SUBSET_FILE = "predict_subset.json"
"""With --max-eval-samples: the questions that were predicted and scored, in the official
layout, so that the official script reproduces the printed score from predictions.json."""


def run(recipe: SquadRecipe, rt: Runtime) -> dict[str, Any]:
    """Fine-tune and evaluate SQuAD over the recipe's lr x seed grid; the summary."""
    t0 = time.perf_counter()
    d = recipe.data
    name = f"SQuAD-v{d.version}"
    assert d.train_file is not None and d.predict_file is not None
    assert recipe.pretrained is not None
    train_data = subset(read_squad(d.train_file, d.version), d.max_train_samples)
    full_eval = read_squad(d.predict_file, d.version)
    eval_data = subset(full_eval, d.max_eval_samples)
    pretrained = load_checkpoint(recipe.pretrained)
    tok = load_task_tokenizer(pretrained)
    check_length(pretrained, d.max_seq_length)
    shape = dict(max_seq_length=d.max_seq_length, doc_stride=d.doc_stride,
                 max_query_length=d.max_query_length)
    train_f = featurize(tok, train_data, training=True, **shape)
    if train_f.skipped:
        rt.log(f"{d.train_file}: {train_f.skipped} questions skipped for training: their "
               f"answer text does not match the context at answer_start")
    eval_f = featurize(tok, eval_data, training=False, **shape)
    check_casing(pretrained, unk_fraction(tok, (f["input_ids"] for f in train_f.inputs)),
                 f"{d.train_file}", [e.question for e in train_data.examples[:2000]])
    pad_id = pad_id_of(tok)
    from bertscale.model import BertForQuestionAnswering
    out_dir = Path(recipe.output_dir or ".") / name
    files = _files(d.version, recipe.decode.write_nbest)
    extra = dict(**pretrained.identity(),
                 lowercase=pretrained.lowercase, train_file=str(d.train_file),
                 predict_file=str(d.predict_file),
                 train_questions=len(train_data.examples),
                 train_windows=len(train_f.inputs), skipped_train_questions=train_f.skipped,
                 scored_questions=len(eval_data.examples),
                 predict_file_questions=len(full_eval.examples),
                 max_eval_samples=d.max_eval_samples or None,
                 save_model=recipe.output.save_model, **shape, **_decoding(recipe.decode))

    def train_one(run: RunSpec) -> tuple[dict[str, float], dict[str, Any]]:
        model = build_model(BertForQuestionAnswering, pretrained, rt)
        stats = fit(model, train_f.inputs, _loss, recipe, run, rt, pad_id)
        metrics = predict_and_write(model, eval_data, eval_f, rt, pad_id, run.folder,
                                    recipe.decode, recipe.train.eval_batch_size, _fast(recipe),
                                    run.name)
        if recipe.output.save_model:
            save_model(model, pretrained, run.folder, "BertForQuestionAnswering", rt,
                       {"family": "squad", "task": name, "version": d.version, **shape,
                        **_decoding(recipe.decode), "lr": run.lr, "seed": run.seed,
                        "recipe": recipe.summary()})
        return metrics, stats

    if len(eval_data.examples) < len(full_eval.examples):
        rt.write_json(out_dir / SUBSET_FILE, {"version": d.version, "data": eval_data.dataset})
        rt.log(f"{name}: scoring the first {len(eval_data.examples)} of the "
               f"{len(full_eval.examples)} questions of {d.predict_file} (--max-eval-samples); "
               f"{out_dir / SUBSET_FILE} holds them for the official script")
    runs = run_grid(name, out_dir, recipe, len(train_f.inputs),
                    f"windows of {len(train_data.examples)} questions", train_one, extra, rt)
    names = ("exact_match", "f1") if d.version == "1.1" else ("exact", "f1", "best_f1")
    return finish(name, "f1", runs, out_dir, files, recipe, rt, t0, names, scale=1.0, **extra)


def _files(version: str, write_nbest: bool) -> list[str]:
    return ["predictions.json"] + (["null_odds.json"] if version == "2.0" else []) \
        + (["nbest_predictions.json"] if write_nbest else [])


def _decoding(decoding: SquadDecode) -> dict[str, Any]:
    return dict(n_best_size=decoding.n_best_size, max_answer_length=decoding.max_answer_length,
                null_score_diff_threshold=decoding.null_score_diff_threshold)


def _fast(recipe: SquadRecipe) -> FastPaths:
    f = recipe.fast
    return FastPaths(unpad=f.unpad, compile=f.compile, checkpoint_activations=f.checkpoint_activations)


def predict_and_write(model: nn.Module, data: SquadFile, feats: Features, rt: Runtime,
                      pad_id: int, folder: Path, decoding: SquadDecode, batch_size: int,
                      fast: FastPaths | None, label: str) -> dict[str, float]:
    """Predict `data`, decode, write predictions.json (null_odds.json for v2.0, the n-best with
    decoding.write_nbest) into `folder`; returns the official metrics (empty-file: {"f1": nan})."""
    version = data.version
    start, end = predict(model, feats.inputs, logits_of, rt, batch_size=batch_size, fast=fast,
                         pad_id=pad_id, label=label, what=Path(data.path).name)
    n = [len(f["input_ids"]) for f in feats.inputs]
    decoded = decode(data, feats, [s[:k] for s, k in zip(start, n)],
                     [e[:k] for e, k in zip(end, n)], version_2=version == "2.0",
                     n_best=decoding.n_best_size, max_answer_length=decoding.max_answer_length,
                     null_score_diff_threshold=decoding.null_score_diff_threshold)
    rt.write_json(folder / "predictions.json", decoded.predictions)
    if version == "2.0":
        rt.write_json(folder / "null_odds.json", decoded.null_odds)
    if decoding.write_nbest:
        rt.write_json(folder / "nbest_predictions.json", decoded.nbest)
    # A predict file without answers (a test set) has nothing to score.
    metrics = evaluate(data, decoded) if data.has_answers else {}
    return {k: float(v) for k, v in metrics.items()} or {"f1": float("nan")}


def load_saved(checkpoint: Path, rt: Runtime) -> tuple[nn.Module, Any, dict[str, Any], Pretrained]:
    pretrained = load_checkpoint(checkpoint)
    saved = finetuned_task(pretrained, "squad")
    return build_model(None, pretrained, rt), load_task_tokenizer(pretrained), saved, pretrained


def _saved_features(tok: Any, data: SquadFile, saved: dict[str, Any]) -> Features:
    return featurize(tok, data, training=False, max_seq_length=saved["max_seq_length"],
                     doc_stride=saved["doc_stride"], max_query_length=saved["max_query_length"])


def _saved_decoding(saved: dict[str, Any], write_nbest: bool) -> SquadDecode:
    """A --save-model folder's decoding settings."""
    return SquadDecode(saved["n_best_size"], saved["max_answer_length"],
                       saved["null_score_diff_threshold"], write_nbest)


def evaluate_saved(recipe: SquadRecipe, rt: Runtime) -> dict[str, Any]:
    """--eval-only: score data.predict_file with a saved fine-tuned model (its saved windowing
    and decoding settings), through the same code as training."""
    t0 = time.perf_counter()
    d = recipe.data
    name = f"SQuAD-v{d.version}"
    assert recipe.pretrained is not None and d.predict_file is not None
    model, tok, saved, pretrained = load_saved(recipe.pretrained, rt)
    if saved["version"] != d.version:
        raise UserError(f"{recipe.pretrained}: fine-tuned for SQuAD v{saved['version']}, not "
                        f"--version {d.version}")
    data = subset(read_squad(d.predict_file, d.version), d.max_eval_samples)
    out_dir = Path(recipe.output_dir or ".") / name
    check_eval_dir(out_dir)
    metrics = predict_and_write(model, data, _saved_features(tok, data, saved), rt,
                                pad_id_of(tok), out_dir,
                                _saved_decoding(saved, recipe.decode.write_nbest),
                                recipe.train.eval_batch_size, _fast(recipe), f"{name} eval-only")
    summary = {"task": name, "eval_only": True, "checkpoint": pretrained.source, "trained": saved,
               "metrics": metrics, "predict_file": str(d.predict_file),
               "scored_questions": len(data.examples), "seconds": time.perf_counter() - t0}
    rt.write_json(out_dir / "results.json", summary)
    if rt.is_main:
        shown = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                          if k in ("exact_match", "exact", "f1", "best_f1"))
        print(f"{name} (eval-only, {pretrained.source})  {shown}", flush=True)
    return summary


def predict_file(checkpoint: Path, input_file: Path, output: Path, rt: Runtime,
                 batch_size: int) -> Path:
    """`finetune predict` for a SQuAD model: a SQuAD JSON file (answers not needed) ->
    predictions.json ({id: answer}, the official format; v2.0 also null_odds.json beside it)."""
    model, tok, saved, _ = load_saved(checkpoint, rt)
    data = read_squad(input_file, saved["version"])
    tmp_dir = output.parent
    predict_and_write(model, data, _saved_features(tok, data, saved), rt,
                      pad_id_of(tok), tmp_dir, _saved_decoding(saved, False),
                      batch_size, None, f"{saved['task']} predict")
    if output.name != "predictions.json" and rt.is_main:
        (tmp_dir / "predictions.json").replace(output)
    return output
