"""One training step's forward and backward: the step's micro-batches with gradient
accumulation, then ONE all-reduce of the step's statistics (`StepStats`, named fields).

`train_step` stops the run (StopTraining, exit 3) when any rank's loss was NaN/inf, BEFORE the
optimizer step, so the weights stay those of the last step; which samples did it is printed on
the stderr of the rank that saw them. The optimizer update itself is `update.Updater.apply`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bertscale import checkpoint as ckpt_lib
from bertscale import distributed
from bertscale.pretraining.faults import DebugHooks
from bertscale.pretraining.stats import StepStats
from bertscale.pretraining.update import StopTraining


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(engine: Any, batch: dict[str, Any], vocab_size: int) -> Any:
    """The model's loss parts (bertscale.model.LossParts) on one micro-batch already on device."""
    from bertscale.model import pretraining_loss

    out = engine(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                 attention_mask=batch["attention_mask"], masked_positions=batch["masked_positions"])
    return pretraining_loss(out, batch["masked_labels"], batch["next_sentence_label"],
                            vocab_size=vocab_size)


def train_step(engine: Any, micro_batches: list[dict[str, Any]], *, step: int, vocab_size: int,
               hooks: DebugHooks, rank: int, run_dir: Path, info: Any) -> StepStats:
    """Forward and backward over the micro-batches of the update that would become step
    `step + 1`, and their statistics summed over every rank. Collective."""
    import torch
    import torch.distributed as dist

    from bertscale import perf

    device = engine.device
    sums = StepStats.pack(device)
    seen: list[tuple[Any, Any]] = []  # (finite?, sample_ids) per micro-batch, no host sync
    hooks.before_step(step + 1)
    for micro, cpu_batch in enumerate(micro_batches):
        batch = to_device(cpu_batch, device)
        parts = forward(engine, batch, vocab_size)
        loss = hooks.loss(step + 1, parts.total)
        finite = torch.isfinite(loss.detach())
        seen.append((finite, batch["sample_ids"]))
        engine.backward(loss)
        if micro < len(micro_batches) - 1:
            engine.step()  # inside the accumulation window: DeepSpeed only counts it
        tokens, tokens_squared = perf.batch_length_sums(batch["attention_mask"])
        sums += StepStats.pack(
            device, loss=torch.where(finite, loss.detach(), 0.0),
            mlm_loss=torch.where(finite, parts.mlm.detach(), 0.0),
            nsp_loss=torch.where(finite, parts.nsp.detach(), 0.0),
            mlm_correct=parts.mlm_correct, mlm_count=parts.mlm_count,
            nsp_correct=parts.nsp_correct, nsp_count=parts.nsp_count,
            tokens=tokens, tokens_squared=tokens_squared, nonfinite=~finite)
    # Read at the step boundary and summed with the rest: every rank learns of a signal that
    # reached any rank in the same all-reduce, so all of them save the same step.
    sums += StepStats.pack(device, preempted=1.0 if distributed.local_preemption_flag() else 0.0)
    dist.all_reduce(sums)
    stats = StepStats.unpack(sums)
    if stats.nonfinite:
        _stop_nonfinite(stats, seen, step=step, rank=rank, run_dir=run_dir, info=info)
    return stats


def _stop_nonfinite(stats: StepStats, seen: list[tuple[Any, Any]], *, step: int, rank: int,
                    run_dir: Path, info: Any) -> None:
    bad_ids = [i for ok, ids in seen if not bool(ok) for i in ids.tolist()]
    if bad_ids:
        print(f"[rank {rank}] step {step + 1}: non-finite loss; batch sample_ids {bad_ids}",
              file=sys.stderr, flush=True)
    latest = ckpt_lib.latest_committed(run_dir)
    info(f"error: step {step + 1}: loss is NaN/inf in {int(stats.nonfinite)} micro-batch(es) "
         f"(sample ids on stderr of the rank(s) that saw it); stopping without saving. Newest "
         f"committed checkpoint: {latest.path if latest else 'none'}")
    raise StopTraining(distributed.NONFINITE_EXIT_CODE)
