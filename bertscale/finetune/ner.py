"""Named entity recognition on CoNLL-2003 files, the two ways of the paper (Devlin et al.
2018, Section 5.3): fine-tuning BertForTokenClassification, or a tagger on frozen features.

What it does and its limits are the `bertscale finetune ner --help` text
(`bertscale.finetune.cli.NER_DESCRIPTION`); its flags are parsed in that module too, so that
`bertscale --help` does not import torch.

Fine-tune mode only: --save-model writes each run's BertForTokenClassification (head included)
with bertscale_task.json (labels, tag scheme, length, recipe); `--eval-only` re-scores a dev
(and test) file with such a folder through the same prediction and scoring code as training, and
`finetune predict` tags a new file (word per line, other columns ignored) as CoNLL-style
`word<TAB>tag` lines. Feature mode's tagger is not saved (it is not a Hugging Face model).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.errors import UserError
from bertscale.files import read_text
from bertscale.finetune import common
from bertscale.finetune import seqeval

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
            raise UserError(f"--tagger {kind!r}: choose bilstm or linear")
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
    logits = model(**common.model_inputs(batch)).float()                       # (B, T, C)
    labels = batch["labels"][:, :logits.shape[1]]                               # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE)


def _argmax(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    # The argmax, not the logits: predict() pads a ragged LAST axis, which for (B, T, C)
    # logits would be the label axis; (B, T) predictions have T last.
    return model(**common.model_inputs(batch)).argmax(-1)                       # (B, T)


# --------------------------------------------------------------------------------- running


@dataclass
class NerArgs:
    train_file: Path | None
    dev_file: Path
    checkpoint: Path
    output_dir: Path
    test_file: Path | None = None
    mode: str = "finetune"
    """"finetune" (the whole model) or "feature" (frozen BERT + a tagger)."""
    lrs: list[float] = field(default_factory=lambda: [5e-5])
    seeds: list[int] = field(default_factory=lambda: [1])
    train: common.TrainConfig = field(default_factory=common.TrainConfig)
    max_seq_length: int = 256
    tag_scheme: str = "iob2"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    layers: str = "concat-last-four"
    """Feature mode: which hidden states (see `bertscale.embed`)."""
    layer_weights: list[float] | None = None
    tagger: str = "bilstm"
    tagger_hidden: int = 768
    tagger_layers: int = 2
    tagger_dropout: float = 0.5
    save_model: bool = False
    """Fine-tune mode: write each run's model with its labels (bertscale_task.json)."""
    eval_only: bool = False
    """Score dev (and test) with a --save-model folder in `checkpoint`; no training."""


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


def score_and_write(model: nn.Module, splits: dict[str, Split], labels: list[str],
                    scheme: str, cfg: common.TrainConfig, pad_id: int,
                    run_dir: Path) -> dict[str, float]:
    """Predict and score the dev (and test) split, writing <split>_predictions.txt into
    `run_dir`; test metrics are prefixed test_. Training and --eval-only share it, which is why
    re-scoring a saved model gives the run's own numbers."""
    metrics: dict[str, float] = {}
    for name in ("dev", "test"):
        if name not in splits:
            continue
        sp = splits[name]
        (preds,) = common.predict(model, sp.features, _argmax, cfg, pad_id, what=name)
        tags = decode_tags(sp, preds, labels)
        gold = [_scheme(s.tags, scheme) for s in sp.sentences]
        prefix = "" if name == "dev" else "test_"
        metrics.update({prefix + k: v for k, v in seqeval.evaluate(gold, tags).as_metrics().items()})
        common.write_text_on_main(run_dir / f"{name}_predictions.txt",
                                  _predictions_text(sp.sentences, gold, tags))
    return metrics


def load_saved(checkpoint: Path) -> tuple[nn.Module, Any, dict[str, Any], common.Pretrained]:
    """A `--save-model` folder: (model with its trained head, tokenizer, saved task)."""
    pretrained = common.load_checkpoint(checkpoint)
    saved = common.finetuned_task(pretrained, "ner")
    return common.build_model(None, pretrained), common.load_task_tokenizer(pretrained), saved, \
        pretrained


def _token_split(tok: Any, name: str, sents: list[Sentence], labels: list[str],
                 max_length: int, scheme: str) -> tuple[Split, int]:
    feats, first, cut = token_features(tok, sents, {t: i for i, t in enumerate(labels)},
                                       max_length, scheme)
    return Split(name, sents, feats, first), cut


def _warn_cut(cut: int, max_length: int) -> None:
    if cut:
        common.log(f"warning: {cut} sentences exceed --max-seq-length {max_length} "
                   f"word pieces; their last words are predicted as O")


