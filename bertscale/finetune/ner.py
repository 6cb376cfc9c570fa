"""Named entity recognition on CoNLL-2003 files, the two ways of the paper (Devlin et al.
2018, Section 5.3): fine-tuning BertForTokenClassification, or a tagger on frozen features.

What it does and its limits are the `bertscale finetune ner --help` text
(`bertscale.commands.finetune.NER_DESCRIPTION`); its recipe is bertscale.finetune.recipe's
NerRecipe.

`run` trains the recipe's grid in either mode (`token_splits`: word pieces for fine-tuning;
`feature_splits`: frozen-BERT features for the tagger, extracted once for every run);
`evaluate_saved` re-scores a saved model (--eval-only); `predict_file` tags a new file.

Fine-tune mode only: --save-model writes each run's BertForTokenClassification (head included)
with bertscale_task.json (labels, tag scheme, length, recipe); `--eval-only` re-scores a dev
(and test) file with such a folder through the same prediction and scoring code as training, and
`finetune predict` tags a new file (word per line, other columns ignored) as CoNLL-style
`word<TAB>tag` lines. Feature mode's tagger is not saved (it is not a Hugging Face model).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.errors import UserError
from bertscale.files import read_text
from bertscale.finetune import seqeval
from bertscale.finetune.data import model_inputs
from bertscale.finetune.grid import check_eval_dir, run_grid
from bertscale.finetune.models import (Pretrained, build_model, check_casing, check_length,
                                       finetuned_task, load_checkpoint, load_task_tokenizer,
                                       pad_id_of, save_model, unk_fraction)
from bertscale.finetune.predict import predict
from bertscale.finetune.recipe import NerRecipe
from bertscale.finetune.results import finish
from bertscale.finetune.runtime import Runtime
from bertscale.finetune.train import RunSpec, fit
from bertscale.parallelize import FastPaths

IGNORE = -100


# ------------------------------------------------------------------------------------- data


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    line: int
    """1-based line number of its first token (for messages)."""


def read_conll(path: str | Path, tagged: bool = True) -> list[Sentence]:
    """Read a CoNLL-2003-style file; errors name the file, the line and the problem. Untagged
    (`finetune predict`): the first column is the word, any others are ignored, tags are []."""
    path = Path(path)
    text = read_text(path, "CoNLL file")
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0

    def close() -> None:
        nonlocal words, tags
        if words:
            sentences.append(Sentence(words, tags, start))
        words, tags = [], []

    for n, line in enumerate(text.splitlines(), start=1):
        cols = line.split()
        if not cols:
            close()
            continue
        if cols[0] == "-DOCSTART-":
            close()
            continue
        if not tagged:
            if not words:
                start = n
            words.append(cols[0])
            continue
        if len(cols) < 2:
            raise UserError(f"{path}:{n}: {line.strip()!r} has no tag column (a CoNLL line is "
                            f"the word, optional columns, then the tag)")
        if not seqeval.is_valid_tag(cols[-1]):
            raise UserError(f"{path}:{n}: tag {cols[-1]!r} is not O or B-/I-/E-/S-<TYPE>")
        if not words:
            start = n
        words.append(cols[0])
        tags.append(cols[-1])
    close()
    if not sentences:
        raise UserError(f"{path}: no sentences")
    return sentences


def label_list(tag_sequences: Sequence[Sequence[str]]) -> list[str]:
    """O first, then the others sorted by type, then prefix: a stable id for every tag."""
    seen = {t for tags in tag_sequences for t in tags} - {"O"}
    return ["O", *sorted(seen, key=lambda t: (seqeval.split_tag(t)[1], t))]


def _scheme(tags: Sequence[str], scheme: str) -> list[str]:
    return seqeval.to_iob2(tags) if scheme == "iob2" else list(tags)


# ------------------------------------------------------------------------------ features


def token_features(tok: Any, sentences: Sequence[Sentence], label_to_id: dict[str, int],
                   max_length: int, scheme: str
                   ) -> tuple[list[dict[str, Any]], list[list[int]], int]:
    """Fine-tuning inputs: word pieces with the label at each word's first piece and IGNORE
    elsewhere. Returns the features, each sentence's first-piece positions, and how many
    sentences were cut to max_length. Tags the label set lacks are IGNORE (they can only be
    scored, not learned)."""
    from bertscale.features import encode_words
    encs = encode_words(tok, [s.words for s in sentences], max_length)
    width = max(len(e.ids) for e in encs)
    feats = []
    for s, e in zip(sentences, encs):
        labels = [IGNORE] * width                       # padded to one width: collate stacks it
        for pos, tag in zip(e.first, _scheme(s.tags, scheme)):
            labels[pos] = label_to_id.get(tag, IGNORE)
        feats.append({"input_ids": e.ids, "token_type_ids": [0] * len(e.ids), "labels": labels})
    return feats, [e.first for e in encs], sum(e.truncated for e in encs)


def word_features(first_row: int, vectors: Sequence[np.ndarray], sentences: Sequence[Sentence],
                  label_to_id: dict[str, int], scheme: str) -> list[dict[str, Any]]:
    """Feature-mode inputs: `input_ids` are the rows of each word's vector in the tagger's
    feature table (row 0 is the zero padding row), labels one per word."""
    width = max(len(v) for v in vectors)
    feats, row = [], first_row
    for s, v in zip(sentences, vectors):
        n = len(v)
        labels = [label_to_id.get(t, IGNORE) for t in _scheme(s.tags, scheme)[:n]]
        feats.append({"input_ids": list(range(row, row + n)), "token_type_ids": [0] * n,
                      "labels": labels + [IGNORE] * (width - n)})
        row += n
    return feats


class FeatureTagger(nn.Module):
    """A tagger over frozen per-word features: dropout, then a BiLSTM (or nothing), then a
    linear layer to the labels. The features live in a non-persistent buffer indexed by
    `input_ids`, so the shared training loop feeds it like a BERT head."""

    def __init__(self, table: Tensor, num_labels: int, kind: str = "bilstm", hidden: int = 768,
                 layers: int = 2, dropout: float = 0.5):
        super().__init__()
        self.table: Tensor
        self.register_buffer("table", table, persistent=False)                # (rows, D)
        self.dropout = nn.Dropout(dropout)
        D = table.shape[1]
        if kind == "bilstm":
            self.lstm: nn.LSTM | None = nn.LSTM(D, hidden, num_layers=layers, batch_first=True,
                                                bidirectional=True,
                                                dropout=dropout if layers > 1 else 0.0)
            width = 2 * hidden
        elif kind == "linear":
            self.lstm = None
            width = D
        else:
            raise UserError(f"ner.tagger {kind!r}: choose bilstm or linear")
        self.classifier = nn.Linear(width, num_labels)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        x = self.dropout(self.table[input_ids])                                # (B, W, D)
        if self.lstm is not None:
            W = input_ids.shape[1]
            lengths = (attention_mask.sum(1) if attention_mask is not None
                       else torch.full((input_ids.shape[0],), W)).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            y, _ = self.lstm(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=W)
            x = self.dropout(x)                                                # (B, W, 2h)
        return self.classifier(x)                                              # (B, W, labels)


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(**model_inputs(batch)).float()                              # (B, T, C)
    labels = batch["labels"][:, :logits.shape[1]]                               # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE)


def _argmax(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    # The argmax, not the logits: predict() pads a ragged LAST axis, which for (B, T, C)
    # logits would be the label axis; (B, T) predictions have T last.
    predicted: Tensor = model(**model_inputs(batch)).argmax(-1)                # (B, T)
    return predicted


# --------------------------------------------------------------------------------- running


@dataclass
class Split:
    name: str
    sentences: list[Sentence]
    features: list[dict[str, Any]]
    first: list[list[int]] | None = None
    """Fine-tuning: each sentence's first-piece positions (predictions are read there)."""


