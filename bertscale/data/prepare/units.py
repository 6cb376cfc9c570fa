"""Phase 1: one input file (a unit) -> spool files of shuffled instances, one per sequence length
and split, committed by renaming the unit's folder into place.

Every random draw is seeded by (seed, unit, chunk, ...) only, so a unit's spools are the same
whichever process makes them.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bertscale.data.instances import Instance, InstanceConfig, create_instances
from bertscale.data.prepare.inputs import local_input
from bertscale.data.shards import SPLITS, encode_sample, token_dtype
from bertscale.data.text import read_documents, split_sentences
from bertscale.files import publish_dir, remove_stale, temporary_sibling
from bertscale.tokenizer import load_tokenizer

_TOKENIZERS: dict[tuple[str, bool], tuple[Any, dict[str, int]]] = {}


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from a tuple: independent streams per (seed, unit, chunk, …)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _tokenizer(vocab: str, lowercase: bool) -> tuple[Any, dict[str, int]]:
    """(tokenizer, vocab) loaded once per process."""
    key = (vocab, lowercase)
    if key not in _TOKENIZERS:
        tok = load_tokenizer(vocab, lowercase)
        _TOKENIZERS[key] = (tok, tok.get_vocab())
    return _TOKENIZERS[key]


def tokenize_documents(docs: list[list[str]], tokenizer: Any,
                       split: bool = True) -> list[list[list[int]]]:
    """Documents (paragraph lists) -> documents as lists of sentence token-id lists.

    All sentences of the chunk go to the tokenizer in one batch (Rust, no per-sentence Python
    call). Empty sentences are dropped; the result is aligned with `docs`, so a document with no
    tokens at all comes back as an empty list."""
    sentences: list[str] = []
    bounds: list[tuple[int, int]] = []
    for doc in docs:
        start = len(sentences)
        for para in doc:
            if split:
                sentences.extend(split_sentences(para))
            else:
                sentences.append(para)
        bounds.append((start, len(sentences)))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = [e.ids for e in encode(sentences, add_special_tokens=False)]
    return [[s for s in ids[a:b] if s] for a, b in bounds]


def chunked(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Lists of n items (the last one shorter)."""
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class UnitTask:
    unit: int
    path: str
    work: str
    vocab: str
    lowercase: bool
    cfg: dict[str, Any]  # the PrepareConfig fields phase 1 needs


def spool_key(seq_len: int, split: str) -> str:
    return f"seq{seq_len}-{split}"


def unit_dir(work: Path, unit: int) -> Path:
    return work / "units" / f"u{unit:06d}"


