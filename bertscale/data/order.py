"""The global sample order of one split: position -> (shard, sample offset), and back.

A function of (shard sample counts, seed) only, so every rank, worker and world size computes
the same stream (DESIGN guarantee 5): shards in a seeded order per epoch, samples shuffled within
consecutive windows of `window` samples. `bertscale.data.loader` reads batches at these
positions; `bertscale.data.wds` uses the inverse to mask a sample as the trainer does.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class GlobalOrder:
    """Global position -> (shard index, sample offset) for one split."""

    def __init__(self, counts: list[int], seed: int, shuffle: bool, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.n = int(self.counts.sum())
        self.seed = seed
        self.shuffle = shuffle
        self.window = max(1, min(window, self.n)) if self.n else 1
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._inverse: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._epochs.get(e)
        if got is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, 0x5EED, e]).permutation(len(self.counts))
            else:
                order = np.arange(len(self.counts))
            ends = np.cumsum(self.counts[order])
            got = (order, ends)
            self._epochs[e] = got
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return got

    def _perm(self, e: int, w: int) -> np.ndarray:
        got = self._windows.get((e, w))
        if got is None:
            size = min(self.window, self.n - w * self.window)
            got = np.random.default_rng([self.seed, 0x3A7D, e, w]).permutation(size)
            self._windows[(e, w)] = got
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return got

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        epoch = positions // self.n
        j = positions % self.n
        shard = np.empty_like(positions)
        offset = np.empty_like(positions)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            jj = j[sel]
            if self.shuffle:
                w = jj // self.window
                for ww in np.unique(w).tolist():
                    ws = w == ww
                    jj[ws] = ww * self.window + self._perm(e, ww)[jj[ws] - ww * self.window]
            order, ends = self._epoch(e)
            k = np.searchsorted(ends, jj, side="right")
            shard[sel] = order[k]
            offset[sel] = jj - (ends[k] - self.counts[order[k]])
        return shard, offset

    def position_of(self, epoch: int, shard: int, offset: int) -> int:
        """The global position at which `epoch` reads sample `offset` of `shard`: the inverse
        of `locate` (bertscale.data.wds masks a sample as the trainer does in that epoch)."""
        order, ends = self._epoch(epoch)
        k = int(np.flatnonzero(order == shard)[0])
        jj = int(ends[k] - self.counts[shard]) + offset    # index in the shard concatenation
        if self.shuffle:
            w = jj // self.window
            inverse = self._inverse.get((epoch, w))
            if inverse is None:
                inverse = self._inverse[(epoch, w)] = np.argsort(self._perm(epoch, w))
                if len(self._inverse) > 2:
                    self._inverse.popitem(last=False)
            jj = w * self.window + int(inverse[jj - w * self.window])
        return epoch * self.n + jj

    def window_of(self, position: int) -> tuple[int, int]:
        """(epoch, window) of a global position."""
        return position // self.n, position % self.n // self.window

    def next_window(self, epoch: int, window: int) -> tuple[int, int]:
        return (epoch, window + 1) if (window + 1) * self.window < self.n else (epoch + 1, 0)

    def window_shards(self, epoch: int, window: int) -> list[int]:
        """The shards a window reads: a window shuffles a contiguous range of the epoch's shard
        concatenation, so they are the shards that range overlaps (what `locate` maps to)."""
        order, ends = self._epoch(epoch)
        lo = window * self.window
        hi = min(lo + self.window, self.n) - 1
        a, b = np.searchsorted(ends, [lo, hi], side="right").tolist()
        return order[a:b + 1].tolist()
