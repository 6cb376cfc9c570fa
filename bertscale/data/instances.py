"""Training instances (sequence pairs) from tokenized documents, as BERT builds them.

The logic follows Google's ``create_pretraining_data.py`` (``create_instances_from_document``):

- A target length is ``max_num_tokens`` (``seq_len - 3`` for pairs: [CLS] A [SEP] B [SEP]), and
  with probability ``short_seq_prob`` (0.1) a uniform integer in [2, max_num_tokens], to reduce
  the mismatch with short fine-tuning inputs.
- Sentences of a document are gathered into a chunk until the chunk reaches the target length
  (or the document ends). A random cut ``a_end`` in [1, len(chunk) - 1] makes segment A.
- ``nsp`` (the paper): with probability 0.5 (and always when the chunk holds a single sentence),
  B is text from a random other document, starting at a random sentence and long enough to fill
  the target; the chunk's unused sentences are put back for the next instance. Otherwise B is
  the rest of the chunk. Label 0 = B follows A, 1 = B is random (Hugging Face's convention).
- ``sop`` (ALBERT's sentence-order prediction): A and B are always consecutive text of the same
  document, swapped with probability 0.5 (label 1 = swapped). A chunk with a single sentence is
  cut inside that sentence at a random token (ALBERT would take a random document there, which
  mixes two tasks under one label).
- ``mlm`` (no pair objective, RoBERTa's packed "full-sentences"): the chunk's documents, joined
  with a [SEP] between documents, are cut into consecutive windows of the target length
  ([CLS] window [SEP]); nothing is lost and almost every sequence is full.
- ``truncate_seq_pair`` trims the longer segment, one token at a time from a random end, until
  the pair fits.

Two deliberate differences from Google's script, both documented facts of that script:

1. Google draws the target length once per document, so the share of short instances depends on
   document lengths; here it is drawn again for every instance, so exactly ``short_seq_prob`` of
   instances (in expectation) have a short target.
2. Google draws the random document from the whole input held in memory. Here it is drawn from the
   same chunk of documents (``prepare --docs-per-chunk``, 1,000 by default), which keeps memory
   bounded and makes every chunk independent of all others (the basis of `prepare`'s determinism
   across worker counts). With 1,000 documents the chance that B comes from the same article is
   1 in 1,000 per draw (and Google's 10 retries avoid it), as in the original.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OBJECTIVES = ("nsp", "sop", "mlm")


@dataclass
class InstanceConfig:
    seq_len: int
    """Tokens per sample including [CLS] and [SEP]s (128 and 512 in the paper)."""
    objective: str = "nsp"
    """nsp | sop | mlm."""
    short_seq_prob: float = 0.1
    """Probability of a shorter random target length."""
    cls_id: int = 2
    sep_id: int = 3


@dataclass
class Instance:
    ids: list[int]
    """[CLS] A [SEP] B [SEP] (pairs) or [CLS] tokens [SEP] (mlm)."""
    a_len: int
    """Tokens of type 0: [CLS] A [SEP]; equal to len(ids) for mlm."""
    label: int
    """0: B follows A / in order; 1: random B / swapped; -1: no pair objective."""
    target_len: int
    """The target length drawn for this instance (statistics only)."""
    single_segment: bool = False
    """The chunk had one sentence, so B could not come from it (statistics only)."""


def _target(rng: random.Random, max_num_tokens: int, short_seq_prob: float) -> int:
    if rng.random() < short_seq_prob:
        return rng.randint(2, max_num_tokens)
    return max_num_tokens


def truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int,
                      rng: random.Random) -> tuple[list[int], list[int]]:
    """Google's truncation (same random draws, same result), done with counters and one slice
    per segment instead of a deletion per token."""
    la, lb = len(a), len(b)
    a0 = a1 = b0 = b1 = 0  # tokens removed from the front / back of a and b
    while la + lb > max_num_tokens:
        if la > lb:
            la -= 1
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 += 1
        else:
            lb -= 1
            if rng.random() < 0.5:
                b0 += 1
            else:
                b1 += 1
    return a[a0:len(a) - a1], b[b0:len(b) - b1]


def create_instances(documents: list[list[list[int]]], cfg: InstanceConfig,
                     rng: random.Random) -> list[Instance]:
    """Instances from every document of one chunk (random B drawn within the chunk)."""
    out: list[Instance] = []
    if cfg.objective == "mlm":
        _packed_instances(documents, cfg, rng, out)
        return out
    for index in range(len(documents)):
        _pair_instances(documents, index, cfg, rng, out)
    return out


def _packed_instances(documents: list[list[list[int]]], cfg: InstanceConfig, rng: random.Random,
                      out: list[Instance]) -> None:
    # The chunk's documents as one stream, [SEP] between documents (RoBERTa's FULL-SENTENCES),
    # cut into consecutive windows: every sequence is full except the chunk's last (and the
    # short-target ones), and no token is dropped.
    max_num_tokens = cfg.seq_len - 2
    stream: list[int] = []
    for d, document in enumerate(documents):
        if d:
            stream.append(cfg.sep_id)
        for sentence in document:
            stream.extend(sentence)
    i = 0
    while i < len(stream):
        target = _target(rng, max_num_tokens, cfg.short_seq_prob)
        ids = [cfg.cls_id, *stream[i:i + target], cfg.sep_id]
        i += target
        out.append(Instance(ids, len(ids), -1, target))


def _pair_instances(documents: list[list[list[int]]], index: int, cfg: InstanceConfig,
                    rng: random.Random, out: list[Instance]) -> None:
    document = documents[index]
    max_num_tokens = cfg.seq_len - 3
    target = _target(rng, max_num_tokens, cfg.short_seq_prob)
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            single = len(chunk) == 1
            label = 0
            if cfg.objective == "nsp":
                if single or rng.random() < 0.5:
                    label = 1
                    tokens_b = _random_continuation(documents, index, target - len(tokens_a), rng)
                    # The unused sentences of this chunk start the next instance (Google's `i -=`).
                    i -= len(chunk) - a_end
                else:
                    tokens_b = [t for s in chunk[a_end:] for t in s]
            else:  # sop
                if single:
                    if len(tokens_a) < 2:
                        tokens_a = []  # one token cannot be put in order; no instance
                    else:
                        cut = rng.randint(1, len(tokens_a) - 1)
                        tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
                else:
                    tokens_b = [t for s in chunk[a_end:] for t in s]
                if tokens_a and rng.random() < 0.5:
                    tokens_a, tokens_b = tokens_b, tokens_a
                    label = 1
            if tokens_a:
                tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                ids = [cfg.cls_id, *tokens_a, cfg.sep_id, *tokens_b, cfg.sep_id]
                out.append(Instance(ids, len(tokens_a) + 2, label, target, single))
            chunk = []
            length = 0
            target = _target(rng, max_num_tokens, cfg.short_seq_prob)
        i += 1


def _random_continuation(documents: list[list[list[int]]], index: int, target_b: int,
                         rng: random.Random) -> list[int]:
    # Ten tries for another document, as Google's script; a one-document chunk uses itself.
    other = index
    for _ in range(10):
        other = rng.randint(0, len(documents) - 1)
        if other != index:
            break
    doc = documents[other]
    tokens: list[int] = []
    for j in range(rng.randint(0, len(doc) - 1), len(doc)):
        tokens.extend(doc[j])
        if len(tokens) >= target_b:
            break
    return tokens
