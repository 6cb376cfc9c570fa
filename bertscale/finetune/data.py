"""The fine-tuning data path: features padded into batches, and the run's data position.

`GlobalBatches` is the one place a run's position in its data is kept (a stateful component of
the trainer core): global batch after global batch of a seeded order of the training set (one
permutation per epoch), each rank taking its contiguous share. Its state is the number of global
batches consumed, a count that does not depend on the number of ranks, so a resumed run continues
exactly where the checkpoint was taken (on any number of ranks) without replaying the batches
before it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bertscale.errors import UserError

if TYPE_CHECKING:
    import torch

Batch = dict[str, "torch.Tensor"]
Feature = Mapping[str, Any]


def lengths(ids: Any) -> list[int]:
    """A feature's sequence lengths: one, or one per choice (multiple choice)."""
    return [len(s) for s in ids] if ids and isinstance(ids[0], (list, tuple)) else [len(ids)]


def num_tokens(feature: Feature) -> int:
    return sum(lengths(feature["input_ids"]))


def collate(features: Sequence[Feature], pad_id: int = 0) -> Batch:
    """Pad `input_ids` / `token_type_ids` to the longest sequence of the batch (the last
    axis; a feature may hold several sequences, one per choice) and stack everything else."""
    import torch

    out: Batch = {}
    T = max(max(lengths(f["input_ids"])) for f in features)
    for key in ("input_ids", "token_type_ids"):
        pad = pad_id if key == "input_ids" else 0
        rows = []
        for f in features:
            seqs = f[key] if isinstance(f[key][0], (list, tuple)) else [f[key]]
            rows.append([list(s) + [pad] * (T - len(s)) for s in seqs])
        t = torch.tensor(rows, dtype=torch.long)                 # (B, C, T)
        out[key] = t if isinstance(features[0][key][0], (list, tuple)) else t[:, 0]
    mask_rows = []
    for f in features:
        seqs = f["input_ids"] if isinstance(f["input_ids"][0], (list, tuple)) else [f["input_ids"]]
        mask_rows.append([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    m = torch.tensor(mask_rows, dtype=torch.long)
    out["attention_mask"] = m if out["input_ids"].dim() == 3 else m[:, 0]
    for key in features[0]:
        if key in ("input_ids", "token_type_ids"):
            continue
        v = [f[key] for f in features]
        out[key] = torch.tensor(v, dtype=torch.float32 if isinstance(v[0], float) else torch.long)
    return out


def model_inputs(batch: Batch) -> Batch:
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def total_steps(epochs: float, batch_size: int, num_examples: int, max_steps: int = 0) -> int:
    """Optimizer steps of a run: epochs x ceil(examples / batch), capped by max_steps (0: no
    cap)."""
    total = max(1, math.ceil(epochs * math.ceil(num_examples / batch_size)))
    return min(total, max_steps) if max_steps else total


def share(global_batch: list[int], rank: int, world_size: int) -> tuple[list[int], float]:
    """This rank's contiguous share of a global batch and the weight of its mean loss.

    DDP averages gradients over the W ranks, so weighting rank k's mean loss by W * n_k / n makes
    the average the gradient of the global batch's mean loss, however unevenly a last batch
    divides. A rank left with nothing (a last batch smaller than W) still runs one example with
    weight 0: every rank must join every gradient all-reduce."""
    if world_size == 1:
        return global_batch, 1.0
    parts = np.array_split(np.asarray(global_batch), world_size)
    mine = parts[rank].tolist()
    if not mine:
        return global_batch[:1], 0.0
    return mine, world_size * len(mine) / len(global_batch)


class GlobalBatches:
    """The training set's global batches in a seeded order, and this rank's share of each."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, *, rank: int,
                 world_size: int):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = math.ceil(num_examples / batch_size)
        self.consumed = 0            # global batches taken: the data position
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self._generator: torch.Generator | None = None

    def next(self) -> tuple[list[int], float]:
        """The indices of this rank's share of the next global batch, and its loss weight."""
        epoch, i = divmod(self.consumed, self.per_epoch)
        perm = self._permutation(epoch)
        self.consumed += 1
        return share(perm[i * self.batch_size:(i + 1) * self.batch_size].tolist(), self.rank,
                     self.world_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order: the `epoch + 1`-th permutation of one generator seeded with
        the run's seed (the order of a run that never stopped)."""
        import torch

        if self._generator is None or epoch < self._epoch:
            self._generator, self._epoch = torch.Generator().manual_seed(self.seed), -1
        while self._epoch < epoch:
            self._perm = torch.randperm(self.n, generator=self._generator).numpy()
            self._epoch += 1
        return self._perm

    def state_dict(self) -> dict[str, Any]:
        return {"global_batches": self.consumed, "seed": self.seed, "examples": self.n,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in ("seed", "examples", "batch_size")}
        now = {"seed": self.seed, "examples": self.n, "batch_size": self.batch_size}
        if saved != now:
            raise UserError(f"the checkpoint's data order was for {saved}, this run's is {now}")
        self.consumed = int(state["global_batches"])