class Spools:
    """A unit's spool files, one per (sequence length, split): encoded samples appended in
    order, their byte offsets (saved as the spool's index) and the counts the manifest reports."""

    def __init__(self, folder: Path, seq_lens: list[int], dtype: np.dtype, objective: str):
        self.folder, self.dtype = folder, dtype
        self.pair_tokens = 2 if objective == "mlm" else 3  # [CLS] and [SEP](s) of a full sample
        self.files: dict[str, BinaryIO] = {}
        self.offsets: dict[str, list[int]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        for L in seq_lens:
            for split in SPLITS:
                key = spool_key(L, split)
                self.files[key] = open(folder / f"{key}.bin", "wb")
                self.offsets[key] = [0]
                self.stats[key] = dict(samples=0, tokens=0, label_1=0, short_target=0,
                                       single_segment=0)

    def append(self, seq_len: int, split: str, instances: list[Instance]) -> None:
        key = spool_key(seq_len, split)
        f, offs, st = self.files[key], self.offsets[key], self.stats[key]
        full = seq_len - self.pair_tokens
        for inst in instances:
            payload = encode_sample(np.asarray(inst.ids, dtype=self.dtype), inst.a_len, inst.label)
            f.write(payload)
            offs.append(offs[-1] + len(payload))
            st["samples"] += 1
            st["tokens"] += len(inst.ids)
            st["label_1"] += inst.label == 1
            st["short_target"] += inst.target_len < full
            st["single_segment"] += inst.single_segment

    def finish(self) -> dict[str, int]:
        """Close the spools and write their indexes; the sample count of each."""
        self.close()
        for key, offs in self.offsets.items():
            np.save(self.folder / f"{key}.idx.npy", np.asarray(offs, dtype=np.int64))
        return {k: len(v) - 1 for k, v in self.offsets.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def chunk_instances(docs: list[list[list[int]]], is_eval: list[bool],
                    icfgs: dict[int, InstanceConfig], cfg: dict[str, Any], unit: int,
                    chunk: int) -> Iterator[tuple[int, str, list[Instance]]]:
    """(seq_len, split, instances) of one chunk of tokenized documents: `dupe_factor` rounds of
    pairing per split and length, shuffled within the chunk."""
    seed = cfg["seed"]
    for split in SPLITS:
        split_docs = [d for d, e in zip(docs, is_eval) if e == (split == "eval")]
        if not split_docs:
            continue
        for L, icfg in icfgs.items():
            insts: list[Instance] = []
            for dupe in range(cfg["dupe_factor"]):
                rng = random.Random(derive_seed(seed, "instances", unit, chunk, L, split, dupe))
                insts.extend(create_instances(split_docs, icfg, rng))
            random.Random(derive_seed(seed, "shuffle", unit, chunk, L, split)).shuffle(insts)
            yield L, split, insts


def process_unit(task: UnitTask, report: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Phase 1 for one input file; returns (and commits) the unit's summary."""
    cfg = task.cfg
    final = unit_dir(Path(task.work), task.unit)
    marker = final / "done.json"
    if marker.is_file():
        return dict(json.loads(marker.read_text()))
    remove_stale(final)
    tmp = temporary_sibling(final)
    tmp.mkdir(parents=True)
    tok, vocab = _tokenizer(task.vocab, task.lowercase)
    icfgs = {L: InstanceConfig(seq_len=L, objective=cfg["objective"],
                               short_seq_prob=cfg["short_seq_prob"],
                               cls_id=vocab["[CLS]"], sep_id=vocab["[SEP]"])
             for L in cfg["seq_lens"]}
    spools = Spools(tmp, cfg["seq_lens"], token_dtype(len(vocab)), cfg["objective"])
    summary: dict[str, Any] = dict(unit=task.unit, input=task.path, text_bytes=0, documents=0,
                                   sentences=0)
    try:
        local, input_sha256, input_bytes = local_input(task.path, tmp)
        docs_iter = read_documents(local, cfg["format"], cfg["text_field"], cfg.get("id_field"))
        for c, docs in enumerate(chunked(docs_iter, cfg["docs_per_chunk"])):
            text_bytes = sum(len(p.encode("utf-8")) for d in docs for p in d)
            erng = random.Random(derive_seed(cfg["seed"], "eval", task.unit, c))
            is_eval = [erng.random() < cfg["eval_fraction"] for _ in docs]
            pairs = [(d, e) for d, e in zip(tokenize_documents(docs, tok, cfg["split_sentences"]),
                                            is_eval) if d]
            tokenized = [d for d, _ in pairs]
            summary["documents"] += len(tokenized)
            summary["sentences"] += sum(len(d) for d in tokenized)
            summary["text_bytes"] += text_bytes
            made = 0
            for L, split, insts in chunk_instances(tokenized, [e for _, e in pairs], icfgs, cfg,
                                                   task.unit, c):
                spools.append(L, split, insts)
                made += len(insts)
            if report is not None:
                report(text_bytes, made)
        summary["counts"] = spools.finish()
        if local != Path(task.path):
            local.unlink()  # the downloaded copy of a remote input
        summary["input_bytes"] = input_bytes
        summary["input_sha256"] = input_sha256
        summary["stats"] = spools.stats
        (tmp / "done.json").write_text(json.dumps(summary, sort_keys=True))
        publish_dir(tmp, final)  # the unit's commit: its data is on disk before the rename
    except BaseException:
        spools.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
