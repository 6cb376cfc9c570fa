"""Corpus readers, the sentence splitter and instance building, on real Wikipedia text.

The splitter cases are paragraphs copied from the Wikipedia sample in ../shared/data (the test
`test_paragraphs_are_real` checks they are there); the expected sentences were checked by hand.
Instance statistics use binomial bounds of 4.5 standard deviations: the draws are seeded, so
the test is deterministic, and a bias larger than the bound (a wrong probability, a lost or
doubled branch) fails it, while an honest implementation passes with probability ~1 - 1e-5
for any seed.
"""

from __future__ import annotations

import bz2
import gzip
import html
import json
import lzma
import math
import random
from pathlib import Path

import pytest

from bertscale.data.instances import InstanceConfig, create_instances, truncate_seq_pair
from bertscale.data.prepare import tokenize_documents
from bertscale.data.text import expand_inputs, read_documents, split_sentences
from bertscale.errors import UserError
from bertscale.tokenizer import load_tokenizer

# (file, paragraph, expected sentences) — real Wikipedia paragraphs, hand-checked splits.
CASES = [
    ("wiki_03.gz",
     "College Avenue is the oldest campus of Rutgers University – New Brunswick, in New Brunswick, "
     "New Jersey, U.S. It includes the historic seat of the university, known as Old Queens. Many "
     "classes are taught in the Voorhees Mall area, also home to the Zimmerli Art Museum.",
     ["College Avenue is the oldest campus of Rutgers University – New Brunswick, in New Brunswick, "
      "New Jersey, U.S.",
      "It includes the historic seat of the university, known as Old Queens.",
      "Many classes are taught in the Voorhees Mall area, also home to the Zimmerli Art Museum."]),
    ("wiki_09.gz",
     "Under Cantelon's leadership, History Associates has grown to become one of the largest "
     "historical consulting firms in the U.S. The company made the Inc. 500 list in 1986 and the "
     "Inc. 5000 list in 2012, 2013, and 2014.",
     ["Under Cantelon's leadership, History Associates has grown to become one of the largest "
      "historical consulting firms in the U.S.",
      "The company made the Inc. 500 list in 1986 and the Inc. 5000 list in 2012, 2013, and 2014."]),
    ("wiki_06.gz",
     "During the preliminary rounds, she led the Best Attackers race with a 205-68-426 attacking "
     "card, good for 48.12% hitting efficiency. After advancing to the final round, Drews once "
     "again ranked first in the Best Attackers chart with a 69-18-132 attacking card, good for "
     "52.27 hitting efficiency.",
     ["During the preliminary rounds, she led the Best Attackers race with a 205-68-426 attacking "
      "card, good for 48.12% hitting efficiency.",
      "After advancing to the final round, Drews once again ranked first in the Best Attackers "
      "chart with a 69-18-132 attacking card, good for 52.27 hitting efficiency."]),
    ("wiki_00.gz",
     "Patricia Lindop was born on 21 June 1930, the second child of Elliot D. Lindop and Dorothy "
     "Jones. Her father was an engineer who had worked for Shell in India and later owned his own "
     "fuel distribution business.",
     ["Patricia Lindop was born on 21 June 1930, the second child of Elliot D. Lindop and Dorothy "
      "Jones.",
      "Her father was an engineer who had worked for Shell in India and later owned his own fuel "
      "distribution business."]),
    ("wiki_00.gz",
     "Discussing her approach to management at \"Vogue Australia\", Clements stated, \"I learnt how "
     "to be diplomatic. I think most of my job was diplomacy. Diplomacy between staff members, "
     "diplomacy between management, diplomacy to clients, to creatives.\" She commented that "
     "working with creatives was more rewarding than collaborating with any other worker due to "
     "their passion and vision.",
     ["Discussing her approach to management at \"Vogue Australia\", Clements stated, \"I learnt "
      "how to be diplomatic.",
      "I think most of my job was diplomacy.",
      "Diplomacy between staff members, diplomacy between management, diplomacy to clients, to "
      "creatives.\"",
      "She commented that working with creatives was more rewarding than collaborating with any "
      "other worker due to their passion and vision."]),
    ("wiki_00.gz",
     "The project had been a long-time goal of Fusco's to portray Texas Ranger Frank Hamer in the "
     "proper light of history. Fusco researched extensively in Texas and became friends with "
     "Hamer's son, the late Frank Hamer Jr. By 2013, the project was under development at "
     "Universal Pictures.",
     ["The project had been a long-time goal of Fusco's to portray Texas Ranger Frank Hamer in the "
      "proper light of history.",
      "Fusco researched extensively in Texas and became friends with Hamer's son, the late Frank "
      "Hamer Jr.",
      "By 2013, the project was under development at Universal Pictures."]),
    ("wiki_00.gz",
     "The most common contaminants that can absorb fine sediment are trace metals, nutrients (e.g. "
     "nitrogen, phosphorus), polynuclear aromatic hydrocarbons (PAHs), pathogens, polychlorinated "
     "biphenyls (PCBs), pesticides, volatile organic compounds (VOCs).",
     ["The most common contaminants that can absorb fine sediment are trace metals, nutrients (e.g. "
      "nitrogen, phosphorus), polynuclear aromatic hydrocarbons (PAHs), pathogens, polychlorinated "
      "biphenyls (PCBs), pesticides, volatile organic compounds (VOCs)."]),
    ("wiki_03.gz",
     "Alan Sepinwall of \"HitFix\" wrote, \"'USPIS' is a classical type of sitcom episode, one "
     "that's built around a beloved guest star coming in to do his schtick while all the regular "
     "characters react to him doing it. But what happens when the guest and/or his schtick aren't "
     "so beloved anymore?\" Andy Crump of \"Paste\" gave the episode a 9.0 and wrote",
     ["Alan Sepinwall of \"HitFix\" wrote, \"'USPIS' is a classical type of sitcom episode, one "
      "that's built around a beloved guest star coming in to do his schtick while all the regular "
      "characters react to him doing it.",
      "But what happens when the guest and/or his schtick aren't so beloved anymore?\"",
      "Andy Crump of \"Paste\" gave the episode a 9.0 and wrote"]),
    ("wiki_00.gz",
     "Their base point totals were then reset to 2,000 points, a level more than 1,000 points "
     "higher than that of the first driver outside the Chase. (Under the new point system, a race "
     "winner can earn a maximum of 48 points, as opposed to 195 in the pre-2011 system.) The ten "
     "automatic qualifiers received a bonus of three points for each win during the regular "
     "season, while the two wild card qualifiers received no such bonus.",
     ["Their base point totals were then reset to 2,000 points, a level more than 1,000 points "
      "higher than that of the first driver outside the Chase.",
      "(Under the new point system, a race winner can earn a maximum of 48 points, as opposed to "
      "195 in the pre-2011 system.)",
      "The ten automatic qualifiers received a bonus of three points for each win during the "
      "regular season, while the two wild card qualifiers received no such bonus."]),
    ("wiki_00.gz",
     "In March 1964, this first case was dismissed, but Butts filed another case and the 4th U.S. "
     "Circuit Court of Appeals upheld the tax. Butts appealed the case and the United States "
     "Supreme Court decided to hear the appeal in October 1965.",
     ["In March 1964, this first case was dismissed, but Butts filed another case and the 4th U.S. "
      "Circuit Court of Appeals upheld the tax.",
      "Butts appealed the case and the United States Supreme Court decided to hear the appeal in "
      "October 1965."]),
    ("wiki_00.gz",
     "The case, \"Harper v. Virginia State Board of Elections\", was decided in March 1966, making "
     "poll taxes unconstitutional.",
     ["The case, \"Harper v. Virginia State Board of Elections\", was decided in March 1966, making "
      "poll taxes unconstitutional."]),
    ("wiki_00.gz",
     "George is eager to collect an inheritance left to him by his godmother from his trustee, P. "
     "P. Bassinger, in Monaco.",
     ["George is eager to collect an inheritance left to him by his godmother from his trustee, P. "
      "P. Bassinger, in Monaco."]),
    ("wiki_00.gz",
     "He remained there for several years, became acquainted with Dr. William Stephen, a brother "
     "of William Wilberforce’s legal adviser James Stephen, and joined with him in protesting the "
     "mistreatment of slaves on the island. When Murray later laboured in the abolitionist cause, "
     "the Stephen connection fostered close co-operation between him and the Agency Committee of "
     "the Anti-Slavery Society led by George Stephen.",
     ["He remained there for several years, became acquainted with Dr. William Stephen, a brother "
      "of William Wilberforce’s legal adviser James Stephen, and joined with him in protesting the "
      "mistreatment of slaves on the island.",
      "When Murray later laboured in the abolitionist cause, the Stephen connection fostered close "
      "co-operation between him and the Agency Committee of the Anti-Slavery Society led by George "
      "Stephen."]),
    ("wiki_02.gz",
     "Anderson hopes to promote a sense of discovery for these sites which include statues in "
     "Mandan of Peter Toth, honoring Native Americans and Theodore Roosevelt all the way to the old "
     "Fort Keogh Trail, which was once crossed by Lt. Col. George Armstrong Custer in 1870 when he "
     "marched the Seventh Cavalry to Montana.",
     ["Anderson hopes to promote a sense of discovery for these sites which include statues in "
      "Mandan of Peter Toth, honoring Native Americans and Theodore Roosevelt all the way to the old "
      "Fort Keogh Trail, which was once crossed by Lt. Col. George Armstrong Custer in 1870 when he "
      "marched the Seventh Cavalry to Montana."]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_split_sentences_on_real_wikipedia(case: int) -> None:
    _, text, expected = CASES[case]
    assert split_sentences(text) == expected


def test_paragraphs_are_real(shared_data: Path) -> None:
    wanted: dict[str, list[str]] = {}
    for name, text, _ in CASES:
        wanted.setdefault(name, []).append(text)
    for name, texts in wanted.items():
        raw = gzip.open(shared_data / "wikipedia" / name, "rt", encoding="utf-8").read()
        for t in texts:
            assert t in raw, f"not found in {name}: {t[:60]}"


# ---------------------------------------------------------------------------------------------
# readers

@pytest.fixture(scope="module")
def wiki_blocks(shared_data: Path) -> list[list[str]]:
    """The first 40 WikiExtractor blocks of wiki_00 that have text, as raw lines."""
    blocks, cur = [], None
    for line in gzip.open(shared_data / "wikipedia" / "wiki_00.gz", "rt", encoding="utf-8"):
        if line.startswith("<doc "):
            cur = [line.rstrip("\n")]
        elif line.startswith("</doc>"):
            cur.append("</doc>")
            if sum(1 for x in cur[2:-1] if x.strip()) >= 2:
                blocks.append(cur)
            if len(blocks) == 40:
                break
        else:
            cur.append(line.rstrip("\n"))
    return blocks


def _docs(blocks: list[list[str]]) -> list[list[str]]:
    # drop the tag and title lines; the WikiExtractor reader also turns "&amp;" back into "&"
    return [[html.unescape(ln.strip()) for ln in b[2:-1] if ln.strip()] for b in blocks]


def _write(path: Path, text: str, kind: str) -> Path:
    data = text.encode("utf-8")
    if kind == "gz":
        data = gzip.compress(data)
    elif kind == "bz2":
        data = bz2.compress(data)
    elif kind == "xz":
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["plain", "gz", "bz2", "xz"])
def test_formats_and_compressions_read_the_same_documents(tmp_path: Path, wiki_blocks, kind) -> None:
    docs = _docs(wiki_blocks)
    wiki = "\n".join("\n".join(b) for b in wiki_blocks) + "\n"
    bert = "\n\n".join("\n".join(d) for d in docs) + "\n"
    jsonl = "".join(json.dumps({"id": i, "text": "\n".join(d)}) + "\n" for i, d in enumerate(docs))
    # file names without the compression's extension: detection goes by content
    for name, text, fmt in [("w.txt", wiki, "wikiextractor"), ("b.txt", bert, "bert"),
                            ("j.jsonl", jsonl, "jsonl")]:
        path = _write(tmp_path / name, text, kind)
        assert list(read_documents(path)) == docs, (name, kind)          # auto-detected
        assert list(read_documents(path, fmt)) == docs, (name, kind)


def test_wikiextractor_drops_titles_and_unescapes(tmp_path: Path) -> None:
    p = tmp_path / "w"
    p.write_text('<doc id="1" url="x" title="Stub">\nStub\n\n</doc>\n'
                 '<doc id="2" url="y" title="A &amp; B">\nA &amp; B\n\nA &amp; B is a firm. It sells tea.\n'
                 'Early years &amp; education.\n</doc>\n')
    assert list(read_documents(p)) == [["A & B is a firm. It sells tea.", "Early years & education."]]


def test_inputs_globs_folders_sorted(tmp_path: Path) -> None:
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/d.gz"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x\n")
    got = expand_inputs([str(tmp_path / "sub"), str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in got] == ["a.txt", "b.txt", "sub/c.txt", "sub/d.gz"]
    with pytest.raises(UserError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.nothing")])
    with pytest.raises(UserError, match="not found"):
        expand_inputs([str(tmp_path / "missing.txt")])


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_documents(bad_json, "jsonl"))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"nofield\.jsonl:1: .*no field 'text'"):
        list(read_documents(no_field))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8"):
        list(read_documents(latin))
    cut = tmp_path / "cut.gz"
    words = random.Random(0).choices(["alpha", "beta", "gamma", "delta", "epsilon"], k=20000)
    whole = gzip.compress(" ".join(words).encode())
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.gz: compressed file is truncated"):
        list(read_documents(cut))
    open_doc = tmp_path / "open.txt"
    open_doc.write_text('<doc id="1">\nTitle\n\nText.\n')
    with pytest.raises(UserError, match=r"open\.txt: ends inside a document"):
        list(read_documents(open_doc))


