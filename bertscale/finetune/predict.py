"""Prediction over a set of features: length-sorted batches dealt round the ranks, gathered,
returned in input order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bertscale.devices import to_device
from bertscale.finetune.data import Batch, Feature, collate, num_tokens
from bertscale.finetune.models import apply_fast_paths
from bertscale.finetune.runtime import Runtime
from bertscale.parallelize import FastPaths
from bertscale.reporting import Progress


@torch.no_grad()
def predict(model: nn.Module, features: Sequence[Feature],
            forward: Callable[[nn.Module, Batch], Tensor | tuple[Tensor, ...]], rt: Runtime, *,
            batch_size: int, fast: FastPaths | None = None, pad_id: int = 0,
            label: str = "predict", what: str = "") -> list[np.ndarray]:
    """Run `forward` over `features`; each output concatenated along the batch as float32
    numpy, in the order of `features` (a tuple output gives one array per element, each
    (N, ...) possibly with a ragged last axis, padded with -1e4; callers slice to each
    feature's length).

    Batches are cut from the features sorted by length, so a batch pads to a length its
    members nearly share (GLUE dev sets range from a few tokens to 128): the same outputs with
    a fraction of the padded work. `label` names the run and `what` the pass in its progress line
    ("MRPC lr 5e-05 seed 1", "dev.tsv"); `fast`, the encoder's fast paths to run with."""
    device, amp_dtype = rt.device, rt.amp_dtype
    if fast is not None:
        apply_fast_paths(model, fast)
    model.to(device).eval()
    order = sorted(range(len(features)), key=lambda i: num_tokens(features[i]))
    starts = list(range(0, len(order), batch_size))
    chunks: dict[int, list[np.ndarray]] = {}
    mine = range(rt.rank, len(starts), rt.world_size)      # batches dealt round the ranks
    bar = Progress(f"{label} {what}".strip(), len(mine), "batches", mode=rt.progress,
                   enabled=rt.is_main)
    for done, b in enumerate(mine, start=1):
        part = [features[j] for j in order[starts[b]:starts[b] + batch_size]]
        batch = to_device(collate(part, pad_id), device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = forward(model, batch)
        outs = out if isinstance(out, tuple) else (out,)
        chunks[b] = [o.float().cpu().numpy() for o in outs]
        bar.update(done)
    bar.close(f"{len(features)} examples")
    if rt.world_size > 1:
        import torch.distributed as dist
        gathered: list[dict[int, list[np.ndarray]] | None] = [None] * rt.world_size
        dist.all_gather_object(gathered, chunks)
        chunks = {b: c for g in gathered for b, c in (g or {}).items()}
    chunks_in_order = [chunks[b] for b in range(len(starts))]
    model.train()
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    result = []
    for j in range(len(chunks_in_order[0]) if chunks_in_order else 0):
        arrays = [c[j] for c in chunks_in_order]
        if arrays[0].ndim >= 2:    # ragged last axis across batches: pad with -inf-like
            width = max(a.shape[-1] for a in arrays)
            arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])],
                             constant_values=-1e4) for a in arrays]
        result.append(np.concatenate(arrays, axis=0)[inverse])
    return result
