"""What `bertscale embed` and the feature-based NER tagger share: a frozen BERT's hidden states
as features (the paper's Section 5.3), and word lists encoded so that each word's first word piece
is known.

- `select_layers` / `combine_layers`: which hidden states make a feature (the paper's Table 7
  ablation: one layer, the sum or the concatenation of the last four, a weighted sum of all).
- `encode_words`: [CLS] pieces of word 1 ... [SEP] with the position of each word's first piece,
  cut to a length limit here (not by the tokenizer) so that the cut words are known.
- `FeatureExtractor`: the model loaded once on a device, turning batches of texts (pooled) or of
  word lists (one vector per word) into fp32 numpy.

Limits: batches are padded to their longest member, without length bucketing; a word the
tokenizer turns into nothing is read as [UNK].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bertscale.errors import UserError

LAYER_NAMES = ("embeddings", "last", "second-to-last", "sum-last-four", "concat-last-four",
               "weighted-sum")


# ---------------------------------------------------------------------------- layers, pooling


@dataclass(frozen=True)
class LayerSelection:
    """Which hidden states make a feature, and how they are combined."""

    name: str
    indices: tuple[int, ...]
    """Into hidden_states (0 = embedding output, L = last layer), in combination order."""
    mode: str
    """"single", "sum", "concat" or "weighted"."""
    weights: tuple[float, ...] | None = None
    """One per index, for "weighted"."""

    def width(self, hidden_size: int) -> int:
        return hidden_size * len(self.indices) if self.mode == "concat" else hidden_size


def select_layers(name: str, num_layers: int, weights: Sequence[float] | None = None
                  ) -> LayerSelection:
    """The --layers choice for a model of `num_layers` encoder layers."""
    L = num_layers
    if weights is not None and name != "weighted-sum":
        raise UserError(f"--layer-weights is only for --layers weighted-sum, not {name!r}")
    if name in ("sum-last-four", "concat-last-four") and L < 4:
        raise UserError(f"--layers {name} needs at least 4 encoder layers; the model has {L}")
    if name == "embeddings":
        return LayerSelection(name, (0,), "single")
    if name == "last":
        return LayerSelection(name, (L,), "single")
    if name == "second-to-last":
        if L < 2:
            raise UserError(f"--layers second-to-last needs 2 encoder layers; the model has {L}")
        return LayerSelection(name, (L - 1,), "single")
    if name == "sum-last-four":
        return LayerSelection(name, (L, L - 1, L - 2, L - 3), "sum")
    if name == "concat-last-four":
        return LayerSelection(name, (L, L - 1, L - 2, L - 3), "concat")
    if name == "weighted-sum":
        if weights is None:
            weights = [1.0 / L] * L
        if len(weights) != L:
            raise UserError(f"--layer-weights has {len(weights)} values; the model has {L} "
                            f"encoder layers (the embedding output is not part of the sum)")
        return LayerSelection(name, tuple(range(1, L + 1)), "weighted",
                              tuple(float(w) for w in weights))
    try:
        i = int(name)
    except ValueError:
        raise UserError(f"--layers {name!r}: choose one of {', '.join(LAYER_NAMES)} or a hidden "
                        f"state index 0..{L} (negative counts from the last)") from None
    if not -(L + 1) <= i <= L:
        raise UserError(f"--layers {i}: the model has hidden states 0..{L} "
                        f"(0 = embeddings, {L} = last layer)")
    return LayerSelection(name, (i % (L + 1),), "single")


def combine_layers(hidden_states: Sequence[Any], sel: LayerSelection) -> Any:
    """(B, T, H) hidden states -> (B, T, D) features, in fp32 whatever the autocast dtype
    (summing four bf16 layers in bf16 would round away what the sum is for)."""
    hs = [hidden_states[i].float() for i in sel.indices]
    if sel.mode == "single":
        return hs[0]
    if sel.mode == "concat":
        import torch
        return torch.cat(hs, dim=-1)                                          # (B, T, 4H)
    weights = sel.weights if sel.mode == "weighted" and sel.weights else (1.0,) * len(hs)
    out = hs[0] * weights[0]
    for w, h in zip(weights[1:], hs[1:]):
        out = out + w * h
    return out                                                                # (B, T, H)


# ------------------------------------------------------------------------------- tokenizing


@dataclass
class WordEncoding:
    """One word-split sequence as word pieces, and where each kept word starts."""

    ids: list[int]
    first: list[int]
    """Token position of the first word piece of word 0, 1, ...; words cut by the length
    limit are absent, so len(first) <= number of words."""
    truncated: bool


def encode_words(tok: Any, sentences: Sequence[Sequence[str]], max_length: int
                 ) -> list[WordEncoding]:
    """[CLS] w1 pieces ... wn pieces [SEP], cut to `max_length` (the last place kept for [SEP]).
    `tok` must not truncate by itself: the cut is made here so that we know which words went."""
    unk = "[UNK]"
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    encs = tok.encode_batch([list(s) for s in sentences], is_pretokenized=True)
    out = []
    for words, enc in zip(sentences, encs):
        first = _first_pieces(enc.word_ids, len(words))
        if any(p is None for p in first):
            # The tokenizer dropped a word entirely (control / zero-width characters): read it as
            # [UNK] (a special token, matched verbatim) so that every word has a vector.
            fixed = [w if p is not None else unk for w, p in zip(words, first)]
            enc = tok.encode(fixed, is_pretokenized=True)
            first = _first_pieces(enc.word_ids, len(words))
        ids = list(enc.ids)
        if ids[:1] != [cls_id] or ids[-1:] != [sep_id]:
            raise UserError("the tokenizer does not add [CLS] ... [SEP]; is this a BERT "
                            "vocabulary?")
        truncated = len(ids) > max_length
        if truncated:
            ids = ids[:max_length - 1] + [sep_id]
            first = [p for p in first if p is not None and p < max_length - 1]
        out.append(WordEncoding(ids, [int(p) for p in first if p is not None], truncated))
    return out


def _first_pieces(word_ids: Sequence[int | None], n: int) -> list[int | None]:
    first: list[int | None] = [None] * n
    for pos, w in enumerate(word_ids):
        if w is not None and first[w] is None:
            first[w] = pos
    return first


# ---------------------------------------------------------------------------- the extractor


class FeatureExtractor:
    """A frozen BERT turning batches of texts or word lists into feature vectors (numpy fp32).

    `bertscale embed` streams files through it; the feature-based NER tagger uses it in memory.
    """

    def __init__(self, pretrained: Any, layers: str = "last",
                 layer_weights: Sequence[float] | None = None, max_seq_length: int | None = None,
                 device: str = "auto", precision: str = "auto", unpad: bool = False):
        import torch

        from bertscale.devices import resolve_device, resolve_precision
        from bertscale.model import BertModel, load_pretrained
        from bertscale.parallelize import FastPaths, apply_fast_paths
        from bertscale.tokenizer import load_tokenizer
        cfg = pretrained.config
        self.max_seq_length = int(max_seq_length or min(512, cfg.max_position_embeddings))
        if not 2 <= self.max_seq_length <= cfg.max_position_embeddings:
            raise UserError(f"--max-seq-length {self.max_seq_length}: must be in 2.."
                            f"{cfg.max_position_embeddings} (the model's max_position_embeddings)")
        self.selection = select_layers(layers, cfg.num_hidden_layers, layer_weights)
        self.dim = self.selection.width(cfg.hidden_size)
        self.device = resolve_device(device)
        self.amp_dtype = resolve_precision(precision, self.device)
        # Two tokenizers: texts are cut by the library (fast on long documents, and it says
        # whether it cut); word lists are cut by encode_words, which must see every word.
        self.text_tok = load_tokenizer(pretrained.vocab_path, pretrained.lowercase)
        self.text_tok.enable_truncation(max_length=self.max_seq_length)
        self.word_tok = load_tokenizer(pretrained.vocab_path, pretrained.lowercase)
        self.pad_id = self.text_tok.token_to_id("[PAD]")
        # Built on the meta device and filled from the checkpoint: drawing a random init for
        # every weight first (seconds on a CPU) would be thrown away.
        with torch.device("meta"):
            model = BertModel(cfg, add_pooling_layer=False)
        model = model.to_empty(device=self.device)
        fresh = load_pretrained(model, pretrained.state_dict, pretrained.source)
        if fresh:  # load_pretrained refuses an incomplete encoder; this would be a bug
            raise RuntimeError(f"{pretrained.source}: weights left uninitialised: {fresh[:4]}")
        apply_fast_paths(model, FastPaths(unpad=unpad))
        self.model = model.eval().requires_grad_(False)
        self._torch = torch

    def _features(self, id_lists: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        """Padded forward pass: (B, T, D) fp32 features and the (B, T) mask, on the device."""
        torch = self._torch
        T = max(len(x) for x in id_lists)
        ids = torch.full((len(id_lists), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(id_lists), T), dtype=torch.long)
        for b, x in enumerate(id_lists):
            ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, :len(x)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                             enabled=self.amp_dtype is not None)
        with torch.no_grad(), amp:
            out = self.model(ids, torch.zeros_like(ids), mask, output_hidden_states=True)
        return combine_layers(out.hidden_states, self.selection), mask           # (B, T, D)

    def embed_texts(self, texts: Sequence[str], pooling: str) -> tuple[np.ndarray, int]:
        """(B, D) one vector per text, and how many texts were cut to max_seq_length."""
        if pooling not in ("cls", "mean"):
            raise UserError(f"pooling {pooling!r} is per word; embed_texts takes cls or mean")
        encs = self.text_tok.encode_batch(list(texts))
        truncated = sum(1 for e in encs if e.overflowing)
        h, mask = self._features([e.ids for e in encs])
        with self._torch.no_grad():
            if pooling == "cls":
                pooled = h[:, 0]                                                  # (B, D)
            else:
                m = mask.unsqueeze(-1).to(h.dtype)                                # (B, T, 1)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)                   # (B, D)
        return pooled.cpu().numpy(), truncated

    def embed_words(self, sentences: Sequence[Sequence[str]]) -> tuple[list[np.ndarray], int]:
        """One (n_i, D) array per word list (the first word piece of each word; n_i is less than
        the number of words when the sequence was cut), and how many were cut."""
        torch = self._torch
        encs = encode_words(self.word_tok, sentences, self.max_seq_length)
        h, _ = self._features([e.ids for e in encs])                         # (B, T, D)
        # Gather the words' rows on the device: only (words, D) crosses to the host, not (B, T, D).
        rows = torch.tensor([b for b, e in enumerate(encs) for _ in e.first], dtype=torch.long)
        cols = torch.tensor([p for e in encs for p in e.first], dtype=torch.long)
        words = h[rows.to(h.device), cols.to(h.device)].cpu().numpy()       # (words, D)
        return (np.split(words, np.cumsum([len(e.first) for e in encs])[:-1]),
                sum(e.truncated for e in encs))