# ---------------------------------------------------------------------------------------------
# instances

@pytest.fixture(scope="module")
def tokenized(shared_data: Path) -> list[list[list[int]]]:
    tok = load_tokenizer(shared_data / "vocab" / "bert-base-uncased-vocab.txt", lowercase=True)
    docs = []
    for name in ("wiki_00.gz", "wiki_01.gz"):
        docs += tokenize_documents(list(read_documents(shared_data / "wikipedia" / name)), tok)
    return [d for d in docs if d]


def _google_truncate(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """Google's truncate_seq_pair, verbatim in logic: the reference."""
    while True:
        total = len(a) + len(b)
        if total <= max_num_tokens:
            break
        trunc = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def test_truncate_seq_pair_matches_google() -> None:
    gen = random.Random(0)
    for _ in range(500):
        a = list(range(gen.randint(1, 300)))
        b = list(range(1000, 1000 + gen.randint(1, 300)))
        max_tokens = gen.randint(2, 200)
        ra, rb = a[:], b[:]
        _google_truncate(ra, rb, max_tokens, random.Random(7))
        assert truncate_seq_pair(a, b, max_tokens, random.Random(7)) == (ra, rb)


def _within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


class _Text:
    """Where token sequences occur in a chunk of documents (a bigram index over its stream)."""

    def __init__(self, docs: list[list[list[int]]]):
        self.stream: list[int] = []
        self.doc_of: list[int] = []
        for d, doc in enumerate(docs):
            for s in doc:
                self.stream += s
                self.doc_of += [d] * len(s)
            self.stream.append(-1)  # documents never run into each other
            self.doc_of.append(-1)
        self.grams: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(self.stream) - 1):
            self.grams.setdefault((self.stream[i], self.stream[i + 1]), []).append(i)
            self.grams.setdefault((self.stream[i],), []).append(i)

    def find(self, piece: list[int]) -> list[int]:
        cands = self.grams.get(tuple(piece[:2]), [])
        return [i for i in cands if self.stream[i:i + len(piece)] == piece]

    def follows(self, first: list[int], second: list[int], slack: int = 600) -> bool:
        """`second` starts after `first` ends, in the same document, with at most `slack`
        tokens between (truncation may remove tokens at the A/B boundary)."""
        starts = self.find(second)
        for i in self.find(first):
            end = i + len(first)
            if any(end <= j <= end + slack and self.doc_of[j] == self.doc_of[i] for j in starts):
                return True
        return False