def decode_tags(split: Split, preds: np.ndarray, labels: list[str]) -> list[list[str]]:
    """Per-word predicted tags; words without a prediction (cut by the length limit) are O."""
    out = []
    for i, s in enumerate(split.sentences):
        if split.first is not None:
            ids = [int(preds[i, p]) for p in split.first[i]]
        else:
            ids = [int(x) for x in preds[i, :len(split.features[i]["input_ids"])]]
        tags = [labels[j] if 0 <= j < len(labels) else "O" for j in ids]
        out.append(tags + ["O"] * (len(s.words) - len(tags)))
    return out


def _predictions_text(sentences: Sequence[Sentence], gold: Sequence[Sequence[str]],
                      pred: Sequence[Sequence[str]]) -> str:
    lines = []
    for s, g, p in zip(sentences, gold, pred):
        lines += [f"{w} {a} {b}" for w, a, b in zip(s.words, g, p)]
        lines.append("")
    return "\n".join(lines) + "\n"


def _tagged_text(sentences: Sequence[Sentence], pred: Sequence[Sequence[str]]) -> str:
    """`finetune predict`: CoNLL-style `word<TAB>predicted tag`, a blank line between sentences."""
    lines = []
    for s, p in zip(sentences, pred):
        lines += [f"{w}\t{t}" for w, t in zip(s.words, p)]
        lines.append("")
    return "\n".join(lines) + "\n"


