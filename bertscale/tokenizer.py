"""WordPiece tokenizers through the `tokenizers` library.

Loading a Google `vocab.txt` gives the same ids as `transformers.BertTokenizerFast` (the
pipeline is the same: BERT normaliser with optional lower-casing and accent stripping, BERT
pre-tokeniser, WordPiece with `##` continuation, [CLS]/[SEP] template). Training streams the
corpus through an iterator, so memory stays bounded by the vocabulary statistics, not the text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import (AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors,
                        trainers)
from tokenizers.models import WordPiece

from bertscale.errors import UserError
from bertscale.files import read_text, write_text_atomic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: str | Path) -> dict[str, int]:
    """Read a one-token-per-line vocab.txt; errors name the file and the problem."""
    path = Path(path)
    text = read_text(path, "vocabulary file")
    vocab: dict[str, int] = {}
    for i, line in enumerate(text.split("\n")):
        token = line.rstrip("\r")
        if not token:
            if i == len(text.split("\n")) - 1:
                break  # trailing newline
            raise UserError(f"{path}:{i + 1}: empty line in vocabulary")
        if token in vocab:
            raise UserError(f"{path}:{i + 1}: token {token!r} appears twice "
                            f"(first on line {vocab[token] + 1})")
        vocab[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"{path}: not a BERT vocabulary, missing special tokens {', '.join(missing)}")
    return vocab


def _assemble(vocab: dict[str, int] | None, lowercase: bool) -> Tokenizer:
    tok = Tokenizer(WordPiece(vocab=vocab or {}, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents=None follows lowercase, exactly as BertTokenizerFast does.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if vocab:
        # As BertTokenizerFast does: the specials are added tokens, matched verbatim in the raw
        # text before normalisation ("[MASK]" in a fill-mask query is the mask id) and skipped
        # by decode().
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS if t in vocab])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def load_tokenizer(vocab_path: str | Path, lowercase: bool) -> Tokenizer:
    """A BERT WordPiece tokenizer from a Google-style vocab.txt."""
    return _assemble(read_vocab(vocab_path), lowercase)


def guess_lowercase(vocab_path: str | Path) -> bool:
    """Whether a vocab is uncased: Google's uncased vocab has no capitalised whole words."""
    vocab = read_vocab(vocab_path)
    capitals = sum(1 for t in vocab if t[:1].isupper() and not t.startswith("["))
    return capitals < 0.01 * len(vocab)


def train_wordpiece(texts: Callable[[], Iterable[str]], out_path: str | Path,
                    vocab_size: int = 30522, lowercase: bool = True, min_frequency: int = 2,
                    special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Path:
    """Train a WordPiece vocabulary and write it as vocab.txt; the same text gives the same file.

    `texts` returns a fresh iterator over the corpus each time it is called; it is called twice
    (the corpus is streamed, never held). Why twice: the `tokenizers` trainer numbers the
    continuing-subword symbols ("##e") in hash-map order and breaks frequency ties between merges
    by those numbers, so the same corpus gave a different vocabulary from run to run
    (huggingface/tokenizers#1794). A first, merge-free pass finds every "##c" symbol; the real
    pass registers them up front in sorted order, after the special tokens, which fixes their
    numbers and with them every tie-break.

    The special tokens take ids 0..4 in the order given ([PAD] first, as Google's vocab has it
    at 0), so the ids the model pads with are the same as in the released checkpoints.
    """
    if vocab_size <= len(special_tokens):
        raise UserError(f"vocab_size {vocab_size} must exceed the {len(special_tokens)} special tokens")

    def train(vocab_size: int, symbols: list[str]) -> Tokenizer:
        tok = _assemble(None, lowercase)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=[*special_tokens, *symbols], continuing_subword_prefix="##",
            show_progress=False)
        tok.train_from_iterator(_batched(texts()), trainer=trainer)
        return tok

    # Pass 1: vocabulary size = the specials + 1 stops before any merge; the alphabet and its
    # continuing forms are in the vocabulary all the same.
    first = train(len(special_tokens) + 1, [])
    symbols = sorted(t for t in first.get_vocab() if t.startswith("##") and len(t) == 3)
    tok = train(vocab_size, symbols)
    # Ids in the file: the specials first, then every other token sorted (the trainer's own
    # order says nothing a model needs).
    learned = sorted(t for t in tok.get_vocab() if t not in special_tokens)
    vocab = {t: i for i, t in enumerate([*special_tokens, *learned])}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_path, "".join(t + "\n" for t, _ in sorted(vocab.items(),
                                                                    key=lambda kv: kv[1])))
    return out_path


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def vocab_hash(vocab_path: str | Path, lowercase: bool) -> str:
    """Identity of a tokenizer: sha256 of the vocab bytes plus the casing flag. Stored in
    manifests and checkpoints so that a resume with another tokenizer is refused."""
    h = hashlib.sha256(Path(vocab_path).read_bytes())
    h.update(b"lowercase=1" if lowercase else b"lowercase=0")
    return h.hexdigest()
