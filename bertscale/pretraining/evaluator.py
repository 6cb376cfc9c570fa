"""The held-out evaluation: its cadence (`eval.every`, `eval.at_start`, always after the last
step) and the pass itself.

One pass over the first `eval.samples` of the eval split in stored order (the same samples on
any number of ranks), padded with void samples so every rank has the same number of batches;
masks depend on (seed, position) only, so every eval sees the same masks. The MLM loss is
token-weighted over the whole pass (sums, not means of means).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bertscale.devices import to_device
from bertscale.pretraining.stats import EvalStats
from bertscale.pretraining.step import forward, host_lengths
from bertscale.training.agreement import next_micro_batches

if TYPE_CHECKING:
    from bertscale.data.loader import PretrainLoader
    from bertscale.pretraining.plan import Plan
    from bertscale.pretraining.reporter import Reporter
    from bertscale.training.deepspeed_engine import DeepSpeedEngine


class Evaluator:
    def __init__(self, plan: Plan, engine: DeepSpeedEngine, reporter: Reporter,
                 make_loader: Callable[[], PretrainLoader]):
        self.engine, self.reporter = engine, reporter
        self.every = plan.recipe.eval.every
        self.at_start = plan.recipe.eval.at_start
        self.total = plan.recipe.train.steps
        self.vocab_size = plan.manifest.vocab_size
        self.make_loader = make_loader  # a fresh eval loader per pass: the pass starts at 0

    def maybe_run_at_start(self, step: int) -> None:
        if self.at_start and step == 0:
            self.run(step)

    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0 or step == self.total)

    def maybe_run(self, step: int) -> None:
        """After applied step `step`."""
        if self.due(step):
            self.run(step)

    def run(self, step: int) -> dict[str, float]:
        """Evaluate and report. Collective."""
        values = self.evaluate(step).values()
        self.reporter.eval(step, values)
        return values

    def evaluate(self, step: int) -> EvalStats:
        import torch
        import torch.distributed as dist

        engine, device = self.engine, self.engine.device
        loader = self.make_loader()
        sums = EvalStats.pack(device)
        engine.eval()
        try:
            batches = iter(loader)
            with torch.no_grad():
                for _ in range(len(loader)):
                    cpu_batch = next_micro_batches(batches, 1, step=step, device=device)[0]
                    batch = to_device(cpu_batch, device)
                    p = forward(engine, batch, self.vocab_size, host_lengths(cpu_batch))
                    sums += EvalStats.pack(
                        device, mlm_loss=p.mlm * p.mlm_count, nsp_loss=p.nsp * p.nsp_count,
                        mlm_correct=p.mlm_correct, mlm_count=p.mlm_count,
                        nsp_correct=p.nsp_correct, nsp_count=p.nsp_count,
                        samples=(batch["sample_ids"] >= 0).sum(),
                        nsp_positive=(batch["next_sentence_label"] == 1).sum())
        finally:
            engine.train()
            loader.close()
        dist.all_reduce(sums)
        return EvalStats.unpack(sums)