def evaluate_saved(a: NerArgs, t0: float) -> dict[str, Any]:
    """--eval-only: score --dev-file (and --test-file) with a saved fine-tuned model, its labels,
    tag scheme and length from bertscale_task.json."""
    model, tok, saved, pretrained = load_saved(a.checkpoint)
    labels, scheme, length = saved["labels"], saved["tag_scheme"], saved["max_seq_length"]
    named = [("dev", read_conll(a.dev_file)[:a.max_eval_samples or None])]
    named += [("test", read_conll(a.test_file))] if a.test_file else []
    splits, cut_total = {}, 0
    for name, sents in named:
        splits[name], cut = _token_split(tok, name, sents, labels, length, scheme)
        cut_total += cut
    _warn_cut(cut_total, length)
    out_dir = Path(a.output_dir) / "NER"
    common.check_eval_dir(out_dir)
    cfg = dataclasses.replace(a.train)
    cfg.run = common.RunContext(out_dir, "NER eval-only")
    metrics = score_and_write(model, splits, labels, scheme, cfg, tok.token_to_id("[PAD]"),
                              out_dir)
    summary = {"task": "NER", "eval_only": True, "checkpoint": pretrained.source,
               "trained": saved, "metrics": metrics, "dev_file": str(a.dev_file),
               "test_file": str(a.test_file) if a.test_file else None,
               "max_eval_samples": a.max_eval_samples, "truncated_sentences": cut_total,
               "seconds": time.perf_counter() - t0}
    common.write_json_on_main(out_dir / "results.json", summary)
    if common.ranks().is_main:
        shown = "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("f1", "precision", "recall",
                                                                   "accuracy"))
        print(f"NER (eval-only, {pretrained.source})  {shown}", flush=True)
    return summary


def predict_file(checkpoint: Path, input_file: Path, output: Path,
                 cfg: common.TrainConfig) -> Path:
    """`finetune predict` for a NER model: a CoNLL-style file (the word first on each line; tag
    and other columns ignored) -> `word<TAB>predicted tag` lines, a blank line between
    sentences (tags in the scheme the model was trained on)."""
    model, tok, saved, _ = load_saved(checkpoint)
    labels, length = saved["labels"], saved["max_seq_length"]
    split, cut = _token_split(tok, "predict", read_conll(input_file, tagged=False), labels,
                              length, saved["tag_scheme"])
    _warn_cut(cut, length)
    cfg = dataclasses.replace(cfg)
    cfg.run = common.RunContext(output.parent, "NER predict")
    (preds,) = common.predict(model, split.features, _argmax, cfg, tok.token_to_id("[PAD]"),
                              what=input_file.name)
    common.write_text_on_main(output, _tagged_text(split.sentences,
                                                   decode_tags(split, preds, labels)))
    return output


def _majority(train: Sequence[Sentence], gold: Sequence[Sequence[str]], scheme: str
              ) -> tuple[str, float]:
    """The most frequent training tag and the token accuracy of always predicting it."""
    counts = collections.Counter(t for s in train for t in _scheme(s.tags, scheme))
    tag = counts.most_common(1)[0][0]
    total = sum(len(g) for g in gold)
    return tag, sum(t == tag for g in gold for t in g) / max(total, 1)


