"""What a pretraining checkpoint holds besides DeepSpeed's files, and its cadence: the core's
checkpointer (bertscale.training.checkpoint.checkpointer) with the recipe's [checkpoint] section.

The trainer state (bertscale.training.checkpoint.state) is each stateful component's own state
dict ("train": the loop's counters; "data": the loader's data position) plus what identifies the
run (recipe, model shape, tokenizer hash, manifest fingerprint, engine, batch geometry), which
`resume.check_identity` compares before a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bertscale.config import recipe_to_dict, to_dict
from bertscale.pretraining.plan import Plan
from bertscale.training.checkpoint.checkpointer import Cadence, Checkpointer
from bertscale.training.engine import Engine
from bertscale.training.state import TrainState

if TYPE_CHECKING:
    from bertscale.data.loader import PretrainLoader


def run_identity(plan: Plan) -> dict[str, Any]:
    """What a checkpoint records about the run it belongs to; `resume.check_identity` refuses to
    continue it with anything else."""
    t, m = plan.recipe.train, plan.manifest
    return {"recipe": recipe_to_dict(plan.recipe),
            "model_config": to_dict(plan.model_config), "tokenizer_hash": plan.tokenizer_hash,
            "manifest_fingerprint": m.fingerprint,
            "manifest_path": str(m.path), "lowercase": bool(m.lowercase),
            "seq_len": m.seq_len, "pair_objective": m.pair_objective,
            "zero_stage": plan.zero_stage, "precision": plan.precision,
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "deepspeed_config": plan.ds_config_path.name}


def checkpointer(plan: Plan, engine: Engine, *, state: TrainState, loader: PretrainLoader,
                 last_saved: int | None, info: Callable[[str], None],
                 record: Callable[..., None] | None = None) -> Checkpointer:
    """The core's checkpointer; for a run folder in an object store, the one that uploads and
    commits there (bertscale.training.checkpoint.upload)."""
    c = plan.recipe.checkpoint
    args = (engine, plan.run_dir, Cadence(c.every, c.at_end, c.keep, c.check_free_space))
    kwargs: dict[str, Any] = dict(
        components={"train": state, "data": loader}, identity=run_identity(plan),
        total_steps=plan.recipe.train.steps, stop_at=plan.stop_at, last_saved=last_saved,
        info=info)
    if plan.store is not None:
        from bertscale.training.checkpoint.upload import StoreCheckpointer
        return StoreCheckpointer(*args, store=plan.store, record=record, **kwargs)
    return Checkpointer(*args, **kwargs)