def _fast(recipe: NerRecipe) -> FastPaths:
    f = recipe.fast
    return FastPaths(unpad=f.unpad, compile=f.compile, checkpoint_activations=f.checkpoint_activations)


def score_and_write(model: nn.Module, splits: dict[str, Split], labels: list[str], scheme: str,
                    rt: Runtime, batch_size: int, fast: FastPaths | None, pad_id: int,
                    run_dir: Path, label: str) -> dict[str, float]:
    """Predict and score the dev (and test) split, writing <split>_predictions.txt into
    `run_dir`; test metrics are prefixed test_. Training and --eval-only share it, which is why
    re-scoring a saved model gives the run's own numbers."""
    metrics: dict[str, float] = {}
    for name in ("dev", "test"):
        if name not in splits:
            continue
        sp = splits[name]
        (preds,) = predict(model, sp.features, _argmax, rt, batch_size=batch_size, fast=fast,
                           pad_id=pad_id, label=label, what=name)
        tags = decode_tags(sp, preds, labels)
        gold = [_scheme(s.tags, scheme) for s in sp.sentences]
        prefix = "" if name == "dev" else "test_"
        metrics.update({prefix + k: v for k, v in seqeval.evaluate(gold, tags).as_metrics().items()})
        rt.write_text(run_dir / f"{name}_predictions.txt", _predictions_text(sp.sentences, gold, tags))
    return metrics


def load_saved(checkpoint: Path, rt: Runtime) -> tuple[nn.Module, Any, dict[str, Any], Pretrained]:
    """A `--save-model` folder: (model with its trained head, tokenizer, saved task)."""
    pretrained = load_checkpoint(checkpoint)
    saved = finetuned_task(pretrained, "ner")
    return build_model(None, pretrained, rt), load_task_tokenizer(pretrained), saved, pretrained


def _token_split(tok: Any, name: str, sents: list[Sentence], labels: list[str],
                 max_length: int, scheme: str) -> tuple[Split, int]:
    feats, first, cut = token_features(tok, sents, {t: i for i, t in enumerate(labels)},
                                       max_length, scheme)
    return Split(name, sents, feats, first), cut


def _warn_cut(cut: int, max_length: int, rt: Runtime) -> None:
    if cut:
        rt.log(f"warning: {cut} sentences exceed --max-seq-length {max_length} "
               f"word pieces; their last words are predicted as O")


def evaluate_saved(recipe: NerRecipe, rt: Runtime) -> dict[str, Any]:
    """--eval-only: score data.dev_file (and data.test_file) with a saved fine-tuned model, its
    labels, tag scheme and length from bertscale_task.json."""
    t0 = time.perf_counter()
    d = recipe.data
    assert recipe.pretrained is not None and d.dev_file is not None
    model, tok, saved, pretrained = load_saved(recipe.pretrained, rt)
    labels, scheme, length = saved["labels"], saved["tag_scheme"], saved["max_seq_length"]
    named = [("dev", read_conll(d.dev_file)[:d.max_eval_samples or None])]
    named += [("test", read_conll(d.test_file))] if d.test_file else []
    splits, cut_total = {}, 0
    for name, sents in named:
        splits[name], cut = _token_split(tok, name, sents, labels, length, scheme)
        cut_total += cut
    _warn_cut(cut_total, length, rt)
    out_dir = Path(recipe.output_dir or ".") / "NER"
    check_eval_dir(out_dir)
    metrics = score_and_write(model, splits, labels, scheme, rt, recipe.train.eval_batch_size,
                              _fast(recipe), pad_id_of(tok), out_dir, "NER eval-only")
    summary = {"task": "NER", "eval_only": True, "checkpoint": pretrained.source,
               "trained": saved, "metrics": metrics, "dev_file": str(d.dev_file),
               "test_file": str(d.test_file) if d.test_file else None,
               "max_eval_samples": d.max_eval_samples or None, "truncated_sentences": cut_total,
               "seconds": time.perf_counter() - t0}
    rt.write_json(out_dir / "results.json", summary)
    if rt.is_main:
        shown = "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("f1", "precision", "recall",
                                                                   "accuracy"))
        print(f"NER (eval-only, {pretrained.source})  {shown}", flush=True)
    return summary


