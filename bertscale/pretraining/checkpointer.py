"""When a pretraining run saves, and what its checkpoint holds besides DeepSpeed's files.

Cadence: every `checkpoint.every` applied steps, at a preemption (the step every rank agreed
on), at `--stop-at-step`, and after the last step with `checkpoint.at_end`; never twice for one
step (a resumed run does not re-save the step it resumed from). Policy: the weights must be
finite on every rank, else nothing is saved and the run stops (exit 3), so a committed
checkpoint is always one a resume can continue.

The trainer state (bertscale.checkpoint.STATE_FILE) is each stateful component's own state
dict (the loop's counters at the top level, the loader's data position under "data") plus what
identifies the run (recipe, model shape, tokenizer hash, manifest fingerprint, batch geometry).
"""

from __future__ import annotations

from typing import Any

from bertscale import checkpoint as ckpt_lib
from bertscale import distributed
from bertscale.config import recipe_to_dict, to_dict
from bertscale.pretraining.agreement import weights_finite
from bertscale.pretraining.update import StopTraining


def run_identity(plan: Any) -> dict[str, Any]:
    """What a checkpoint records about the run it belongs to; `resume.find` and
    `checkpoint.check_compatible` refuse to continue it with anything else."""
    t, m = plan.recipe.train, plan.manifest
    return {"recipe": recipe_to_dict(plan.recipe),
            "model_config": to_dict(plan.model_config), "tokenizer_hash": plan.tokenizer_hash,
            "manifest_fingerprint": m.fingerprint,
            "manifest_path": str(m.path), "lowercase": bool(m.lowercase),
            "seq_len": m.seq_len, "pair_objective": m.pair_objective,
            "zero_stage": plan.zero_stage, "precision": plan.precision,
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "deepspeed_config": plan.ds_config_path.name}


def trainer_state(train_state: Any, loader: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """The STATE_FILE contents. `consumed_samples` stays at the top level as well (format 1, which
    `resume` reads when "data" is absent, and what tools and people read); both come from the one
    loader state dict."""
    data = loader.state_dict()
    return {**train_state.state_dict(), "consumed_samples": data["consumed_samples"],
            "data": data, **identity}


class Checkpointer:
    def __init__(self, plan: Any, engine: Any, model: Any, *, train_state: Any, loader: Any,
                 last_saved: int | None, info: Any):
        c = plan.recipe.checkpoint
        self.every, self.at_end, self.keep, self.check_free_space = (
            c.every, c.at_end, c.keep, c.check_free_space)
        self.total = plan.recipe.train.steps
        self.stop_at = plan.stop_at
        self.run_dir = plan.run_dir
        self.engine, self.model = engine, model
        self.train_state, self.loader = train_state, loader
        self.identity = run_identity(plan)
        self.last_saved = last_saved
        self.info = info

    def due(self, step: int, *, preempted: bool) -> bool:
        last = step == self.total
        return bool(self.every and step % self.every == 0 or preempted
                    or (last and self.at_end) or step == self.stop_at)

    def maybe_save(self, step: int, *, preempted: bool) -> None:
        """After applied step `step`. Collective; raises StopTraining if the weights are not
        finite (nothing saved)."""
        if not self.due(step, preempted=preempted) or self.last_saved == step:
            return
        if not weights_finite(self.model, self.engine.device):
            self.info(f"error: step {step}: weights are not finite; not saving a checkpoint")
            raise StopTraining(distributed.NONFINITE_EXIT_CODE)
        ckpt_lib.save(self.engine, self.run_dir, step,
                      trainer_state(self.train_state, self.loader, self.identity),
                      keep=self.keep, check_free_space=self.check_free_space, log=self.info)
        self.last_saved = step
