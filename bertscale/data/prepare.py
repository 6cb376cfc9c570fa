"""`bertscale prepare`: raw text → WebDataset tar shards + manifest, one folder per sequence length.

How the work is split, and why the output does not depend on it
-----------------------------------------------------------------
The unit of work is one input file (sorted by path; its index is its unit id). Phase 1 reads a
unit as a stream of chunks of ``docs_per_chunk`` documents; each chunk is split into sentences,
tokenized in one ``encode_batch`` call (Rust), assigned to train/eval per document, turned into
instances for every sequence length (random B drawn within the chunk, see `instances`), shuffled
within the chunk, and appended to the unit's spool files (one per sequence length and split).
Every random draw is seeded by (seed, unit, chunk, …) only, so a unit's spool is the same whoever
processes it. The spool folder is renamed into place when the unit is complete: that rename is
the unit's commit.

Phase 2 concatenates the spools in unit order and cuts shards of exactly ``samples_per_shard``
samples (the last one of a split holds the rest). Shard k's samples are known from the spool
counts alone, so any process can write any shard: shard tasks are dealt round-robin. A shard is
written to a temporary file while it is hashed, then renamed; a small done-marker records its
sha256. Finally rank 0 writes each manifest (temp + rename) and removes the spools.

Hence: the shards are byte-identical for any number of local workers or MPI ranks (tested: 1, 2
processes and ``mpirun -np 2``); memory per process is one chunk of documents plus one shard
being copied; a re-run after a crash skips committed units and shards and redoes only the rest.
A re-run with different settings into the same folder is refused (the plan is recorded).

Limits: parallelism is over input files, so one huge file is processed by one process (split it,
e.g. with ``split -n l/64``, or give many files as Wikipedia extractions and BookCorpus come);
compressed inputs cannot be read from the middle. Spools need about as much disk as the shards
while the run lasts. The random second segment comes from the same chunk of ``docs_per_chunk``
documents rather than the whole corpus (the price of bounded memory).

MPI: under ``mpirun``/``srun`` (detected from the launcher's environment; mpi4py imported only
then), ranks take disjoint units (largest files first, dealt greedily), meet at a barrier (an
allgather that also carries any rank's error, so a failure on one rank stops all instead of
hanging them), share the shard tasks, and rank 0 writes the manifests. The output folder must be
on a file system all ranks see.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertscale.data.instances import OBJECTIVES, InstanceConfig, create_instances
from bertscale.data.shards import (MANIFEST_NAME, MAX_SAMPLES_PER_SHARD, SPLITS, TarWriter,
                                   encode_sample, manifest_dict, member_name, sha256_file,
                                   shard_name, token_dtype, write_manifest)
from bertscale.data.text import FORMATS, expand_inputs, read_documents, split_sentences
from bertscale.errors import UserError
from bertscale.files import (copy_atomic, publish_dir, remove_stale, stop_on_full_disk,
                             temporary_sibling, write_text_atomic)
from bertscale.tokenizer import (SPECIAL_TOKENS, guess_lowercase, load_tokenizer, read_vocab,
                                 train_wordpiece, vocab_hash)

log = logging.getLogger("bertscale.prepare")


# How long the ranks of a prepare job wait for each other at start (a shared filesystem may
# show another node's new file seconds late; a rank may start late on a busy node).
START_TIMEOUT_S = 300.0


@dataclass
class PrepareConfig:
    inputs: list[str]
    """Files, folders or glob patterns of raw text (any of the supported formats)."""
    out: Path
    """Output folder; gets seq<L>/ per sequence length (shards, manifest.json, vocab.txt)."""
    vocab: Path | None = None
    """A Google-style vocab.txt; or None with `train_vocab`."""
    lowercase: bool | None = None
    """Lower-case (uncased) tokenization; None: guessed from the vocab (True when training)."""
    train_vocab: int | None = None
    """Train a WordPiece vocabulary of this size from the inputs first (written to out/vocab.txt)."""
    seq_lens: list[int] = field(default_factory=lambda: [128])
    """Sequence lengths to produce; the paper's two phases are 128 and 512."""
    objective: str = "nsp"
    """nsp (BERT) | sop (ALBERT sentence order) | mlm (packed, no pair objective)."""
    short_seq_prob: float = 0.1
    """Share of instances with a shorter random target length."""
    dupe_factor: int = 1
    """Times each chunk is turned into instances (different pairings). Google used 10 for static
    masking; with dynamic masking in the loader 1 is usual."""
    samples_per_shard: int = 10_000
    eval_fraction: float = 0.01
    """Share of documents held out for the eval split."""
    seed: int = 12345
    format: str = "auto"
    text_field: str = "text"
    """JSON lines, Parquet, Arrow: the field or column with the text."""
    id_field: str | None = None
    """JSON lines, Parquet, Arrow: consecutive rows with equal values here are one document
    (None: every row is a document)."""
    split_sentences: bool = True
    """Split lines into sentences; off when the input is already one sentence per line."""
    docs_per_chunk: int = 1000
    """Documents held in memory at once per process; also the pool the random B is drawn from."""
    workers: int = 1
    """Local processes (per MPI rank when under MPI)."""
    keep_work: bool = False
    """Keep the spool folder (out/.work) after success."""
    progress: str = "auto"
    """auto | bar | log | none."""
    start_timeout_s: float = START_TIMEOUT_S
    """Under MPI: how long the ranks wait for each other at start (MPIContext.wait_for_all_ranks)."""

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("no input files given")
        if (self.vocab is None) == (self.train_vocab is None):
            raise UserError("give exactly one of --vocab <vocab.txt> and --train-vocab <size>")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective {self.objective!r}: choose from {', '.join(OBJECTIVES)}")
        if not self.seq_lens or any(L < 8 or L > 65535 for L in self.seq_lens):
            raise UserError(f"--seq-len {self.seq_lens}: each must be in [8, 65535]")
        if len(set(self.seq_lens)) != len(self.seq_lens):
            raise UserError(f"--seq-len {self.seq_lens} repeats a length")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob {self.short_seq_prob} is not a probability")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        for flag, count in (("--dupe-factor", self.dupe_factor),
                            ("--docs-per-chunk", self.docs_per_chunk), ("--workers", self.workers)):
            if count < 1:
                raise UserError(f"{flag} {count} must be >= 1")
        if not 1 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise UserError(f"--samples-per-shard {self.samples_per_shard} must be in "
                            f"[1, {MAX_SAMPLES_PER_SHARD}]")
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r}: choose from {', '.join(FORMATS)}")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise UserError(f"--progress {self.progress!r}: choose auto, bar, log or none")
        if not self.start_timeout_s > 0:
            raise UserError(f"--start-timeout {self.start_timeout_s} must be > 0 seconds")
        if self.train_vocab is not None and self.train_vocab <= 5:
            raise UserError(f"--train-vocab {self.train_vocab} is too small")


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from a tuple: independent streams per (seed, unit, chunk, …)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