def predict_file(checkpoint: Path, input_file: Path, output: Path, rt: Runtime,
                 batch_size: int) -> Path:
    """`finetune predict` for a NER model: a CoNLL-style file (the word first on each line; tag
    and other columns ignored) -> `word<TAB>predicted tag` lines, a blank line between
    sentences (tags in the scheme the model was trained on)."""
    model, tok, saved, _ = load_saved(checkpoint, rt)
    labels, length = saved["labels"], saved["max_seq_length"]
    split, cut = _token_split(tok, "predict", read_conll(input_file, tagged=False), labels,
                              length, saved["tag_scheme"])
    _warn_cut(cut, length, rt)
    (preds,) = predict(model, split.features, _argmax, rt, batch_size=batch_size,
                       pad_id=pad_id_of(tok), label="NER predict", what=input_file.name)
    rt.write_text(output, _tagged_text(split.sentences, decode_tags(split, preds, labels)))
    return output


def _majority(train: Sequence[Sentence], gold: Sequence[Sequence[str]], scheme: str
              ) -> tuple[str, float]:
    """The most frequent training tag and the token accuracy of always predicting it."""
    counts = collections.Counter(t for s in train for t in _scheme(s.tags, scheme))
    tag = counts.most_common(1)[0][0]
    total = sum(len(g) for g in gold)
    return tag, sum(t == tag for g in gold for t in g) / max(total, 1)


Named = list[tuple[str, list[Sentence]]]


def run(recipe: NerRecipe, rt: Runtime) -> dict[str, Any]:
    """Train the recipe's lr x seed grid in its mode (ner.mode: fine-tuning, or a tagger on
    frozen features), score dev (and test), and return the summary."""
    t0 = time.perf_counter()
    d, scheme = recipe.data, recipe.data.tag_scheme
    assert d.train_file is not None and d.dev_file is not None and recipe.pretrained is not None
    train_s = read_conll(d.train_file)[:d.max_train_samples or None]
    dev_s = read_conll(d.dev_file)[:d.max_eval_samples or None]
    test_s = read_conll(d.test_file) if d.test_file else []
    labels = label_list([_scheme(s.tags, scheme) for s in train_s])
    unseen = sorted({t for s in dev_s + test_s for t in _scheme(s.tags, scheme)} - set(labels))
    if unseen:
        rt.log(f"note: tags {', '.join(unseen)} of the dev/test files never occur in "
               f"{d.train_file}; they are scored but cannot be predicted")
    pretrained = load_checkpoint(recipe.pretrained)
    check_length(pretrained, d.max_seq_length)
    tok = load_task_tokenizer(pretrained)   # no truncation: encode_words cuts and counts
    check_casing(pretrained, unk_fraction(
        tok, (e.ids for e in tok.encode_batch([s.words for s in train_s], is_pretokenized=True))),
        str(d.train_file), [" ".join(s.words) for s in train_s[:2000]])
    named: Named = [("train", train_s), ("dev", dev_s)] + ([("test", test_s)] if test_s else [])
    if recipe.ner.mode == "finetune":
        splits, cut_total = token_splits(tok, named, labels, recipe)
        table, pad_id = None, pad_id_of(tok)
    else:
        splits, cut_total, table = feature_splits(pretrained, named, labels, recipe, rt)
        pad_id = 0
    _warn_cut(cut_total, d.max_seq_length, rt)
    return train_grid(recipe, rt, splits, labels, pretrained, table, pad_id, cut_total, t0)


def token_splits(tok: Any, named: Named, labels: list[str],
                 recipe: NerRecipe) -> tuple[dict[str, Split], int]:
    """Fine-tune mode's inputs: each split's sentences as word pieces (the first piece of each
    word labelled), and how many sentences were cut to data.max_seq_length."""
    splits, cut_total = {}, 0
    for name, sents in named:
        splits[name], cut = _token_split(tok, name, sents, labels, recipe.data.max_seq_length,
                                         recipe.data.tag_scheme)
        cut_total += cut
    return splits, cut_total