# Over ruff's complexity limit on purpose: the NER command's modes (train, eval-only, predict) in
# one outline.
def run(a: NerArgs) -> dict[str, Any]:  # noqa: C901
    common.ranks(a.train.device)  # one process, or the data-parallel group of a launcher
    t0 = time.perf_counter()
    if a.mode not in ("finetune", "feature"):
        raise UserError(f"--mode {a.mode!r}: choose finetune or feature")
    if a.mode == "feature" and (a.save_model or a.eval_only):
        raise UserError("--save-model and --eval-only are for --mode finetune (feature mode's "
                        "tagger is not saved)")
    if a.eval_only:
        return evaluate_saved(a, t0)
    if a.train_file is None:
        raise UserError("--train-file is required (unless --eval-only)")
    if a.tag_scheme not in ("iob2", "keep"):
        raise UserError(f"--tag-scheme {a.tag_scheme!r}: choose iob2 or keep")
    if a.max_seq_length < 3:
        raise UserError(f"--max-seq-length {a.max_seq_length}: needs room for [CLS], a word "
                        f"and [SEP] (at least 3)")
    train_s = read_conll(a.train_file)[:a.max_train_samples or None]
    dev_s = read_conll(a.dev_file)[:a.max_eval_samples or None]
    test_s = read_conll(a.test_file) if a.test_file else []
    labels = label_list([_scheme(s.tags, a.tag_scheme) for s in train_s])
    label_to_id = {t: i for i, t in enumerate(labels)}
    unseen = sorted({t for s in dev_s + test_s for t in _scheme(s.tags, a.tag_scheme)}
                    - set(labels))
    if unseen:
        common.log(f"note: tags {', '.join(unseen)} of the dev/test files never occur in "
                   f"{a.train_file}; they are scored but cannot be predicted")
    pretrained = common.load_checkpoint(a.checkpoint)
    common.check_length(pretrained, a.max_seq_length)
    tok = common.load_task_tokenizer(pretrained)   # no truncation: encode_words cuts and counts
    common.check_casing(pretrained, common.unk_fraction(
        tok, (e.ids for e in tok.encode_batch([s.words for s in train_s], is_pretokenized=True))),
        str(a.train_file), [" ".join(s.words) for s in train_s[:2000]])

    named = [("train", train_s), ("dev", dev_s)] + ([("test", test_s)] if test_s else [])
    splits: dict[str, Split] = {}
    cut_total = 0
    if a.mode == "finetune":
        for name, sents in named:
            splits[name], cut = _token_split(tok, name, sents, labels, a.max_seq_length,
                                             a.tag_scheme)
            cut_total += cut
        pad_id = tok.token_to_id("[PAD]")
        table = None
    else:
        from bertscale.devices import resolve_device
        from bertscale.features import FeatureExtractor
        device = resolve_device(a.train.device, common.ranks().local_rank)
        ex = FeatureExtractor(pretrained, a.layers, a.layer_weights, a.max_seq_length,
                              str(device), a.train.precision, unpad=a.train.fast.unpad)
        rows: list[np.ndarray] = [np.zeros((1, ex.dim), np.float32)]            # row 0: padding
        t_feat = time.perf_counter()
        for name, sents in named:
            vectors: list[np.ndarray] = []
            for i in range(0, len(sents), a.train.eval_batch_size):
                vecs, cut = ex.embed_words([s.words for s in sents[i:i + a.train.eval_batch_size]])
                vectors += vecs
                cut_total += cut
            splits[name] = Split(name, sents, word_features(
                sum(len(r) for r in rows), vectors, sents, label_to_id, a.tag_scheme))
            rows += [v for v in vectors if len(v)]
        table = torch.from_numpy(np.concatenate(rows))
        common.log(f"NER features: {len(table) - 1} words x {ex.dim} ({a.layers}) in "
                   f"{time.perf_counter() - t_feat:.1f} s")
        del ex
        pad_id = 0
    _warn_cut(cut_total, a.max_seq_length)

    gold = {name: [_scheme(s.tags, a.tag_scheme) for s in sp.sentences]
            for name, sp in splits.items()}
    majority_tag, majority_acc = _majority(train_s, gold["dev"], a.tag_scheme)
    task = "NER" if a.mode == "finetune" else "NER-feature"
    out_dir = Path(a.output_dir) / task
    from bertscale.model import BertForTokenClassification

    def train_one(cfg: common.TrainConfig, run_dir: Path) -> tuple[dict[str, float], dict[str, Any]]:
        if table is None:
            model: nn.Module = common.build_model(BertForTokenClassification, pretrained,
                                                  num_labels=len(labels))
        else:
            model = FeatureTagger(table, len(labels), a.tagger, a.tagger_hidden,
                                  a.tagger_layers, a.tagger_dropout)
        stats = common.fit(model, splits["train"].features, _loss, cfg, pad_id)
        metrics = score_and_write(model, splits, labels, a.tag_scheme, cfg, pad_id, run_dir)
        if a.save_model:
            common.save_model(model, pretrained, run_dir, "BertForTokenClassification",
                              {"family": "ner", "task": "NER", "labels": labels,
                               "tag_scheme": a.tag_scheme, "max_seq_length": a.max_seq_length,
                               "lr": cfg.lr, "seed": cfg.seed, "recipe": common.recipe(cfg)})
        return metrics, stats

    extra: dict[str, Any] = dict(
        **pretrained.identity(),
        lowercase=pretrained.lowercase, mode=a.mode, labels=labels, tag_scheme=a.tag_scheme,
        train_file=str(a.train_file), dev_file=str(a.dev_file),
        test_file=str(a.test_file) if a.test_file else None,
        train_sentences=len(train_s), dev_sentences=len(dev_s),
        majority_tag=majority_tag, majority_accuracy=majority_acc,
        max_seq_length=a.max_seq_length, truncated_sentences=cut_total,
        max_eval_samples=a.max_eval_samples, save_model=a.save_model)
    if a.mode == "feature":
        extra.update(layers=a.layers, layer_weights=a.layer_weights, tagger=a.tagger,
                     tagger_hidden=a.tagger_hidden, tagger_layers=a.tagger_layers,
                     tagger_dropout=a.tagger_dropout)
    runs = common.run_grid(task, out_dir, a.lrs, a.seeds, a.train,
                           len(splits["train"].features), "sentences", train_one, extra)
    return common.finish(task, "f1", runs, out_dir, ["dev_predictions.txt", "test_predictions.txt"],
                         a.train, t0, ("f1", "precision", "recall", "accuracy"), **extra)
