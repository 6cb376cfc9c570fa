"""WordPiece tokenizers: Google's vocabularies give transformers' ids on real Wikipedia text;
training is streamed and yields a usable BERT vocabulary; bad vocab files are named."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bertscale.errors import UserError
from bertscale.tokenizer import (SPECIAL_TOKENS, guess_lowercase, load_tokenizer, read_vocab,
                                 train_wordpiece)


def wiki_lines(shared_data: Path, *names: str) -> Iterator[str]:
    """Paragraph lines of WikiExtractor files, without the <doc> markup."""
    for name in names:
        with gzip.open(shared_data / "wikipedia" / name, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith(("<doc", "</doc")):
                    yield line


VOCABS = [("bert-base-uncased-vocab.txt", True), ("bert-base-cased-vocab.txt", False)]


@pytest.mark.parametrize("vocab_name, lowercase", VOCABS)
def test_google_vocab_matches_transformers(shared_data, tmp_path, vocab_name, lowercase):
    transformers = pytest.importorskip("transformers")
    vocab = shared_data / "vocab" / vocab_name
    # BertTokenizerFast(vocab_file=...) is broken in transformers 5; a folder works.
    shutil.copyfile(vocab, tmp_path / "vocab.txt")
    ref = transformers.BertTokenizerFast.from_pretrained(tmp_path, do_lower_case=lowercase)
    ours = load_tokenizer(vocab, lowercase)
    lines = list(wiki_lines(shared_data, "wiki_00.gz"))[:3000]
    assert len(lines) == 3000
    # Special tokens written in the text are matched verbatim, case-sensitively, as in
    # transformers (a fill-mask query); lower-case look-alikes are ordinary text.
    lines += ["Paris is the [MASK] of France.", "a[SEP]b [CLS][UNK] [pad] [mask] [unused7]"]

    want = ref(lines)
    got = ours.encode_batch(lines)
    mismatched = [i for i, e in enumerate(got) if e.ids != want["input_ids"][i]]
    assert not mismatched, f"{len(mismatched)} lines differ, first: {lines[mismatched[0]][:200]!r}"

    firsts, seconds = lines[0:2000:2], lines[1:2000:2]
    want = ref(firsts, seconds)
    got = ours.encode_batch(list(zip(firsts, seconds)))
    for i, e in enumerate(got):
        assert e.ids == want["input_ids"][i], firsts[i][:200]
        assert e.type_ids == want["token_type_ids"][i], firsts[i][:200]
    # Uncased folds case and accents; cased keeps both.
    tokens = ours.encode("Café").tokens[1:-1]
    if lowercase:
        assert tokens == ["cafe"]
    else:
        assert tokens[0].startswith("C") and "é" in "".join(tokens)
    assert guess_lowercase(vocab) is lowercase


def test_train_wordpiece_streams_and_round_trips(shared_data, tmp_path):
    files = ("wiki_01.gz", "wiki_02.gz", "wiki_03.gz")
    text_bytes = sum(len(line.encode()) for line in wiki_lines(shared_data, *files))

    tracemalloc.start()
    try:
        path = train_wordpiece(lambda: wiki_lines(shared_data, *files),
                               tmp_path / "out" / "vocab.txt", vocab_size=2000, lowercase=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Generators in (two passes), and Python never held the corpus: the peak is a fraction of the text
    # (a list of the lines alone would exceed it). Measured here: ~0.5 MB for 2.7 MB of text.
    print(f"\n[train_wordpiece] {text_bytes / 1e6:.1f} MB of text, Python peak {peak / 1e6:.2f} MB")
    assert peak < text_bytes / 3

    vocab = read_vocab(path)
    assert list(vocab)[:5] == list(SPECIAL_TOKENS)
    assert 1900 <= len(vocab) <= 2000
    assert any(t.startswith("##") for t in vocab)
    assert all(t == t.lower() for t in vocab if t not in SPECIAL_TOKENS)  # lower-cased corpus
    assert guess_lowercase(path) is True

    # Held-out text: decode(encode(x)) gives the normalised text back (spacing aside) for every
    # line without an unknown character, and that is nearly all lines.
    tok = load_tokenizer(path, lowercase=True)
    unk = tok.token_to_id("[UNK]")
    total = exact = 0
    for line in wiki_lines(shared_data, "wiki_10.gz"):
        total += 1
        enc = tok.encode(line)
        assert enc.ids[0] == vocab["[CLS]"] and enc.ids[-1] == vocab["[SEP]"]
        decoded = tok.decode(enc.ids)
        normalised = tok.normalizer.normalize_str(line)
        if unk in enc.ids:
            continue
        assert "".join(decoded.split()) == "".join(normalised.split()), line[:200]
        exact += 1
    print(f"[train_wordpiece] round trip on held-out wiki_10: {exact}/{total} lines")
    assert exact >= 0.98 * total


def test_training_is_reproducible_across_processes(shared_data, tmp_path):
    """The same corpus gives the same vocab.txt in separate processes (each with its own
    hash-map seeds). Without the fixed numbering of the "##" symbols this corpus gave a
    different vocabulary in nearly every process (huggingface/tokenizers#1794)."""
    import subprocess
    import sys
    code = ("import gzip, sys; from bertscale.tokenizer import train_wordpiece; "
            f"lines = gzip.open({str(shared_data / 'wikipedia' / 'wiki_00.gz')!r}, 'rt')"
            ".read().splitlines()[:3000]; "
            "train_wordpiece(lambda: iter(lines), sys.argv[1], vocab_size=3000)")
    outs = [tmp_path / f"v{i}.txt" for i in range(4)]
    for out in outs:
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=300)
    texts = [o.read_text() for o in outs]
    assert all(t == texts[0] for t in texts[1:])
    assert len(texts[0].splitlines()) >= 2900


def test_cased_training_keeps_case(shared_data, tmp_path):
    path = train_wordpiece(lambda: wiki_lines(shared_data, "wiki_04.gz"), tmp_path / "vocab.txt",
                           vocab_size=1000, lowercase=False)
    assert guess_lowercase(path) is False
    assert load_tokenizer(path, lowercase=False).encode("The").tokens[1] != "the"


@pytest.mark.parametrize("content, message", [
    (None, "vocabulary file not found"),
    (b"\xff\xfe[PAD]\n", "not UTF-8"),
    ("[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n[MASK]\n", ":3: empty line"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n", ":7: token 'the' appears twice"),
    ("[PAD]\n[UNK]\n[SEP]\nthe\n", r"missing special tokens \[CLS\], \[MASK\]"),
])
def test_bad_vocab_is_a_user_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "my-vocab.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_tokenizer(path, lowercase=True)
    assert str(path) in str(e.value)


def test_train_rejects_a_vocab_smaller_than_the_specials(tmp_path):
    with pytest.raises(UserError, match="vocab_size 5 must exceed the 5 special tokens"):
        train_wordpiece(lambda: iter(["a b c"]), tmp_path / "v.txt", vocab_size=5)
    assert not (tmp_path / "v.txt").exists()