def feature_splits(pretrained: Pretrained, named: Named, labels: list[str], recipe: NerRecipe,
                   rt: Runtime) -> tuple[dict[str, Split], int, Tensor]:
    """Feature mode's inputs: the frozen model's features of every word of every split,
    computed once (`bertscale.embed`'s extractor) into one table the tagger indexes (row 0: the
    padding row); each split's rows with their labels; the sentences cut by the length limit."""
    from bertscale.features import FeatureExtractor

    d, m, t = recipe.data, recipe.ner, recipe.train
    label_to_id = {tag: i for i, tag in enumerate(labels)}
    ex = FeatureExtractor(pretrained, m.layers, m.layer_weights or None, d.max_seq_length,
                          str(rt.device), t.precision, unpad=recipe.fast.unpad)
    rows: list[np.ndarray] = [np.zeros((1, ex.dim), np.float32)]            # row 0: padding
    splits, cut_total = {}, 0
    t_feat = time.perf_counter()
    for name, sents in named:
        vectors: list[np.ndarray] = []
        for i in range(0, len(sents), t.eval_batch_size):
            vecs, cut = ex.embed_words([s.words for s in sents[i:i + t.eval_batch_size]])
            vectors += vecs
            cut_total += cut
        splits[name] = Split(name, sents, word_features(
            sum(len(r) for r in rows), vectors, sents, label_to_id, d.tag_scheme))
        rows += [v for v in vectors if len(v)]
    table = torch.from_numpy(np.concatenate(rows))
    rt.log(f"NER features: {len(table) - 1} words x {ex.dim} ({m.layers}) in "
           f"{time.perf_counter() - t_feat:.1f} s")
    return splits, cut_total, table


def train_grid(recipe: NerRecipe, rt: Runtime, splits: dict[str, Split], labels: list[str],
               pretrained: Pretrained, table: Tensor | None, pad_id: int, cut_total: int,
               t0: float) -> dict[str, Any]:
    """The lr x seed grid on the prepared splits: a BertForTokenClassification (`table` None)
    or a FeatureTagger on the feature table per run; the summary."""
    from bertscale.model import BertForTokenClassification

    d, m = recipe.data, recipe.ner
    gold = {name: [_scheme(s.tags, d.tag_scheme) for s in sp.sentences]
            for name, sp in splits.items()}
    majority_tag, majority_acc = _majority(splits["train"].sentences, gold["dev"], d.tag_scheme)
    task = "NER" if m.mode == "finetune" else "NER-feature"
    out_dir = Path(recipe.output_dir or ".") / task

    def train_one(run: RunSpec) -> tuple[dict[str, float], dict[str, Any]]:
        if table is None:
            model: nn.Module = build_model(BertForTokenClassification, pretrained, rt,
                                           num_labels=len(labels))
        else:
            model = FeatureTagger(table, len(labels), m.tagger, m.tagger_hidden, m.tagger_layers,
                                  m.tagger_dropout)
        stats = fit(model, splits["train"].features, _loss, recipe, run, rt, pad_id)
        metrics = score_and_write(model, splits, labels, d.tag_scheme, rt,
                                  recipe.train.eval_batch_size, _fast(recipe), pad_id,
                                  run.folder, run.name)
        if recipe.output.save_model:
            save_model(model, pretrained, run.folder, "BertForTokenClassification", rt,
                       {"family": "ner", "task": "NER", "labels": labels,
                        "tag_scheme": d.tag_scheme, "max_seq_length": d.max_seq_length,
                        "lr": run.lr, "seed": run.seed, "recipe": recipe.summary()})
        return metrics, stats

    extra: dict[str, Any] = dict(
        **pretrained.identity(),
        lowercase=pretrained.lowercase, mode=m.mode, labels=labels, tag_scheme=d.tag_scheme,
        train_file=str(d.train_file), dev_file=str(d.dev_file),
        test_file=str(d.test_file) if d.test_file else None,
        train_sentences=len(splits["train"].sentences),
        dev_sentences=len(splits["dev"].sentences),
        majority_tag=majority_tag, majority_accuracy=majority_acc,
        max_seq_length=d.max_seq_length, truncated_sentences=cut_total,
        max_eval_samples=d.max_eval_samples or None, save_model=recipe.output.save_model)
    if m.mode == "feature":
        extra.update(layers=m.layers, layer_weights=m.layer_weights or None, tagger=m.tagger,
                     tagger_hidden=m.tagger_hidden, tagger_layers=m.tagger_layers,
                     tagger_dropout=m.tagger_dropout)
    runs = run_grid(task, out_dir, recipe, len(splits["train"].features), "sentences", train_one,
                    extra, rt)
    return finish(task, "f1", runs, out_dir, ["dev_predictions.txt", "test_predictions.txt"],
                  recipe, rt, t0, ("f1", "precision", "recall", "accuracy"), **extra)
