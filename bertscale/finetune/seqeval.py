"""Entity-level precision, recall and F1 of tagged sequences: the definition of CoNLL's
`conlleval` script, as the `seqeval` package implements it in its default (non-strict) mode,
written here from their published behaviour (we ship neither).

A tag is `O` or `<prefix>-<TYPE>` with prefix B, I, E or S. Entities ("chunks") are read from
left to right; each sentence is closed as if followed by `O`:
  - an entity starts at B or S, at I or E after O / E / S, and at any tag whose type differs
    from the previous tag's: an I- tag with no B- before it starts an entity (conlleval);
  - an entity ends before O, B or S, after E or S, and before a change of type.
So IOB1 (CoNLL-2003's own files: I- everywhere, B- only between two adjacent entities of one
type), IOB2 / BIO (every entity opens with B-) and IOBES all read the same entities.

Scores: an entity counts as correct only when type, first and last token all match the gold
entity (a partial overlap is a wrong prediction AND a missed gold entity). precision =
correct / predicted, recall = correct / gold, F1 = 2PR / (P + R), each 0 when its denominator is
0 (conlleval prints 0 there too). Token accuracy compares tags one for one, as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PREFIXES = ("B", "I", "E", "S")


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "") from "O". ValueError on anything else."""
    if tag == "O":
        return "O", ""
    prefix, sep, typ = tag.partition("-")
    if not sep or prefix not in PREFIXES or not typ:
        raise ValueError(f"tag {tag!r} is not O or B-/I-/E-/S-<TYPE>")
    return prefix, typ


def is_valid_tag(tag: str) -> bool:
    try:
        split_tag(tag)
    except ValueError:
        return False
    return True


def _ends(prev: str, prev_type: str, cur: str, cur_type: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and cur in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != cur_type


def _starts(prev: str, prev_type: str, cur: str, cur_type: str) -> bool:
    if cur in ("B", "S"):
        return True
    if prev in ("O", "E", "S") and cur in ("I", "E"):
        return True
    return cur != "O" and prev_type != cur_type


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first token, last token) of each entity of one sentence, in order."""
    entities = []
    prev, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        cur, cur_type = split_tag(tag)
        if _ends(prev, prev_type, cur, cur_type):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev, prev_type, cur, cur_type):
            begin = i
        prev, prev_type = cur, cur_type
    return entities


def to_iob2(tags: Sequence[str]) -> list[str]:
    """The same entities written in IOB2 (every entity opens with B-); any input scheme."""
    out = ["O"] * len(tags)
    for typ, first, last in get_entities(tags):
        out[first] = f"B-{typ}"
        for i in range(first + 1, last + 1):
            out[i] = f"I-{typ}"
    return out


@dataclass
class TypeScores:
    precision: float
    recall: float
    f1: float
    support: int
    """Gold entities of this type."""


@dataclass
class Scores:
    precision: float
    recall: float
    f1: float
    accuracy: float
    """Token accuracy: tags equal one for one."""
    gold: int
    """Gold entities."""
    predicted: int
    correct: int
    per_type: dict[str, TypeScores] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat floats for results files: precision, recall, f1, accuracy, f1_<TYPE>."""
        out = {"precision": self.precision, "recall": self.recall, "f1": self.f1,
               "accuracy": self.accuracy}
        out.update({f"f1_{t}": s.f1 for t, s in sorted(self.per_type.items())})
        return out


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> Scores:
    """Entity-level scores over sentences (lists of tags) in the same order and lengths."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    gold_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    tokens = same = 0
    for s, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        gold_set.update((s, *e) for e in get_entities(g))
        pred_set.update((s, *e) for e in get_entities(p))
        tokens += len(g)
        same += sum(a == b for a, b in zip(g, p))
    correct = gold_set & pred_set
    precision, recall, f1 = _prf(len(correct), len(pred_set), len(gold_set))
    per_type = {}
    for typ in sorted({e[1] for e in gold_set | pred_set}):
        c = sum(1 for e in correct if e[1] == typ)
        n_pred = sum(1 for e in pred_set if e[1] == typ)
        n_gold = sum(1 for e in gold_set if e[1] == typ)
        per_type[typ] = TypeScores(*_prf(c, n_pred, n_gold), support=n_gold)
    return Scores(precision, recall, f1, same / tokens if tokens else 0.0, len(gold_set),
                  len(pred_set), len(correct), per_type)
