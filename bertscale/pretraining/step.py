"""One training step's forward and backward: the step's micro-batches with gradient
accumulation, and this rank's statistics of them (`StepStats`, named fields) summed on the
device.

Nothing here waits for the GPU: the statistics stay on the device until the loop's next read
(bertscale.training.agreement.Reads), which sums them over the ranks and acts on a NaN/inf
loss there; the unpadded model gets the sequence lengths from the host batch, so it sizes its
packed tensors without reading the mask back. The optimizer update itself is
`update.Updater.apply`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bertscale.devices import to_device
from bertscale.pretraining.faults import DebugHooks
from bertscale.pretraining.stats import StepStats

if TYPE_CHECKING:
    import torch

    from bertscale.model import LossParts
    from bertscale.training.deepspeed_engine import DeepSpeedEngine

Batch = dict[str, "torch.Tensor"]


def host_lengths(cpu_batch: Batch) -> list[int]:
    """The real length of each sequence, from the batch before it is moved (no device read)."""
    lengths: list[int] = cpu_batch["attention_mask"].sum(1).tolist()
    return lengths


def forward(engine: DeepSpeedEngine, batch: Batch, vocab_size: int,
            lengths: list[int] | None = None) -> LossParts:
    """The model's loss parts (bertscale.model.LossParts) on one micro-batch already on device;
    `lengths`: its sequences' real lengths, known on the host (`host_lengths`)."""
    from bertscale.model import pretraining_loss

    out = engine(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                 attention_mask=batch["attention_mask"], masked_positions=batch["masked_positions"],
                 lengths=lengths)
    return pretraining_loss(out, batch["masked_labels"], batch["next_sentence_label"],
                            vocab_size=vocab_size)


def train_step(engine: DeepSpeedEngine, micro_batches: list[Batch], *, step: int,
               vocab_size: int, hooks: DebugHooks, real: bool = True
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Forward and backward over the micro-batches of the update that would become step
    `step + 1`. Returns this rank's packed StepStats sums (on the device, not reduced) and, per
    micro-batch, (finite?, sample_ids) for the report of a NaN/inf loss. `real` False: stand-ins
    after a data error on this rank (agreement.Feed), backpropagated with weight 0 and counted
    only as the error."""
    import torch

    from bertscale import perf

    device = engine.device
    sums = StepStats.pack(device, data_error=0.0 if real else 1.0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks.before_step(step + 1)
    for micro, cpu_batch in enumerate(micro_batches):
        batch = to_device(cpu_batch, device)
        parts = forward(engine, batch, vocab_size, host_lengths(cpu_batch))
        loss = hooks.loss(step + 1, parts.total) if real else parts.total * 0.0
        finite = torch.isfinite(loss.detach())
        seen.append((finite, cpu_batch["sample_ids"]))
        engine.backward(loss)
        if micro < len(micro_batches) - 1:
            engine.micro_step()  # inside the accumulation window: DeepSpeed only counts it
        if not real:
            continue
        tokens, tokens_squared = perf.batch_length_sums(batch["attention_mask"])
        sums += StepStats.pack(
            device, loss=torch.where(finite, loss.detach(), 0.0),
            mlm_loss=torch.where(finite, parts.mlm.detach(), 0.0),
            nsp_loss=torch.where(finite, parts.nsp.detach(), 0.0),
            mlm_correct=parts.mlm_correct, mlm_count=parts.mlm_count,
            nsp_correct=parts.nsp_correct, nsp_count=parts.nsp_count,
            tokens=tokens, tokens_squared=tokens_squared, nonfinite=~finite)
    return sums, seen
