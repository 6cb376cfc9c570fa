"""`run_prepare`: raw text -> tar shards + manifest, one folder per sequence length.

How the work is split, and why the output does not depend on it: the unit of work is one input
file (sorted by path; its index is its unit id). Phase 1 (units.py) turns each unit into spools,
seeded by (seed, unit, chunk) only; the unit's folder is renamed into place when complete (its
commit). Phase 2 (shard_tasks.py) concatenates the spools in unit order and cuts shards of
exactly `samples_per_shard` samples, dealt round-robin to the processes. Rank 0 then writes each
manifest (temp + rename) and removes the spools. Hence the shards are byte-identical for any
number of workers or MPI ranks, and a re-run after a crash redoes only what was not committed.
A re-run with other settings into the same folder is refused (the plan's fingerprint is
recorded). Limits: docs/data.md ("At cluster scale").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from bertscale.data.prepare.config import PrepareConfig
from bertscale.data.prepare.inputs import list_inputs
from bertscale.data.prepare.progress import Progress
from bertscale.data.prepare.ranks import Context, collective, detect_context
from bertscale.data.prepare.shard_tasks import ShardTask, plan_shards
from bertscale.data.prepare.units import UnitTask, spool_key, unit_dir
from bertscale.data.prepare.vocab import train_vocabulary
from bertscale.data.prepare.workers import run_tasks
from bertscale.data.shards import (MANIFEST_NAME, SPLITS, manifest_dict, sha256_file, token_dtype,
                                   write_manifest)
from bertscale.errors import UserError
from bertscale.files import copy_atomic, stop_on_full_disk, write_text_atomic
from bertscale.tokenizer import guess_lowercase, read_vocab, vocab_hash

R = TypeVar("R")


def run_prepare(cfg: PrepareConfig, ctx: Context | None = None) -> dict[int, Path]:
    """Run both phases; returns {seq_len: manifest path}."""
    cfg.validate()
    ctx = ctx or detect_context()
    if cfg.vocab is not None:
        read_vocab(cfg.vocab)  # a missing or malformed vocabulary fails here, naming the file
    ctx.wait_for_all_ranks(Path(cfg.out), cfg.start_timeout_s)  # before the first MPI message
    files, sizes = collective(ctx, "reading the inputs", lambda: list_inputs(cfg))
    job = PrepareJob(cfg, ctx, files, sizes)
    if job.complete():
        return job.manifests
    collective(ctx, "setup", job.writing(job.setup))
    vocab = job.vocabulary()
    collective(ctx, "phase 1 (tokenize and pair)", job.writing(lambda: job.phase1(vocab)))
    summaries = job.summaries()
    shards = plan_shards(summaries, cfg, job.work)
    collective(ctx, "phase 2 (write shards)", job.writing(lambda: job.phase2(shards)))
    collective(ctx, "writing the manifests",
               job.writing(lambda: job.finish(vocab, summaries, shards)))
    return job.manifests


@dataclass
class Vocabulary:
    """The vocabulary the shards are tokenized with, as every rank resolves it after setup."""

    path: Path
    lowercase: bool
    size: int


class PrepareJob:
    """One prepare run on this rank: its plan (whose fingerprint a re-run must match), and one
    method per stage of `run_prepare`."""

    def __init__(self, cfg: PrepareConfig, ctx: Context, files: list[str], sizes: list[int]):
        self.cfg, self.ctx, self.files, self.sizes = cfg, ctx, files, sizes
        self.out = Path(cfg.out)
        self.work = self.out / ".work"
        self.prefix = f"[rank {ctx.rank}] " if ctx.size > 1 else ""
        self.mode = cfg.progress if (ctx.rank == 0 or cfg.progress in ("none", "log")) else "log"
        self.plan = _plan(cfg, files, sizes)
        self.fingerprint = hashlib.sha256(json.dumps(self.plan, sort_keys=True).encode()).hexdigest()
        self.manifests = {L: self.out / f"seq{L}" / MANIFEST_NAME for L in cfg.seq_lens}

    def writing(self, fn: Callable[[], R]) -> Callable[[], R]:
        """`fn` with a full disk as one line: whatever it was writing (spools, shards through
        worker processes, the manifest) is removed or was never committed."""
        def run() -> R:
            with stop_on_full_disk(self.out, "writing into", "what is finished is kept: free "
                                   "some space and run the same command again to continue"):
                return fn()
        return run

    def progress(self, total: int, what: str) -> Progress | None:
        return Progress(self.mode, total, self.prefix + what) if self.mode != "none" else None

    def complete(self) -> bool:
        """Whether every manifest of this plan is there already (a re-run of a finished job)."""
        if not all(_manifest_fp(p) == self.fingerprint for p in self.manifests.values()):
            return False
        if self.ctx.rank == 0 and self.cfg.progress != "none":
            print(f"prepare: already complete "
                  f"({', '.join(str(p) for p in self.manifests.values())})", file=sys.stderr)
        return True

    def setup(self) -> None:
        """Rank 0: record the plan (or check it against an unfinished run's), and train the
        vocabulary when asked to."""
        if self.ctx.rank != 0:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        plan_file = self.work / "plan.json"
        if plan_file.is_file():
            old = json.loads(plan_file.read_text())
            if old.get("fingerprint") != self.fingerprint:
                raise UserError(f"{self.out} holds an unfinished prepare run with other settings "
                                f"or inputs; remove {self.work} (or choose another --out) to "
                                f"start over")
        else:
            for p in self.manifests.values():
                if p.is_file():
                    raise UserError(f"{p} exists from a run with other settings; "
                                    f"choose another --out or remove it")
            (self.out / "vocab.txt").unlink(missing_ok=True)  # never reuse another run's trained vocab
            write_text_atomic(plan_file, json.dumps({"fingerprint": self.fingerprint,
                                                     "plan": self.plan}, sort_keys=True, indent=1))
        if self.cfg.train_vocab is not None:
            train_vocabulary(self.files, self.cfg, self.work, self.mode, self.prefix)

    def vocabulary(self) -> Vocabulary:
        cfg = self.cfg
        if cfg.train_vocab is not None:
            path = self.out / "vocab.txt"
            lowercase = True if cfg.lowercase is None else cfg.lowercase
        else:
            assert cfg.vocab is not None
            path = Path(cfg.vocab)
            lowercase = guess_lowercase(path) if cfg.lowercase is None else cfg.lowercase
        path = path.resolve()
        return Vocabulary(path, lowercase, len(read_vocab(path)))

    def phase1(self, vocab: Vocabulary) -> None:
        """This rank's units (largest files first, dealt greedily over the ranks) -> spools."""
        cfg = self.cfg
        unit_cfg: dict[str, Any] = dict(
            objective=cfg.objective, short_seq_prob=cfg.short_seq_prob,
            seq_lens=list(cfg.seq_lens), dupe_factor=cfg.dupe_factor,
            eval_fraction=cfg.eval_fraction, seed=cfg.seed, format=cfg.format,
            text_field=cfg.text_field, split_sentences=cfg.split_sentences,
            docs_per_chunk=cfg.docs_per_chunk)
        if cfg.id_field is not None:
            unit_cfg["id_field"] = cfg.id_field
        mine = _deal_units(self.sizes, self.ctx.size)[self.ctx.rank]
        done_before = [i for i in mine if (unit_dir(self.work, i) / "done.json").is_file()]
        if done_before and cfg.progress != "none":
            print(f"{self.prefix}prepare: resuming, {len(done_before)} of {len(mine)} units "
                  f"already done", file=sys.stderr)
        tasks = [UnitTask(i, self.files[i], str(self.work), str(vocab.path), vocab.lowercase,
                          unit_cfg) for i in mine if i not in done_before]
        run_tasks(tasks, cfg.workers,
                  self.progress(len(tasks), "prepare phase 1 (tokenize, pair): "))

    def summaries(self) -> list[dict[str, Any]]:
        """Every unit's summary, read from the shared folder by every rank; an input that gives
        nothing to train on stops every rank alike, leaving nothing behind."""
        summaries = [json.loads((unit_dir(self.work, i) / "done.json").read_text())
                     for i in range(len(self.files))]
        nothing = _nothing_to_train_on(summaries, self.cfg)  # the same on every rank
        if nothing:
            self.ctx.allgather(None)  # every rank has read the summaries: the work folder may go
            if self.ctx.rank == 0 and not self.cfg.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)
                if self.cfg.train_vocab is not None:
                    (self.out / "vocab.txt").unlink(missing_ok=True)  # trained on nothing
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only if we left it empty
            raise UserError(nothing)
        return summaries

    def phase2(self, shards: list[ShardTask]) -> None:
        """This rank's shards (round-robin) from the spools."""
        mine = shards[self.ctx.rank::self.ctx.size]
        run_tasks(mine, self.cfg.workers, self.progress(len(mine), "prepare phase 2 (shards): "))

    def finish(self, vocab: Vocabulary, summaries: list[dict[str, Any]],
               shards: list[ShardTask]) -> None:
        """Rank 0: each sequence length's manifest (with the vocabulary beside it), then the
        spools go."""
        if self.ctx.rank != 0:
            return
        for L in self.cfg.seq_lens:
            folder = self.out / f"seq{L}"
            folder.mkdir(parents=True, exist_ok=True)
            copy_atomic(vocab.path, folder / "vocab.txt")
            write_manifest(self.manifests[L], self._manifest(L, vocab, summaries, shards))
        if not self.cfg.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        if self.cfg.progress != "none":
            for L in self.cfg.seq_lens:
                rows = json.loads(self.manifests[L].read_text())["shards"]
                n = {sp: sum(x["samples"] for x in rows[sp]) for sp in SPLITS}
                print(f"prepare: seq {L}: {n['train']:,} train + {n['eval']:,} eval samples -> "
                      f"{self.manifests[L]}", file=sys.stderr)

    def _manifest(self, seq_len: int, vocab: Vocabulary, summaries: list[dict[str, Any]],
                  shard_tasks: list[ShardTask]) -> dict[str, Any]:
        cfg = self.cfg
        shards: dict[str, list[dict[str, Any]]] = {}
        stats: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            shards[split] = [json.loads(t.marker.read_text()) for t in shard_tasks
                             if t.seq_len == seq_len and t.split == split]
            agg: dict[str, int] = {}
            for s in summaries:
                for k, v in s["stats"][spool_key(seq_len, split)].items():
                    agg[k] = agg.get(k, 0) + v
            stats[split] = agg
        stats["corpus"] = {k: sum(s[k] for s in summaries)
                           for k in ("documents", "sentences", "text_bytes")}
        inputs = [dict(path=s["input"], bytes=s["input_bytes"], sha256=s["input_sha256"])
                  for s in summaries]
        settings: dict[str, Any] = dict(
            objective=cfg.objective, seq_lens=list(cfg.seq_lens),
            short_seq_prob=cfg.short_seq_prob, dupe_factor=cfg.dupe_factor,
            eval_fraction=cfg.eval_fraction, docs_per_chunk=cfg.docs_per_chunk,
            split_sentences=cfg.split_sentences, format=cfg.format, text_field=cfg.text_field,
            inputs=inputs, prepare_fingerprint=self.fingerprint)
        if cfg.id_field is not None:
            settings["id_field"] = cfg.id_field
        return manifest_dict(seq_len=seq_len, pair_objective=cfg.objective,
                             tokenizer_hash=vocab_hash(vocab.path, vocab.lowercase),
                             vocab_file="vocab.txt", lowercase=vocab.lowercase, seed=cfg.seed,
                             vocab_size=vocab.size, token_dtype=str(token_dtype(vocab.size).name),
                             samples_per_shard=cfg.samples_per_shard, shards=shards,
                             settings=settings, stats=stats)


def _plan(cfg: PrepareConfig, files: list[str], sizes: list[int]) -> dict[str, Any]:
    """What decides the output: the settings (not where it goes or how many workers) and the
    inputs with their sizes."""
    c = asdict(cfg)
    for k in ("inputs", "out", "vocab", "workers", "keep_work", "progress"):
        c.pop(k)
    if c["id_field"] is None:
        c.pop("id_field")  # so that runs without it keep the fingerprint they always had
    c["vocab_sha256"] = sha256_file(cfg.vocab) if cfg.vocab is not None else None
    c["inputs"] = [[f, n] for f, n in zip(files, sizes)]
    return c


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
        train = sum(s["stats"][spool_key(L, "train")]["samples"] for s in summaries)
        if not train:
            return (f"{where}: {text:,} bytes of text in {docs:,} document(s) gave no training "
                    f"sample at sequence length {L} (eval fraction {cfg.eval_fraction:g}); give "
                    f"more text")
    return None


def _manifest_fp(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["settings"]["prepare_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
