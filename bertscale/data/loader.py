"""Masked pretraining batches from shards, at an exact, world-size-independent position.

The global sample stream (DESIGN guarantee 5)
---------------------------------------------
The stream is a function of (manifest, seed) only. For the train split, global position ``p``
lies in epoch ``e = p // N`` (N samples); within the epoch the shards are put in a seeded order
(new each epoch), their samples are concatenated, and the concatenation is shuffled within
consecutive windows of ``shuffle_window`` samples (a seeded permutation per window). So position
``p`` maps to one (shard, sample offset) by arithmetic, and any process can read any position by
random access: shards are opened and indexed once (each member's offset, from walking the tar
headers), and reading a sample is one positioned read (pread) plus a CRC check.

Global batch ``b`` is positions ``[c + b·G, c + (b+1)·G)`` where ``c = consumed_samples``; rank
``r`` of ``W`` takes the contiguous slice ``[r·G/W, (r+1)·G/W)`` of it and yields it as ``G/(m·W)``
micro-batches of ``m``. Masks are drawn from (seed, position) (see `masking`). Hence resuming
with any number of ranks or workers continues the same stream with nothing repeated or skipped,
and costs nothing but opening the shards the next batch touches (no replay).

DataLoader workers (``num_workers > 0``) take this rank's micro-batches round-robin (worker ``w``
builds micro-batches ``w, w + n, …``); torch's DataLoader returns them in that same order, so
the output does not depend on ``num_workers`` either.

Train is infinite (epochs wrap). Eval is one pass over the eval split in stored order: it has
``ceil(N_eval / G)`` global batches on every rank, the positions past the end filled with void
samples ([CLS] [SEP], attention on those two tokens, every label -100, sample_id -1), so no
rank waits for another (guarantee 8) and losses/metrics ignore the filler.

Shards and bad data (guarantee 7)
---------------------------------
Shard locations come from the manifest: local paths, object stores (``s3://``, ``gs://``,
``az://``), ``http(s)://`` and ``pipe:…`` (`bertscale.data.remote`); remote shards are fetched
whole, once per node, into a node-level cache, checked against their sha256 on the way, and the
next shuffle window's shards are prefetched while the current one trains
(`bertscale.data.cache`). Local shards are
checked against the manifest's sha256 when the loader is built (``verify_sha256``, default on;
it reads every shard of the split once, so turn it off for very large local datasets that are
known good). A damaged sample (truncated shard, corrupt header or payload: every sample carries
a CRC-32) is reported with the shard's name, the sample's offset and its global position. With
``bad_sample_policy="raise"`` (default) that is an error; with ``"skip"`` the sample is replaced
by a void one (sample_id -2; the positions of every other sample stay the same), logged and
counted, and more than ``max_bad_samples`` (per process) is an error.

Cost of a resume, and limits: opening a shard walks its tar headers once (about one read of the
shard; the index stays cached), so a resume reads the few shards of the current shuffle window
(``shuffle_window``, default 4 shards' worth of samples) and nothing before it — no replay.
The window bounds the randomness: samples are shuffled within it, shards across the epoch, and
`prepare` already shuffled within chunks of documents. Reads are random access (pread), so the
shards of a window should fit the page cache (or the disk take random reads). Shards are not
memory-mapped: a shard cut short under a running job (`cp` or `rsync --inplace` over the data)
would kill every rank with SIGBUS; a short read is reported like any damaged sample instead.
``verify_sha256`` on a loader reads every shard of its split; the trainer instead has each
rank check its share (``verify_shards``) and sets it off.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bertscale.data.cache import FetchSettings, ShardFetcher
from bertscale.data.masking import Masker, MaskingConfig
from bertscale.data.order import GlobalOrder
from bertscale.data.remote import is_remote as _is_remote
from bertscale.data.shards import (Manifest, SampleError, ShardFile, TarIndex, count_members,
                                   decode_sample, index_tar, read_manifest, sha256_file)
from bertscale.errors import UserError
from bertscale.tokenizer import read_vocab

__all__ = ["LoaderConfig", "MaskingConfig", "PretrainLoader", "open_loader"]

log = logging.getLogger("bertscale.data")

EVAL_ID_BIT = 1 << 62
PAD_SAMPLE_ID = -1
BAD_SAMPLE_ID = -2


@dataclass
class _Shard:
    name: str
    location: str
    file: ShardFile
    index: TarIndex
    width: int


class ShardStore:
    """Open shards (files + indexes), least recently used closed first."""

    def __init__(self, manifest: Manifest, split: str, fetcher: ShardFetcher | None,
                 max_open: int = 64):
        self.manifest = manifest
        self.split = split
        self.infos = manifest.shards[split]
        self.fetcher = fetcher
        self.max_open = max_open
        self.open: OrderedDict[int, _Shard] = OrderedDict()
        self.width = 2 if manifest.token_dtype == "uint16" else 4

    def local_path(self, i: int) -> Path:
        location = self.manifest.shard_location(self.split, i)
        if not _is_remote(location):
            return Path(location)
        assert self.fetcher is not None
        return self.fetcher.path(i)

    def get(self, i: int) -> _Shard:
        shard = self.open.get(i)
        if shard is not None:
            self.open.move_to_end(i)
            return shard
        info = self.infos[i]
        path = self.local_path(i)
        try:
            f = ShardFile(path)
        except FileNotFoundError:
            if self.fetcher is None:
                raise UserError(f"shard {info.name}: file {path} not found") from None
            f = ShardFile(self.local_path(i))  # evicted between its fetch and here: again
        index = index_tar(f, self.split, i, info.samples)
        if f.size != info.bytes:
            log.warning("shard %s (%s) is %d bytes, the manifest says %d (truncated or replaced)",
                        info.name, path, f.size, info.bytes)
        shard = _Shard(info.name, str(path), f, index, self.width)
        self.open[i] = shard
        if len(self.open) > self.max_open:
            _, old = self.open.popitem(last=False)
            old.file.close()
        return shard

    def retain(self, keep: set[int]) -> None:
        """Close shards outside `keep` (an evicted file's disk space is freed only when no
        process holds it open)."""
        for i in [i for i in self.open if i not in keep]:
            self.open.pop(i).file.close()

    def close(self) -> None:
        for s in self.open.values():
            s.file.close()
        self.open.clear()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with spawn get a copy without the parent's open files.
        state = dict(self.__dict__)
        state["open"] = OrderedDict()
        return state


def read_sample(shard: _Shard, offset: int) -> tuple[np.ndarray, int, int] | str:
    """(ids, a_len, label) or the reason the sample cannot be read."""
    start = int(shard.index.starts[offset])
    if start < 0:
        return shard.index.problems.get(offset, "missing")
    try:
        size = int(shard.index.sizes[offset])
        return decode_sample(shard.file.read(start, size), 0, size, shard.width)
    except SampleError as e:
        return str(e)


def verify_shards(m: Manifest, split: str, rank: int = 0, world_size: int = 1, *,
                  sha256: bool = True) -> list[str]:
    """The local shards of `split` against the manifest, one message per bad shard: present,
    of the manifest's size, holding the manifest's number of samples (tar headers only), and,
    with `sha256`, of the manifest's hash (a full read). Shard i is checked by rank
    i mod world_size only, so a job reads the corpus once between all its ranks, not once per
    rank; the trainer gathers every rank's findings so that all ranks stop with the same
    message. Remote shards are checked when they are fetched."""
    problems = []
    for i, info in enumerate(m.shards[split]):
        if i % world_size != rank:
            continue
        location = m.shard_location(split, i)
        if _is_remote(location):
            continue
        path = Path(location)
        if not path.is_file():
            problems.append(f"shard {info.name}: file {path} not found")
            continue
        size = path.stat().st_size
        if size != info.bytes:
            problems.append(f"shard {info.name} ({path}) is {size} bytes, the manifest {m.path} "
                            f"says {info.bytes}: truncated or replaced")
            continue
        members = count_members(path)
        if members != info.samples:
            problems.append(f"{m.path}: shard {info.name} is listed with {info.samples} samples, "
                            f"but {path} holds {members}: the manifest does not describe these "
                            f"shards (edited, or from another prepare run)")
            continue
        if not sha256:
            continue
        digest = sha256_file(path)
        if digest != info.sha256:
            problems.append(f"shard {info.name} ({path}): sha256 {digest[:16]}… differs from the "
                            f"manifest's {info.sha256[:16]}…: the file is corrupt or from another "
                            f"prepare run")
    return problems


@dataclass(frozen=True)
class LoaderConfig:
    """Which samples a loader yields and how (module docstring); `validate` checks it against
    the manifest before anything is opened."""

    split: str
    global_batch_size: int
    micro_batch_size: int
    seed: int
    """Orders the samples and draws the masks."""
    rank: int = 0
    world_size: int = 1
    consumed_samples: int = 0
    """The global position to start from (a resume sets it through `load_state_dict`)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    num_workers: int = 0
    """DataLoader worker processes (0: batches are made in this process)."""
    bad_sample_policy: str = "raise"
    """raise: a damaged sample is an error; skip: replaced by a void sample, logged, counted."""
    max_bad_samples: int = 100
    """With skip: more damaged samples than this (per process) is an error."""
    verify_sha256: bool = True
    """Check every shard of the split against the manifest's sha256 first."""
    shuffle_window: int | None = None
    """Samples shuffled together; None: 4 shards' worth."""
    max_samples: int = 0
    """Eval only: the first max_samples of the split in stored order (0: all)."""
    fetch: FetchSettings = field(default_factory=FetchSettings)
    """The node cache and prefetch of shards in an object store."""

    def validate(self, m: Manifest) -> None:
        if self.split not in m.shards:
            raise UserError(f"{m.path}: no split {self.split!r} (has {', '.join(m.shards)})")
        G, mb, W = self.global_batch_size, self.micro_batch_size, self.world_size
        if G <= 0 or mb <= 0 or W <= 0:
            raise UserError(f"global batch {G}, micro-batch {mb} and world size {W} must be positive")
        if not 0 <= self.rank < W:
            raise UserError(f"rank {self.rank} is outside world size {W}")
        if G % (mb * W):
            raise UserError(f"global batch {G} is not divisible by micro-batch {mb} × {W} ranks "
                            f"(= {mb * W})")
        if self.bad_sample_policy not in ("raise", "skip"):
            raise UserError(f"bad_sample_policy {self.bad_sample_policy!r}: choose raise or skip")
        if self.consumed_samples < 0:
            raise UserError(f"consumed_samples {self.consumed_samples} is negative")
        if self.num_workers < 0:
            raise UserError(f"num_workers {self.num_workers} is negative")
        if m.num_samples(self.split) == 0:
            raise UserError(f"{m.path}: split {self.split!r} has no samples")
        if self.max_samples < 0:
            raise UserError(f"max_samples {self.max_samples} is negative")
        if self.max_samples and self.split == "train":
            raise UserError("max_samples limits one pass over an eval split; train is infinite")
        if self.shuffle_window is not None and self.shuffle_window < 1:
            raise UserError(f"shuffle_window {self.shuffle_window} must be >= 1")
        remote = _is_remote(m.shard_location(self.split, 0))
        if remote and self.num_workers:
            # A forked worker hung in the store client (fsspec's I/O loop) in one of three tries
            # here; reading in the rank's process is fast enough (see benchmarks).
            raise UserError(f"data.num_workers = {self.num_workers} with shards in an object "
                            f"store ({m.shard_location(self.split, 0)}) is not supported yet: set "
                            f"it to 0")