# ---------------------------------------------------------------------------------------------
# Launch context: local processes or MPI ranks

class Context:
    """Rank / size and a barrier that carries errors (size 1 when not under MPI)."""

    rank = 0
    size = 1
    is_mpi = False

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def wait_for_all_ranks(self, folder: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        """One process: nobody to wait for."""


class MPIContext(Context):
    is_mpi = True

    def __init__(self) -> None:
        from mpi4py import MPI  # only under an MPI launcher: importing it initialises MPI

        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def wait_for_all_ranks(self, folder: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once every rank is past MPI_Init, learnt without an MPI message.

        Open MPI 4.1 (seen with Debian 12's 4.1.4) can crash a rank that is still inside MPI_Init
        when a message from a rank that left it earlier arrives: the PML has not registered its
        receive handler yet, and the TCP BTL calls a null function (SIGSEGV in
        mca_btl_tcp.so, about one two-node `srun --mpi=pmix` start in 100 on a test machine;
        Open MPI PR 13559 describes the same race on its main branch). So the first message
        waits for a file from each rank in `folder`, which every rank must share anyway (the
        shards of all ranks go there). A rank that never shows up is named with the folder: the
        usual cause is an --out that is not on a filesystem all nodes share."""
        key = _launch_key()
        if key is None:
            return  # a launcher that names no job: no folder of its own to meet in
        meet = folder / f".mpi-start-{key}"
        meet.mkdir(parents=True, exist_ok=True)
        (meet / f"rank{self.rank}").touch()
        want = {f"rank{r}" for r in range(self.size)}
        deadline, pause = time.monotonic() + timeout_s, 0.02
        while missing := want - set(os.listdir(meet)):
            if time.monotonic() > deadline:
                ranks = sorted(int(m[4:]) for m in missing)
                shown = ", ".join(map(str, ranks[:8])) + (" …" if len(ranks) > 8 else "")
                raise UserError(f"rank(s) {shown} of {self.size} did not appear in "
                                f"{meet.absolute()} within {timeout_s:.0f} s; is "
                                f"{folder.absolute()} on a filesystem every node shares, and did "
                                f"every rank start?")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        self.comm.Barrier()  # safe now; after it nobody reads `meet` any more
        if self.rank == 0:
            shutil.rmtree(meet, ignore_errors=True)  # a leftover marker folder is harmless


def _launch_key() -> str | None:
    """A name all ranks of this MPI job see alike and no other job shares, from the launcher's
    environment (PMIx: srun --mpi=pmix, Open MPI's mpirun; else SLURM's job and step)."""
    key = os.environ.get("PMIX_NAMESPACE") or os.environ.get("OMPI_MCA_ess_base_jobid")
    if not key and os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
        key = f"slurm.{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) if key else None


# Set by mpirun/mpiexec (Open MPI, MPICH/Hydra, MVAPICH, Intel MPI) or by srun's PMI plugins.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMI_FD", "PMIX_RANK",
            "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def detect_context() -> Context:
    """MPI when an MPI launcher (or srun with a PMI plugin) started us, else one process."""
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a step (not for the batch script).
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if any(v in os.environ for v in _MPI_ENV):
        ctx = MPIContext()
        if ctx.size == 1 and step_tasks > 1:
            raise UserError(f"launched by srun with {step_tasks} tasks but MPI sees 1 rank: "
                            f"run `srun --mpi=pmix` (or pmi2) so the ranks can talk")
        return ctx
    if step_tasks > 1:
        raise UserError(f"launched by srun with {step_tasks} tasks but without MPI: every task "
                        f"would do all the work; run `srun --mpi=pmix bertscale prepare …`")
    return Context()


def collective(ctx: Context, what: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if any rank fails, every rank raises (no rank hangs waiting)."""
    if ctx.size == 1:
        return fn()
    err: str | None = None
    result = None
    try:
        result = fn()
    except UserError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - a bug: keep its traceback on this rank, stop the others too
        traceback.print_exc()
        err = f"{type(e).__name__}: {e}"
    errors = ctx.allgather(err)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise UserError(f"{what} failed: " + "; ".join(f"rank {r}: {e}" for r, e in bad))
    return result


# ---------------------------------------------------------------------------------------------
# Progress

class Progress:
    """A one-line bar on a terminal, a log line every `every` seconds otherwise."""

    def __init__(self, mode: str, total_units: int, prefix: str = "", every: float = 10.0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.prefix, self.every = mode, total_units, prefix, every
        self.t0 = self.last = time.monotonic()
        self.units = self.text_bytes = self.samples = 0

    def update(self, text_bytes: int = 0, samples: int = 0, units: int = 0) -> None:
        self.text_bytes += text_bytes
        self.samples += samples
        self.units += units
        now = time.monotonic()
        if self.mode == "bar" and now - self.last >= 0.2:
            self.last = now
            print(f"\r{self.prefix}{self.line()}", end="", file=sys.stderr, flush=True)
        elif self.mode == "log" and now - self.last >= self.every:
            self.last = now
            print(f"{self.prefix}{self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        from bertscale.reporting import hms
        dt = max(time.monotonic() - self.t0, 1e-9)
        text = (f"text {self.text_bytes / 1e6:,.1f} MB ({self.text_bytes / 1e6 / dt:,.2f} MB/s)  "
                if self.text_bytes else "")
        samples = f"samples {self.samples:,} ({self.samples / dt:,.0f}/s)  " if self.samples else ""
        # The ETA assumes the units left cost what the finished ones did on average.
        eta = dt / self.units * (self.total - self.units) if self.units else float("nan")
        tail = f"  ETA {hms(eta)}" if self.units < self.total else ""
        return f"{self.units}/{self.total} done  {text}{samples}{dt:,.1f} s{tail}"

    def done(self, what: str) -> None:
        if self.mode == "none":
            return
        lead = "\r" if self.mode == "bar" else ""
        print(f"{lead}{self.prefix}{what}: {self.line()}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Phase 1: one input file -> spools

_TOKENIZERS: dict[tuple[str, bool], tuple[Any, dict[str, int]]] = {}
_PROGRESS_Q: Any = None


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


def _spool_key(seq_len: int, split: str) -> str:
    return f"seq{seq_len}-{split}"


def unit_dir(work: Path, unit: int) -> Path:
    return work / "units" / f"u{unit:06d}"


def process_unit(task: UnitTask, report: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Phase 1 for one input file; returns (and commits) the unit's summary."""
    cfg = task.cfg
    final = unit_dir(Path(task.work), task.unit)
    marker = final / "done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    remove_stale(final)
    tmp = temporary_sibling(final)
    tmp.mkdir(parents=True)
    tok, vocab = _tokenizer(task.vocab, task.lowercase)
    dtype = token_dtype(len(vocab))
    icfgs = {L: InstanceConfig(seq_len=L, objective=cfg["objective"],
                               short_seq_prob=cfg["short_seq_prob"],
                               cls_id=vocab["[CLS]"], sep_id=vocab["[SEP]"])
             for L in cfg["seq_lens"]}
    files: dict[str, Any] = {}
    offsets: dict[str, list[int]] = {}
    stats: dict[str, dict[str, int]] = {}
    for L in cfg["seq_lens"]:
        for split in SPLITS:
            key = _spool_key(L, split)
            files[key] = open(tmp / f"{key}.bin", "wb")
            offsets[key] = [0]
            stats[key] = dict(samples=0, tokens=0, label_1=0, short_target=0, single_segment=0)
    seed = cfg["seed"]
    summary = dict(unit=task.unit, input=task.path, text_bytes=0, documents=0, sentences=0)
    try:
        local, input_sha256, input_bytes = _local_input(task.path, tmp)
        docs_iter = read_documents(local, cfg["format"], cfg["text_field"],
                                   cfg.get("id_field"))
        for c, docs in enumerate(chunked(docs_iter, cfg["docs_per_chunk"])):
            text_bytes = sum(len(p.encode("utf-8")) for d in docs for p in d)
            erng = random.Random(derive_seed(seed, "eval", task.unit, c))
            is_eval = [erng.random() < cfg["eval_fraction"] for _ in docs]
            pairs = [(d, e) for d, e in zip(tokenize_documents(docs, tok, cfg["split_sentences"]),
                                            is_eval) if d]
            tokenized = [d for d, _ in pairs]
            summary["documents"] += len(tokenized)
            summary["sentences"] += sum(len(d) for d in tokenized)
            summary["text_bytes"] += text_bytes
            made = 0
            for split in SPLITS:
                split_docs = [d for d, e in pairs if e == (split == "eval")]
                if not split_docs:
                    continue
                for L, icfg in icfgs.items():
                    insts = []
                    for dupe in range(cfg["dupe_factor"]):
                        rng = random.Random(derive_seed(seed, "instances", task.unit, c, L, split, dupe))
                        insts.extend(create_instances(split_docs, icfg, rng))
                    random.Random(derive_seed(seed, "shuffle", task.unit, c, L, split)).shuffle(insts)
                    key = _spool_key(L, split)
                    f, offs, st = files[key], offsets[key], stats[key]
                    full = L - (2 if cfg["objective"] == "mlm" else 3)
                    for inst in insts:
                        payload = encode_sample(np.asarray(inst.ids, dtype=dtype), inst.a_len,
                                                inst.label)
                        f.write(payload)
                        offs.append(offs[-1] + len(payload))
                        st["samples"] += 1
                        st["tokens"] += len(inst.ids)
                        st["label_1"] += inst.label == 1
                        st["short_target"] += inst.target_len < full
                        st["single_segment"] += inst.single_segment
                    made += len(insts)
            if report is not None:
                report(text_bytes, made)
        for key, f in files.items():
            f.close()
            np.save(tmp / f"{key}.idx.npy", np.asarray(offsets[key], dtype=np.int64))
        if local != Path(task.path):
            local.unlink()  # the downloaded copy of a remote input
        summary["input_bytes"] = input_bytes
        summary["input_sha256"] = input_sha256
        summary["counts"] = {k: len(v) - 1 for k, v in offsets.items()}
        summary["stats"] = stats
        (tmp / "done.json").write_text(json.dumps(summary, sort_keys=True))
        publish_dir(tmp, final)  # the unit's commit: its data is on disk before the rename
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ---------------------------------------------------------------------------------------------
# Phase 2: spools -> shards

@dataclass
class ShardTask:
    seq_len: int
    split: str
    index: int
    pieces: list[tuple[int, int, int]]  # (unit, first sample, end sample) in spool order
    work: str
    out: str

    @property
    def marker(self) -> Path:
        name = shard_name(self.split, self.index)
        return Path(self.work) / "shards" / f"seq{self.seq_len}-{name}.json"

    @property
    def path(self) -> Path:
        return Path(self.out) / f"seq{self.seq_len}" / shard_name(self.split, self.index)


def plan_shards(summaries: list[dict[str, Any]], cfg: PrepareConfig, work: Path) -> list[ShardTask]:
    tasks = []
    S = cfg.samples_per_shard
    for L in cfg.seq_lens:
        for split in SPLITS:
            key = _spool_key(L, split)
            units = [(s["unit"], s["counts"][key]) for s in sorted(summaries, key=lambda s: s["unit"])]
            total = sum(n for _, n in units)
            for k in range((total + S - 1) // S):
                lo, hi = k * S, min((k + 1) * S, total)
                pieces, base = [], 0
                for unit, n in units:
                    a, b = max(lo, base), min(hi, base + n)
                    if a < b:
                        pieces.append((unit, a - base, b - base))
                    base += n
                tasks.append(ShardTask(L, split, k, pieces, str(work), str(cfg.out)))
    return tasks


def write_shard(task: ShardTask) -> dict[str, Any]:
    marker = task.marker
    if marker.is_file():
        info = json.loads(marker.read_text())
        if task.path.is_file() and task.path.stat().st_size == info["bytes"]:
            return info
    task.path.parent.mkdir(parents=True, exist_ok=True)
    writer = TarWriter(task.path)
    try:
        offset = 0
        for unit, a, b in task.pieces:
            d = unit_dir(Path(task.work), unit)
            key = _spool_key(task.seq_len, task.split)
            offs = np.load(d / f"{key}.idx.npy")
            with open(d / f"{key}.bin", "rb") as f:
                f.seek(int(offs[a]))
                blob = f.read(int(offs[b] - offs[a]))
            base = int(offs[a])
            for i in range(a, b):
                writer.add(member_name(task.split, task.index, offset),
                           memoryview(blob)[int(offs[i]) - base:int(offs[i + 1]) - base])
                offset += 1
        nbytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    info = dict(name=task.path.name, samples=offset, bytes=nbytes, sha256=sha)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(info, sort_keys=True))
    return info


# ---------------------------------------------------------------------------------------------
# Orchestration

def _pool_init(q: Any) -> None:
    global _PROGRESS_Q
    _PROGRESS_Q = q
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _unit_in_worker(task: UnitTask) -> dict[str, Any]:
    return process_unit(task, lambda b, n: _PROGRESS_Q.put((b, n)))


def _run_tasks(kind: str, tasks: list[Any], workers: int, progress: Progress | None) -> None:
    """Run unit ("unit") or shard ("shard") tasks here (one worker) or in a spawn pool."""
    _run_tasks_inner(kind, tasks, workers, progress)
    if progress is not None:
        progress.done("finished")


def _run_tasks_inner(kind: str, tasks: list[Any], workers: int, progress: Progress | None) -> None:
    def shard_done(info: dict[str, Any]) -> None:
        if progress is not None:
            progress.update(samples=info["samples"] if kind == "shard" else 0, units=1)

    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            if kind == "unit":
                shard_done(process_unit(t, progress.update if progress is not None else None))
            else:
                shard_done(write_shard(t))
        return
    ctx = mp.get_context("spawn")  # never fork a process whose tokenizer threads are running
    q = ctx.Queue()
    fn = _unit_in_worker if kind == "unit" else write_shard
    with ctx.Pool(min(workers, len(tasks)), initializer=_pool_init, initargs=(q,)) as pool:
        pending = [pool.apply_async(fn, (t,)) for t in tasks]
        while pending or not q.empty():
            try:
                b, n = q.get(timeout=0.1)
                if progress is not None:
                    progress.update(b, n)
                continue
            except queue.Empty:
                pass
            still = []
            for p in pending:
                if p.ready():
                    shard_done(p.get())  # re-raises a worker's exception here
                else:
                    still.append(p)
            pending = still


def _plan(cfg: PrepareConfig, files: list[str], sizes: list[int]) -> dict[str, Any]:
    c = asdict(cfg)
    for k in ("inputs", "out", "vocab", "workers", "keep_work", "progress"):
        c.pop(k)
    if c["id_field"] is None:
        c.pop("id_field")  # so that runs without it keep the fingerprint they always had
    c["vocab_sha256"] = sha256_file(cfg.vocab) if cfg.vocab is not None else None
    c["inputs"] = [[f, n] for f, n in zip(files, sizes)]
    return c


def _input_sizes(files: list[str]) -> list[int]:
    from bertscale.data import remote

    sizes = []
    for f in files:
        try:
            sizes.append(remote.object_size(f) if remote.is_remote(f) else os.path.getsize(f))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"input {f}: {remote.reason(e)}") from None
    return sizes


def _local_input(location: str, folder: Path) -> tuple[Path, str, int]:
    """(a local path to read, sha256, bytes) of one input; one in an object store is first
    copied into `folder` (hashed on the way), so it is read once and resumes stay exact."""
    from bertscale.data import remote

    if not remote.is_remote(location):
        return Path(location), sha256_file(Path(location)), os.path.getsize(location)
    local = folder / ("input-" + Path(location).name)
    h, n = hashlib.sha256(), 0
    try:
        with remote.open_read(location) as src, open(local, "wb") as dst:
            while block := src.read(remote.READ_BLOCK):
                h.update(block)
                dst.write(block)
                n += len(block)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"input {location}: {remote.reason(e)}") from None
    return local, h.hexdigest(), n


def _deal_units(sizes: list[int], size: int) -> list[list[int]]:
    """Largest files first, each to the least-loaded rank (deterministic)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    loads = [0] * size
    mine: list[list[int]] = [[] for _ in range(size)]
    for i in order:
        r = min(range(size), key=lambda r: (loads[r], r))
        loads[r] += sizes[i]
        mine[r].append(i)
    return mine


# Over ruff's complexity limit on purpose: the prepare pipeline's stages with their resume checks.
def run_prepare(cfg: PrepareConfig, ctx: Context | None = None) -> dict[int, Path]:  # noqa: C901
    """Run both phases; returns {seq_len: manifest path}."""
    cfg.validate()
    ctx = ctx or detect_context()
    out = Path(cfg.out)
    work = out / ".work"
    prefix = f"[rank {ctx.rank}] " if ctx.size > 1 else ""
    mode = cfg.progress if (ctx.rank == 0 or cfg.progress in ("none", "log")) else "log"

    if cfg.vocab is not None:
        read_vocab(cfg.vocab)  # a missing or malformed vocabulary fails here, naming the file
    ctx.wait_for_all_ranks(out, cfg.start_timeout_s)  # before the first MPI message

    def writing(fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn` with a full disk as one line: whatever it was writing (spools, shards through
        worker processes, the manifest) is removed or was never committed."""
        def run() -> Any:
            with stop_on_full_disk(out, "writing into", "what is finished is kept: free some "
                                   "space and run the same command again to continue"):
                return fn()
        return run
    files, sizes = collective(ctx, "reading the inputs", lambda: _inputs(cfg))
    plan = _plan(cfg, files, sizes)
    fp = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    manifests = {L: out / f"seq{L}" / MANIFEST_NAME for L in cfg.seq_lens}
    if all(_manifest_fp(p) == fp for p in manifests.values()):
        if ctx.rank == 0 and cfg.progress != "none":
            print(f"prepare: already complete ({', '.join(str(p) for p in manifests.values())})",
                  file=sys.stderr)
        return manifests

    def setup() -> None:
        if ctx.rank != 0:
            return
        work.mkdir(parents=True, exist_ok=True)
        plan_file = work / "plan.json"
        if plan_file.is_file():
            old = json.loads(plan_file.read_text())
            if old.get("fingerprint") != fp:
                raise UserError(f"{out} holds an unfinished prepare run with other settings or "
                                f"inputs; remove {work} (or choose another --out) to start over")
        else:
            for p in manifests.values():
                if p.is_file():
                    raise UserError(f"{p} exists from a run with other settings; "
                                    f"choose another --out or remove it")
            (out / "vocab.txt").unlink(missing_ok=True)  # never reuse another run's trained vocab
            write_text_atomic(plan_file, json.dumps({"fingerprint": fp, "plan": plan},
                                                    sort_keys=True, indent=1))
        if cfg.train_vocab is not None:
            vocab_file = out / "vocab.txt"
            if not vocab_file.is_file():  # written atomically, so present means complete
                lower = True if cfg.lowercase is None else cfg.lowercase
                print(f"{prefix}prepare: training a {cfg.train_vocab}-token WordPiece vocabulary "
                      f"(two reading passes over {len(files)} files, then the merges)",
                      file=sys.stderr)
                raw = out / "vocab.trained.tmp"
                vocab_progress = Progress(mode, 2 * len(files), prefix=f"{prefix}vocabulary: ")
                train_wordpiece(lambda: _all_paragraphs(files, cfg, work, vocab_progress), raw,
                                cfg.train_vocab, lower)
                if mode != "none":
                    vocab_progress.done("trained")
                _canonical_vocab(raw, vocab_file)

    collective(ctx, "setup", writing(setup))
    if cfg.train_vocab is not None:
        vocab_path = out / "vocab.txt"
        lowercase = True if cfg.lowercase is None else cfg.lowercase
    else:
        assert cfg.vocab is not None
        vocab_path = Path(cfg.vocab)
        lowercase = guess_lowercase(vocab_path) if cfg.lowercase is None else cfg.lowercase
    vocab_path = vocab_path.resolve()
    vocab_size = len(read_vocab(vocab_path))

    # Phase 1
    unit_cfg = dict(objective=cfg.objective, short_seq_prob=cfg.short_seq_prob,
                    seq_lens=list(cfg.seq_lens), dupe_factor=cfg.dupe_factor,
                    eval_fraction=cfg.eval_fraction, seed=cfg.seed, format=cfg.format,
                    text_field=cfg.text_field, split_sentences=cfg.split_sentences,
                    docs_per_chunk=cfg.docs_per_chunk)
    if cfg.id_field is not None:
        unit_cfg["id_field"] = cfg.id_field
    mine = _deal_units(sizes, ctx.size)[ctx.rank]
    done_before = [i for i in mine if (unit_dir(work, i) / "done.json").is_file()]
    if done_before and cfg.progress != "none":
        print(f"{prefix}prepare: resuming, {len(done_before)} of {len(mine)} units already done",
              file=sys.stderr)
    tasks = [UnitTask(i, files[i], str(work), str(vocab_path), lowercase, unit_cfg)
             for i in mine if i not in done_before]
    prog1 = (Progress(mode, len(tasks), prefix + "prepare phase 1 (tokenize, pair): ")
             if mode != "none" else None)
    collective(ctx, "phase 1 (tokenize and pair)",
               writing(lambda: _run_tasks("unit", tasks, cfg.workers, prog1)))

    # Phase 2: every rank reads every unit's summary from the shared folder.
    summaries = [json.loads((unit_dir(work, i) / "done.json").read_text()) for i in range(len(files))]
    nothing = _nothing_to_train_on(summaries, cfg)   # the same on every rank
    if nothing:
        ctx.allgather(None)  # every rank has read the summaries: the work folder may go
        if ctx.rank == 0 and not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
            if cfg.train_vocab is not None:
                (out / "vocab.txt").unlink(missing_ok=True)  # trained on nothing
            with contextlib.suppress(OSError):
                out.rmdir()  # only if we left it empty
        raise UserError(nothing)
    shard_tasks = plan_shards(summaries, cfg, work)
    my_shards = shard_tasks[ctx.rank::ctx.size]
    prog2 = (Progress(mode, len(my_shards), prefix + "prepare phase 2 (shards): ")
             if mode != "none" else None)
    collective(ctx, "phase 2 (write shards)",
               writing(lambda: _run_tasks("shard", my_shards, cfg.workers, prog2)))

    def finish() -> None:
        if ctx.rank != 0:
            return
        tok_hash = vocab_hash(vocab_path, lowercase)
        inputs = [dict(path=s["input"], bytes=s["input_bytes"], sha256=s["input_sha256"])
                  for s in summaries]
        for L in cfg.seq_lens:
            d = out / f"seq{L}"
            d.mkdir(parents=True, exist_ok=True)
            copy_atomic(vocab_path, d / "vocab.txt")
            shards: dict[str, list[dict[str, Any]]] = {}
            stats: dict[str, dict[str, int]] = {}
            for split in SPLITS:
                shards[split] = [json.loads(t.marker.read_text()) for t in shard_tasks
                                 if t.seq_len == L and t.split == split]
                key = _spool_key(L, split)
                agg: dict[str, int] = {}
                for s in summaries:
                    for k, v in s["stats"][key].items():
                        agg[k] = agg.get(k, 0) + v
                stats[split] = agg
            stats["corpus"] = {k: sum(s[k] for s in summaries)
                               for k in ("documents", "sentences", "text_bytes")}
            settings = dict(objective=cfg.objective, seq_lens=list(cfg.seq_lens),
                            short_seq_prob=cfg.short_seq_prob, dupe_factor=cfg.dupe_factor,
                            eval_fraction=cfg.eval_fraction, docs_per_chunk=cfg.docs_per_chunk,
                            split_sentences=cfg.split_sentences, format=cfg.format,
                            text_field=cfg.text_field, inputs=inputs, prepare_fingerprint=fp)
            if cfg.id_field is not None:
                settings["id_field"] = cfg.id_field
            data = manifest_dict(seq_len=L, pair_objective=cfg.objective, tokenizer_hash=tok_hash,
                                 vocab_file="vocab.txt", lowercase=lowercase, seed=cfg.seed,
                                 vocab_size=vocab_size, token_dtype=str(token_dtype(vocab_size).name),
                                 samples_per_shard=cfg.samples_per_shard, shards=shards,
                                 settings=settings, stats=stats)
            write_manifest(manifests[L], data)
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        if cfg.progress != "none":
            for L in cfg.seq_lens:
                n = {sp: sum(x["samples"] for x in json.loads(manifests[L].read_text())["shards"][sp])
                     for sp in SPLITS}
                print(f"prepare: seq {L}: {n['train']:,} train + {n['eval']:,} eval samples -> "
                      f"{manifests[L]}", file=sys.stderr)

    collective(ctx, "writing the manifests", writing(finish))
    return manifests


def _nothing_to_train_on(summaries: list[dict[str, Any]], cfg: PrepareConfig) -> str | None:
    """Why the inputs give no training sample at some sequence length (an empty corpus is bad
    input, not a dataset of 0 samples that fails later in training), or None."""
    text = sum(s["text_bytes"] for s in summaries)
    docs = sum(s["documents"] for s in summaries)
    shown = ", ".join(s["input"] for s in summaries[:3]) + (", …" if len(summaries) > 3 else "")
    where = f"{len(summaries)} input file(s) ({shown})"
    if not text:
        return f"{where}: no text (empty or blank files); nothing to prepare"
    for L in cfg.seq_lens:
        train = sum(s["stats"][_spool_key(L, "train")]["samples"] for s in summaries)
        if not train:
            return (f"{where}: {text:,} bytes of text in {docs:,} document(s) gave no training "
                    f"sample at sequence length {L} (eval fraction {cfg.eval_fraction:g}); give "
                    f"more text")
    return None


def _manifest_fp(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["settings"]["prepare_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _canonical_vocab(src: Path, dst: Path) -> None:
    """Special tokens first (ids 0-4, as trained), then the rest sorted.

    `tokenizers`' WordPiece trainer returns the same token set on every run but not the same
    order (hash-map iteration), so ids — and with them the shards — would differ between two
    runs on the same inputs. WordPiece matching depends on the set only, so sorting is safe."""
    tokens = [t for t in src.read_text(encoding="utf-8").split("\n") if t]
    special = [t for t in tokens if t in SPECIAL_TOKENS]
    rest = sorted(t for t in tokens if t not in SPECIAL_TOKENS)
    write_text_atomic(dst, "".join(t + "\n" for t in special + rest))
    src.unlink()


def _inputs(cfg: PrepareConfig) -> tuple[list[str], list[int]]:
    """The input files (local paths or URLs, sorted) and their sizes; pyarrow is checked here
    when a Parquet or Arrow input is named, so that its absence is one line before any work."""
    from bertscale.data import remote, tables

    files = expand_inputs(cfg.inputs)
    if cfg.format in ("parquet", "arrow") or any(
            f.endswith((".parquet", ".arrow")) for f in files):
        tables.pyarrow()
    # A missing column is found now, in the first file that lacks it, not in the middle of the
    # run (a local file's schema is its footer; one in a store is checked when it is read).
    columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field is not None else [])
    hint = "; set --text-column" + (" / --doc-id-column" if cfg.id_field is not None else "")
    for f in files:
        if not remote.is_remote(f) and cfg.format in ("auto", "parquet", "arrow") \
                and tables.file_kind(f) is not None:
            tables.check_columns(f, columns, hint)
    return files, _input_sizes(files)


def _all_paragraphs(files: list[str], cfg: PrepareConfig, work: Path,
                    progress: Progress | None = None) -> Iterator[str]:
    for f in files:
        local, _, size = _local_input(f, work)
        for doc in read_documents(local, cfg.format, cfg.text_field, cfg.id_field):
            yield from doc
        if local != Path(f):
            local.unlink()
        if progress is not None:
            progress.update(text_bytes=size, units=1)


# ---------------------------------------------------------------------------------------------
# CLI

def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare", help="raw text -> WebDataset shards + manifest (NSP/SOP/MLM instances)",
        description="Turn raw text (BERT-format plain text, WikiExtractor output or JSON lines, "
                    "gzip/bzip2/xz ok; Parquet, Arrow files and datasets.save_to_disk folders) "
                    "into tar shards of training instances, one folder per sequence length. "
                    "Runs in parallel over --workers processes, and over ranks under mpirun/srun.")
    p.add_argument("inputs", nargs="+",
                   help="files, folders or glob patterns, local or in an object store "
                        "(s3://bucket/prefix/*.parquet, gs://…, az://…)")
    p.add_argument("--out", required=True,
                   help="output folder, or an object-store prefix (s3://bucket/prefix, gs://…, "
                        "az://…): shards are written to --stage, then uploaded")
    p.add_argument("--stage", type=Path,
                   help="with --out in an object store: the local (or shared, under MPI) folder "
                        "the shards are written to first (default: ./bertscale-stage/ followed "
                        "by the URL's scheme, bucket and prefix: one folder per output)")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--vocab", type=Path,
                   help="WordPiece vocab.txt to tokenize with, or a Hugging Face BERT folder "
                        "(its vocab.txt, and its casing from tokenizer_config.json): the "
                        "tokenizer of the checkpoint train.init_from will continue")
    v.add_argument("--train-vocab", type=int, metavar="SIZE",
                   help="train a WordPiece vocabulary of SIZE tokens from the inputs first")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                   help="uncased tokenization (default: guessed from the vocab)")
    c.add_argument("--cased", dest="lowercase", action="store_false",
                   help="cased tokenization (keep capitals)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[128], dest="seq_lens",
                   help="sequence lengths, e.g. 128 512 (default: 128)")
    p.add_argument("--objective", choices=OBJECTIVES, default="nsp",
                   help="nsp: sentence pairs with the paper's next-sentence label (50%% random "
                        "B); sop: ALBERT's sentence-order prediction; mlm: masked LM only, "
                        "one segment per sample (default: nsp)")
    p.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="share of samples cut to a random shorter length, so that the model "
                        "also sees short inputs, as Google's create_pretraining_data "
                        "(default: 0.1)")
    p.add_argument("--dupe-factor", type=int, default=1,
                   help="times each document is turned into samples, with different pairs "
                        "and cuts each time (default: 1, because masking is dynamic here: the "
                        "loader draws new masks every epoch; Google's create_pretraining_data "
                        "used 10 and NVIDIA's scripts 5, with static masks)")
    p.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="samples per tar shard (default: 10000)")
    p.add_argument("--eval-fraction", type=float, default=0.01,
                   help="share of documents held out for the eval split (default: 0.01)")
    p.add_argument("--seed", type=int, default=12345,
                   help="seeds the pairing, the cuts and the eval split; the same inputs and "
                        "seed give the same shards (default: 12345)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input format: bert (one sentence or paragraph per line, a blank "
                        "line between documents), wikiextractor (<doc> blocks), jsonl, parquet, "
                        "arrow (a row is a document); auto: from each file's first bytes or "
                        "first non-empty line (default: auto)")
    p.add_argument("--text-column", "--text-field", dest="text_field", default="text",
                   help="JSON lines, Parquet, Arrow: the field or column with the text; its "
                        "lines are the document's paragraphs (default: text)")
    p.add_argument("--doc-id-column", dest="id_field", metavar="COLUMN",
                   help="JSON lines, Parquet, Arrow: consecutive rows with the same value here "
                        "are one document (a corpus stored a paragraph or sentence per row); "
                        "default: every row is one document")
    p.add_argument("--no-split-sentences", dest="split_sentences", action="store_false",
                   help="inputs are one sentence per line already")
    p.add_argument("--docs-per-chunk", type=int, default=1000,
                   help="documents per unit of work (the unit resumed and shared out among "
                        "workers and ranks; default: 1000)")
    p.add_argument("--workers", type=int, default=1,
                   help="local processes (per MPI rank; default: 1)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep OUT/.work (spools and the plan) after success (default: removed)")
    p.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S, metavar="SECONDS",
                   help="under MPI: how long the ranks wait for each other at start, through a "
                        "file each writes in OUT, which must be on a filesystem all nodes share "
                        f"(default: {START_TIMEOUT_S:.0f})")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="a redrawn line with ETA on a terminal (bar), a line every 10 s (log), "
                        "or nothing; auto: bar on a terminal, else log (default: auto)")
    p.set_defaults(func=handle)
    return p


