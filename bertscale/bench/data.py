"""Data throughput benchmark (`bertscale bench data`, also `python benchmarks/bench_data.py`).

Prints, for one process:
- tokenizer alone: MB/s of raw text through `encode_batch` (single-threaded), the floor of
  `prepare`'s work;
- prepare: MB/s of the same text through the whole `prepare` (read, split sentences, tokenize,
  pair, write spools, write shards), at seq 128 and at 128+512 from one run;
- loader: masked seq-128 samples/s (random access into the shards, masking, tensors), with
  token masking and with whole-word masking.

Both wall-clock and CPU-seconds rates are printed: on a shared machine the CPU rate is the
steadier number. Targets (issue 3): prepare >= 50% of tokenizer alone; loader >= 10,000
samples/s per process.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bertscale.data.text import read_documents
from bertscale.tokenizer import guess_lowercase, load_tokenizer


def _timed(fn: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench_data(files: list[str | Path], vocab: str | Path, loader_seconds: float = 3.0,
               work_dir: str | Path | None = None) -> dict[str, float]:
    """Run the three measurements on `files` with `vocab`; print and return the numbers."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process, one thread: per-process rates
    from bertscale.data.loader import LoaderConfig, MaskingConfig, open_loader
    from bertscale.data.prepare import PrepareConfig, run_prepare

    files = [Path(f) for f in files]
    lower = guess_lowercase(vocab)
    tok = load_tokenizer(vocab, lower)
    docs = [d for f in files for d in read_documents(f)]
    paragraphs = [p for d in docs for p in d]
    text_mb = sum(len(p.encode("utf-8")) for p in paragraphs) / 1e6
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def tokenize_all() -> None:
        for i in range(0, len(paragraphs), 5000):
            [e.ids for e in encode(paragraphs[i:i + 5000], add_special_tokens=False)]

    tokenize_all()  # warm-up (vocabulary caches)
    _, tw, tc = _timed(tokenize_all)
    res: dict[str, float] = {"text_mb": text_mb, "tokenizer_mb_s": text_mb / tw,
                             "tokenizer_mb_cpu_s": text_mb / tc}
    print(f"text: {text_mb:.2f} MB from {len(files)} files, {len(docs):,} documents")
    print(f"tokenizer alone:        {text_mb / tw:6.2f} MB/s wall  {text_mb / tc:6.2f} MB/CPU-s")

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for name, seqs in (("128", [128]), ("128_512", [128, 512])):
            out = Path(tmp) / name
            cfg = PrepareConfig(inputs=[str(f) for f in files], out=out, vocab=Path(vocab),
                                lowercase=lower, seq_lens=seqs, progress="none")
            _, pw, pc = _timed(lambda cfg=cfg: run_prepare(cfg))
            res[f"prepare_{name}_mb_s"] = text_mb / pw
            res[f"prepare_{name}_mb_cpu_s"] = text_mb / pc
            print(f"prepare seq {name.replace('_', '+'):>7}:   {text_mb / pw:6.2f} MB/s wall  "
                  f"{text_mb / pc:6.2f} MB/CPU-s  ({100 * tc / pc:.0f}% of tokenizer alone, CPU)")
        res["prepare_vs_tokenizer_cpu"] = res["prepare_128_mb_cpu_s"] / res["tokenizer_mb_cpu_s"]

        data = Path(tmp) / "128" / "seq128"
        for label, masking in (("token masking", MaskingConfig()),
                               ("whole-word masking", MaskingConfig(whole_word=True))):
            loader = open_loader(data, LoaderConfig(
                split="train", global_batch_size=256, micro_batch_size=64, seed=1, masking=masking))
            it = iter(loader)
            for _ in range(8):
                next(it)  # warm-up: open and index the first shards
            n, w0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - w0 < loader_seconds:
                n += len(next(it)["sample_ids"])
            lw, lc = time.perf_counter() - w0, time.process_time() - c0
            key = "loader_samples_s" if not masking.whole_word else "loader_wwm_samples_s"
            res[key] = n / lw
            res[key.replace("_s", "_cpu_s")] = n / lc
            print(f"loader, {label + ':':20s} {n / lw:8,.0f} masked seq-128 samples/s wall  "
                  f"{n / lc:8,.0f} per CPU-s")
            loader.close()
    return res


def shared_data_dir() -> Path:
    """Default inputs: the real Wikipedia sample beside a source checkout (../shared/data)."""
    return Path(os.environ.get("BERTSCALE_SHARED_DATA",
                               Path(__file__).resolve().parents[2].parent / "shared" / "data"))