def open_loader(manifest: Manifest | str | Path, config: LoaderConfig) -> PretrainLoader:
    """The loader of `config` over a manifest (or its path): checked, then built."""
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    config.validate(m)
    return PretrainLoader(m, config)


class PretrainLoader:
    """This rank's masked micro-batches; see the module docstring for the stream's definition.
    Built by `open_loader` (which checks the config first)."""

    def __init__(self, manifest: Manifest, config: LoaderConfig):
        self.manifest = m = manifest
        self.config = c = config
        self.split = c.split
        self.n = m.num_samples(c.split)
        if c.max_samples:
            # The first max_samples of the split in stored order: the same samples on any
            # number of ranks (a count of global batches would depend on the world size).
            self.n = min(self.n, c.max_samples)
        self.G, self.mb, self.W, self.rank = (c.global_batch_size, c.micro_batch_size,
                                              c.world_size, c.rank)
        self.micro_per_batch = self.G // (self.mb * self.W)
        self.seed = c.seed
        self.start = self.consumed_samples = c.consumed_samples
        self.masking = c.masking
        self.num_workers = c.num_workers
        self.policy = c.bad_sample_policy
        self.max_bad = c.max_bad_samples
        self.bad_samples = 0
        self.fingerprint = m.fingerprint
        self.seq_len = m.seq_len
        self.vocab = self._vocab()
        self.cls_id, self.sep_id, self.pad_id = (self.vocab["[CLS]"], self.vocab["[SEP]"],
                                                 self.vocab["[PAD]"])
        self.masker = Masker(self.masking, self.vocab, c.seed)
        self.is_train = c.split == "train"
        self.order = GlobalOrder([s.samples for s in m.shards[c.split]], c.seed, self.is_train,
                                 c.shuffle_window or 4 * m.samples_per_shard)
        # Remote shards: the node cache (fetch.cache_dir: its root) and the prefetcher.
        self.fetcher = (ShardFetcher(m, c.split, c.fetch, c.rank)
                        if _is_remote(m.shard_location(c.split, 0)) else None)
        if self.fetcher is not None and c.fetch.limit_bytes:
            self._check_cache_bound(c.fetch.limit_bytes)
        self._window: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.store = ShardStore(m, c.split, self.fetcher)
        self.id_base = 0 if self.is_train else EVAL_ID_BIT
        if c.verify_sha256:
            self._verify()

    def _vocab(self) -> dict[str, int]:
        m = self.manifest
        vocab = read_vocab(m.vocab_file)
        if len(vocab) != m.vocab_size:
            raise UserError(f"{m.vocab_file}: {len(vocab)} tokens, the manifest says {m.vocab_size}")
        expected = round(m.seq_len * self.masking.mask_prob)
        if self.masking.max_predictions_per_seq < expected:
            log.warning("max_predictions_per_seq=%d caps masking below %.0f%% of %d tokens "
                        "(the paper uses 20 at seq 128 and 80 at seq 512)",
                        self.masking.max_predictions_per_seq, 100 * self.masking.mask_prob,
                        m.seq_len)
        return vocab

    # -- integrity --------------------------------------------------------------------------

    def _check_cache_bound(self, limit: int) -> None:
        """The current and next window must fit the cache, in any epoch's shard order. A window
        (W consecutive samples of the shard concatenation) touches at most k + 1 shards, where
        k is the fewest shards holding W samples counting the smallest first (the shards fully
        inside it hold fewer than W); two windows, twice that; priced as the largest shards."""
        counts = sorted(s.samples for s in self.manifest.shards[self.split])
        sizes = sorted((s.bytes for s in self.manifest.shards[self.split]), reverse=True)
        k, seen = 0, 0
        while k < len(counts) and seen < self.order.window:
            seen += counts[k]
            k += 1
        # Two windows (current and next); more when a global batch is longer than a window.
        held = max(2, -(-(self.G - 1) // self.order.window) + 1)
        most = min(held * (k + 1), len(sizes))
        need = sum(sizes[:most])
        if need > limit:
            raise UserError(f"data.cache_limit_gb = {limit / 1e9:g} is smaller than two shuffle "
                            f"windows of split {self.split!r} (up to {most} shards, "
                            f"{need / 1e9:.3g} GB): raise it")

    def _ahead(self, k: int) -> None:
        """Tell the fetcher which windows micro-batch k's global batch reads, and the next."""
        if self.fetcher is None:
            return
        b = k // self.micro_per_batch
        first = self.start + b * self.G
        last = first + self.G - 1
        if not self.is_train:
            first, last = min(first, self.n - 1), min(last, self.n - 1)
        span = (self.order.window_of(first), self.order.window_of(last))
        if span == self._window:
            return
        self._window = span
        current: list[int] = []
        w = span[0]
        while True:
            current += [i for i in self.order.window_shards(*w) if i not in current]
            if w == span[1]:
                break
            w = self.order.next_window(*w)
        # A batch across a window boundary already reads the next window: nothing more is
        # fetched until the batches are inside it, so at most two windows are ever held (what
        # `_check_cache_bound` prices), and the window after still has a window's time to come.
        following = [] if span[0] != span[1] else [
            i for i in self.order.window_shards(*self.order.next_window(*span[1]))
            if i not in current]
        self.fetcher.ahead(current, following)
        self.store.retain(set(current) | set(following))

    @property
    def fetch_wait_s(self) -> float:
        """Seconds this process's reads waited for remote shards (0 for local shards)."""
        return self.fetcher.wait_s if self.fetcher is not None else 0.0

    def _verify(self) -> None:
        problems = verify_shards(self.manifest, self.split)
        if problems:
            raise UserError(problems[0])

    # -- the stream -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Micro-batches this rank yields in one pass (eval); train is infinite."""
        if self.is_train:
            raise TypeError("the train loader is infinite")
        return self._eval_micro_batches()

    def _eval_micro_batches(self) -> int:
        remaining = max(self.n - self.start, 0)
        return -(-remaining // self.G) * self.micro_per_batch

    def positions(self, k: int) -> np.ndarray:
        """Global sample positions of this rank's k-th micro-batch from `consumed_samples`."""
        b, j = divmod(k, self.micro_per_batch)
        first = self.start + b * self.G + self.rank * (self.G // self.W) + j * self.mb
        return np.arange(first, first + self.mb, dtype=np.int64)

    def micro_batches(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches k = worker, worker + num_workers, … (all of them for one worker)."""
        k = worker
        end = None if self.is_train else self._eval_micro_batches()
        while end is None or k < end:
            self._ahead(k)
            yield self.make_batch(self.positions(k))
            k += num_workers

    def make_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        B, T = len(positions), self.seq_len
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        lengths = np.empty(B, dtype=np.int64)
        a_lens = np.empty(B, dtype=np.int64)
        labels = np.empty(B, dtype=np.int64)
        sample_ids = np.empty(B, dtype=np.int64)
        real = positions < self.n if not self.is_train else np.ones(B, dtype=bool)
        shard, offset = self.order.locate(np.where(real, positions, 0))
        no_pair = self.manifest.pair_objective == "mlm"
        for i in range(B):
            got: Any = None
            if real[i]:
                s = self.store.get(int(shard[i]))
                got = read_sample(s, int(offset[i]))
                if isinstance(got, str):
                    self._bad(s, int(offset[i]), int(positions[i]), got)
            if got is None or isinstance(got, str):
                ids[i, 0], ids[i, 1] = self.cls_id, self.sep_id
                lengths[i] = a_lens[i] = 2
                labels[i] = -100
                sample_ids[i] = PAD_SAMPLE_ID if got is None else BAD_SAMPLE_ID
                continue
            tokens, a_len, label = got
            n = len(tokens)
            ids[i, :n] = tokens
            lengths[i] = n
            a_lens[i] = a_len
            labels[i] = -100 if no_pair or label < 0 else label
            sample_ids[i] = self.id_base + (int(shard[i]) << 32) + int(offset[i])
        masked_ids, mpos, mlabels = self.masker(ids, lengths, positions)
        t = np.arange(T)[None, :]
        attention = t < lengths[:, None]
        types = (t >= a_lens[:, None]) & attention
        return {
            "input_ids": torch.from_numpy(masked_ids),
            "token_type_ids": torch.from_numpy(types.astype(np.int64)),
            "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "masked_positions": torch.from_numpy(mpos),
            "masked_labels": torch.from_numpy(mlabels),
            "next_sentence_label": torch.from_numpy(labels),
            "sample_ids": torch.from_numpy(sample_ids),
        }

    def _bad(self, shard: _Shard, offset: int, position: int, reason: str) -> None:
        where = (f"shard {shard.name} ({shard.location}): sample {offset} "
                 f"(global position {position}): {reason}")
        if self.policy == "raise":
            raise UserError(f"{where} (set bad_sample_policy='skip' to skip damaged samples)")
        self.bad_samples += 1
        log.warning("skipping damaged sample (%d so far): %s", self.bad_samples, where)
        if self.bad_samples > self.max_bad:
            raise UserError(f"more than max_bad_samples={self.max_bad} damaged samples; last: {where}")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields micro-batches from the current position (train: forever; eval: one pass from
        `consumed_samples`). `consumed_samples` advances by G after each complete global batch."""
        if self.is_train:
            self.start = self.consumed_samples
        if self.num_workers == 0:
            source: Any = self.micro_batches()
        else:
            source = torch.utils.data.DataLoader(_Workers(self), batch_size=None,
                                                 num_workers=self.num_workers)
        count = 0
        if self.num_workers:
            self._ahead(0)  # the workers read through the cache; this process prefetches
        for batch in _worker_errors_unwrapped(source):
            if self.num_workers:
                self._tally_bad(batch)
                self._ahead(count + 1)
            if self.fetcher is not None:
                self.fetcher.check()  # a background fetch failed for good: stop, naming it
            count += 1
            if self.is_train and count % self.micro_per_batch == 0:
                self.consumed_samples += self.G
            yield batch

    def _tally_bad(self, batch: dict[str, torch.Tensor]) -> None:
        bad = int((batch["sample_ids"] == BAD_SAMPLE_ID).sum())
        if bad:
            self.bad_samples += bad
            if self.bad_samples > self.max_bad:
                raise UserError(f"more than max_bad_samples={self.max_bad} damaged samples "
                                f"(see the warnings for which)")

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, as a checkpoint stores it: the global `consumed_samples` (the
        same on every rank, whatever the world size) and what the position is a position in."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "manifest_fingerprint": self.fingerprint, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved `state_dict` (before iterating). A position in another split,
        manifest or seed is refused: the seed orders the samples and draws the masks, so the
        same position would be other samples (a resume refuses a changed train.seed earlier,
        naming the key: bertscale.training.checkpoint.resume.STREAM_KEYS)."""
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"the saved data position is one of seed {state['seed']}, this "
                            f"loader's seed is {self.seed}: the same position would be other "
                            f"samples")
        if state.get("split", self.split) != self.split:
            raise UserError(f"a saved data position of the {state['split']!r} split cannot resume "
                            f"the {self.split!r} split")
        if state.get("manifest_fingerprint", self.fingerprint) != self.fingerprint:
            raise UserError(f"{self.manifest.path}: the saved data position is one of another "
                            f"manifest (fingerprint {str(state['manifest_fingerprint'])[:12]}, now "
                            f"{self.fingerprint[:12]})")
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise UserError(f"consumed_samples {consumed!r} is not a non-negative integer")
        self.start = self.consumed_samples = consumed

    def close(self) -> None:
        self.store.close()
        if self.fetcher is not None:
            self.fetcher.close()


def _worker_errors_unwrapped(source: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate `source`, turning a UserError raised in a DataLoader worker (which torch re-raises
    as "Caught UserError in DataLoader worker process N" followed by the worker's traceback) back
    into its own one-line message."""
    try:
        yield from source
    except UserError as e:
        text = str(e)
        if text.startswith("Caught UserError in DataLoader worker"):
            last = text.rstrip().splitlines()[-1]
            raise UserError(last.split("UserError: ", 1)[-1]) from None
        raise


class _Workers(torch.utils.data.IterableDataset):
    """Hands each DataLoader worker its share of the rank's micro-batches."""

    def __init__(self, loader: PretrainLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            yield from self.loader.micro_batches()
        else:
            fetcher = self.loader.fetcher
            if fetcher is not None:  # the parent prefetches; a worker waits for the cache
                fetcher = fetcher.worker_copy()
            self.loader.store = ShardStore(self.loader.manifest, self.loader.split,
                                           fetcher)  # no maps shared across fork
            yield from self.loader.micro_batches(info.id, info.num_workers)