@pytest.mark.parametrize("seq_len", [128, 512])
def test_nsp_instances_follow_the_paper(tokenized, seq_len: int) -> None:
    chunk = tokenized[:1000]
    text = _Text(chunk)
    cfg = InstanceConfig(seq_len=seq_len, objective="nsp", cls_id=101, sep_id=102)
    insts = create_instances(chunk, cfg, random.Random(seq_len))
    assert len(insts) > 500
    max_tokens = seq_len - 3
    for inst in insts:
        ids = inst.ids
        assert len(ids) <= seq_len and ids[0] == 101 and ids[inst.a_len - 1] == 102 and ids[-1] == 102
        a, b = ids[1:inst.a_len - 1], ids[inst.a_len:-1]
        assert a and b and 102 not in a and 102 not in b and len(a) + len(b) <= max_tokens
        assert text.find(a) and text.find(b)  # each segment is contiguous real text
        if inst.label == 0:  # B is A's true continuation
            assert text.follows(a, b)
    # ~10% of instances draw a short target (randint(2, max) can also hit max: 1 in max-1).
    short = sum(i.target_len < max_tokens for i in insts)
    assert _within(short, len(insts), 0.1 * (1 - 1 / (max_tokens - 1)))
    # Random B in half of the chunks that could have a true continuation; always otherwise.
    multi = [i for i in insts if not i.single_segment]
    assert _within(sum(i.label for i in multi), len(multi), 0.5)
    assert all(i.label == 1 for i in insts if i.single_segment)


