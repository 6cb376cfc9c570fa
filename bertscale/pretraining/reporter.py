"""Rank 0's outputs of a pretraining run: the terminal (a bar redrawn in place, or plain lines
at the logging cadence), metrics.jsonl, W&B and TensorBoard (the core's reporter,
bertscale.training.reporter, with the recipe's [logging] section).
"""

from __future__ import annotations

import sys
import time

from bertscale.config import recipe_to_dict
from bertscale.pretraining.plan import Plan
from bertscale.reporting import MetricSinks
from bertscale.reporting import hms as _hms
from bertscale.training import reporter
from bertscale.training.checkpoint.layout import checkpoints_dir
from bertscale.training.checkpoint.resume import Start


class Reporter(reporter.Reporter):
    """Rank 0's outputs: terminal (bar or plain lines), metrics.jsonl, W&B, TensorBoard."""

    def __init__(self, plan: Plan, start_step: int):
        lg, main = plan.recipe.logging, plan.env.is_main
        self.main, self.bar_open, self.stream = main, False, sys.stdout  # warn() in the sinks' start
        super().__init__(MetricSinks(plan.run_dir, enabled=main, wandb=lg.wandb,
                                     tensorboard=lg.tensorboard, project=lg.wandb_project,
                                     name=plan.recipe.name,
                                     wandb_config=recipe_to_dict(plan.recipe),
                                     wandb_mode=lg.wandb_mode, warn=self.warn), main=main)
        self.plan = plan
        self.total = plan.recipe.train.steps
        self.every = lg.every
        self.start_step, self.stop_at = start_step, plan.stop_at
        self.t_start: float | None = None
        self.t_first = 0
        self.bar = main and (lg.progress == "bar" or (lg.progress == "auto" and sys.stdout.isatty()))

    def logs(self, step: int) -> bool:
        """The logging cadence: every `logging.every` steps, and always the first and the last
        step of the run and of this invocation (after a resume, at --stop-at-step). The same on
        every rank: the loop reads the statistics back at these steps."""
        return (step % self.every == 0 or step in (1, self.total, self.stop_at)
                or step == self.start_step + 1)

    def train_step(self, step: int, values: dict[str, float]) -> None:
        """An applied step whose statistics were read: the bar on each; a record and a plain
        line at the logging cadence (`logs`)."""
        if not self.main:
            return
        log_now = self.logs(step)
        if self.t_start is None:  # the first step pays for warm-up; ETA counts from its end
            self.t_start, self.t_first = time.monotonic(), step
        if log_now:
            self.record("train", step, values)
        done = step - self.t_first
        eta = (time.monotonic() - self.t_start) / done * (self.total - step) if done else float("nan")
        line = (f"step {step}/{self.total}  loss {values['loss']:.4f}  mlm_acc {values['mlm_acc']:.3f}  "
                f"lr {values['lr']:.2e}  {values['samples_per_s']:.1f} samples/s  ETA {_hms(eta)}")
        if self.bar:
            width = 24
            fill = int(width * step / self.total)
            sys.stdout.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {line}\x1b[K")
            sys.stdout.flush()
            self.bar_open = True
        elif log_now:
            print(line, flush=True)

    def skipped(self, step: int, values: dict[str, float]) -> None:
        """An optimizer update skipped for gradient overflow: always logged, never a step."""
        if not self.main:
            return
        self.record("skip", step, values)
        scale = f", loss scale now {values['loss_scale']:g}" if "loss_scale" in values else ""
        self.info(f"step {step + 1}/{self.total}: update skipped (gradient overflow{scale}); "
                  f"{values['skipped_steps']} skipped in all, not counted as steps")

    def eval(self, step: int, values: dict[str, float]) -> None:
        self.record("eval", step, values)
        nsp = f"  nsp_acc {values['nsp_acc']:.3f}" if "nsp_acc" in values else ""
        self.info(f"eval step {step}: loss {values['loss']:.4f}  mlm_acc {values['mlm_acc']:.3f}"
                  f"{nsp}  ({int(values['samples'])} samples)")

    def start(self, plan: Plan, *, step: int, consumed_samples: int, start: Start, n_params: int,
              mfu: str) -> None:
        """The opening lines: where the run starts from and what it is. metrics.jsonl keeps
        one record per step: what an earlier run recorded past this start goes (all of it when
        the run starts over)."""
        self.rewind(step if start.resumed_from is not None else -1)
        recipe, t, W = plan.recipe, plan.recipe.train, plan.env.world_size
        if start.resumed_from is not None:
            how = (f", converted from {start.saved_world_size} ranks through a universal checkpoint"
                   if start.universal and start.saved_world_size != W else "")
            self.info(f"resumed from {start.resumed_from.path} (step {step}, "
                      f"{consumed_samples} samples consumed{how})")
            if start.layout_change:
                self.info(f"engine changed since the checkpoint: {start.layout_change} (loaded "
                          f"through its universal conversion)")
            if start.changes:
                self.info(f"recipe changed since the checkpoint, in force from step {step + 1}: "
                          + "; ".join(start.changes))
        elif plan.init_from is not None:
            self.info(plan.init_from.describe())
        self.info(f"pretraining {recipe.name}: {n_params / 1e6:.1f}M parameters, {W} rank(s), "
                  f"ZeRO-{plan.zero_stage} {plan.precision}, global batch {t.global_batch_size} = "
                  f"{t.micro_batch_size} x {plan.grad_accum} accumulation x {W}, seq "
                  f"{plan.manifest.seq_len}, steps {step}->{t.steps}, run folder {plan.run_dir}")
        self.info(mfu)

    def finished(self, step: int, consumed_samples: int) -> None:
        """The closing line of a run that was not stopped by a failure or a preemption."""
        if step < self.total:
            self.info(f"stopped at step {step} as asked (--stop-at-step); resume to continue")
        else:
            self.info(f"done: {step} steps, {consumed_samples} samples; checkpoints in "
                      f"{checkpoints_dir(self.plan.run_dir)}, metrics in "
                      f"{self.plan.run_dir / 'metrics.jsonl'}")