def handle(args: argparse.Namespace) -> int:
    from bertscale.data import remote

    url = args.out if remote.is_remote(args.out) else None
    if url is not None and remote.scheme(url) in ("pipe", "http", "https"):
        raise UserError(f"--out {url}: prepare uploads to s3://, gs:// or az:// prefixes only")
    out = (args.stage or default_stage(url)) if url else Path(args.out)
    if url is not None:  # a missing store package or bucket fails now, not after the prepare
        remote.require_bucket(url, "--out")
    vocab, lowercase = _vocab_argument(args.vocab, args.lowercase)
    cfg = PrepareConfig(inputs=args.inputs, out=out, vocab=vocab,
                        lowercase=lowercase, train_vocab=args.train_vocab,
                        seq_lens=args.seq_lens, objective=args.objective,
                        short_seq_prob=args.short_seq_prob, dupe_factor=args.dupe_factor,
                        samples_per_shard=args.samples_per_shard, eval_fraction=args.eval_fraction,
                        seed=args.seed, format=args.format, text_field=args.text_field,
                        id_field=args.id_field,
                        split_sentences=args.split_sentences, docs_per_chunk=args.docs_per_chunk,
                        workers=args.workers, keep_work=args.keep_work, progress=args.progress,
                        start_timeout_s=args.start_timeout)
    ctx = detect_context()
    manifests = run_prepare(cfg, ctx)
    if url is not None and ctx.rank == 0:
        for L, manifest in manifests.items():
            upload_prepared(manifest, remote.join(url, f"seq{L}"), cfg.progress != "none")
    return 0