def test_sop_and_mlm_instances(tokenized) -> None:
    chunk = tokenized[:1000]
    text = _Text(chunk)
    sop = create_instances(chunk, InstanceConfig(128, "sop", cls_id=101, sep_id=102), random.Random(1))
    for inst in sop[:600]:
        a, b = inst.ids[1:inst.a_len - 1], inst.ids[inst.a_len:-1]
        assert a and b and len(inst.ids) <= 128
        first, second = (a, b) if inst.label == 0 else (b, a)
        assert text.follows(first, second, slack=128)  # same document; label says the order
    assert _within(sum(i.label for i in sop), len(sop), 0.5)
    mlm = create_instances(chunk, InstanceConfig(128, "mlm", cls_id=101, sep_id=102), random.Random(2))
    assert all(i.label == -1 and i.a_len == len(i.ids) <= 128 for i in mlm)
    # Packed windows, in order, lose nothing: their concatenation is the chunk's documents
    # joined by [SEP]; all but the short-target ones and the last are full.
    joined = [t for d in chunk for t in [102] + [x for s in d for x in s]][1:]
    assert [t for i in mlm for t in i.ids[1:-1]] == joined
    assert sum(len(i.ids) < 128 for i in mlm) <= sum(i.target_len < 126 for i in mlm) + 1