def _vocab_argument(vocab: Path | None, lowercase: bool | None) -> tuple[Path | None, bool | None]:
    """--vocab as given, or a Hugging Face folder's vocab.txt and casing (--lowercase / --cased
    still win)."""
    if vocab is None or not vocab.is_dir():
        return vocab, lowercase
    from bertscale.hf import tokenizer_of_folder
    path, folder_lowercase = tokenizer_of_folder(vocab)
    return path, folder_lowercase if lowercase is None else lowercase


def default_stage(url: str) -> Path:
    """Where `--out URL` stages its shards without --stage: a folder of its own per output
    (./bertscale-stage/s3/bucket/prefix), so that preparing two outputs from one working folder
    neither mixes them nor refuses the second as "a run with other settings"."""
    scheme, rest = url.split("://", 1)
    parts = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) for p in rest.split("/") if p]
    parts = ["_" if p in (".", "..") else p for p in parts]
    return Path("bertscale-stage", scheme.lower(), *parts)


UPLOAD_RECORD = ".bertscale-upload.json"
"""Beside the shards in a store prefix while an upload is unfinished: the manifest being
uploaded. It vouches for the objects already there (a re-run sends only what is missing) and
is deleted once the manifest itself is in place."""


def upload_prepared(manifest: Path, url: str, verbose: bool = True) -> str:
    """Upload one prepared folder (shards, vocabulary, then the manifest) to the store prefix
    `url`. Shard names in the manifest stay relative to it, so they resolve beside the
    manifest's URL and the prefix can be copied or moved whole (``aws s3 sync``). Returns the
    manifest's URL.

    What is there already counts only when a manifest of the same data vouches for it: the
    prefix's complete manifest, or the record of an unfinished upload (`UPLOAD_RECORD`) of the
    same shards, whose objects of the right size were uploaded whole (object stores publish an
    object only complete), so a re-run after a failed upload sends only the rest. A prefix that
    holds ANOTHER prepare's manifest or unfinished upload is refused: its objects have the
    same names and, with one --samples-per-shard, often the same sizes, and mixing them under
    one manifest gives shards whose sha256 training refuses. Objects no manifest vouches for are
    sent again. Each staged file is checked against its manifest sha256 before it is sent.
    Limit: two uploads into one prefix at the same moment are not detected."""
    from bertscale.data import remote
    from bertscale.data.shards import fingerprint_of, sha256_file

    data = json.loads(manifest.read_text(encoding="utf-8"))
    ours = fingerprint_of(data)
    sha = {row["name"]: row["sha256"] for rows in data["shards"].values() for row in rows}
    names = [*sha, data["vocab_file"]]
    fs = remote.filesystem(url)
    vouched = False
    for name, what in ((MANIFEST_NAME, "the manifest of"), (UPLOAD_RECORD, "an unfinished upload of")):
        there = _remote_json(fs, remote.join(url, name))
        if there is None:
            continue
        theirs = fingerprint_of(there) if isinstance(there, dict) else "not a manifest"
        if theirs != ours:
            raise UserError(f"--out {url}: holds {what} other shards (manifest fingerprint "
                            f"{theirs[:12]}, these {ours[:12]}); uploading would mix two data "
                            f"sets under one manifest. Use an empty prefix, or delete "
                            f"{url}/ first")
        vouched = True
    if not vouched:
        _put(remote, manifest, remote.join(url, UPLOAD_RECORD))
    sent = 0
    for name in names:
        local, target = manifest.parent / name, remote.join(url, name)
        try:
            if vouched and fs.exists(target) and remote.object_size(target) == local.stat().st_size:
                continue
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"reading {target}: {remote.reason(e)}") from None
        if name in sha and sha256_file(local) != sha[name]:
            raise UserError(f"{local}: its sha256 is not the one {manifest} lists; the staged "
                            f"shards changed after prepare wrote them (prepare again)")
        _put(remote, local, target)
        sent += 1
    target = remote.join(url, MANIFEST_NAME)
    _put(remote, manifest, target)  # last: a reader never sees a manifest before its shards
    try:
        fs.rm_file(remote.join(url, UPLOAD_RECORD))
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001
        raise UserError(f"deleting {remote.join(url, UPLOAD_RECORD)}: {remote.reason(e)}") from None
    if verbose:
        print(f"prepare: uploaded {sent} of {len(names)} files (the rest were there, checked "
              f"against the manifest) and the manifest -> {target}", file=sys.stderr)
    return target


def _remote_json(fs: Any, url: str) -> Any:
    """A small JSON object of a store, None when there is none."""
    from bertscale.data import remote
    try:
        if not fs.exists(url):
            return None
        return json.loads(remote.read_bytes(url))
    except ValueError:
        return "not JSON"
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"reading {url}: {remote.reason(e)}") from None


def _put(remote: Any, local: Path, target: str) -> None:
    try:
        remote.upload(local, target)
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"uploading {local} to {target}: {remote.reason(e)}") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.data.prepare ...`: the same command, without importing the other subcommands."""
    from bertscale.commands import run_subcommand
    return run_subcommand("prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
