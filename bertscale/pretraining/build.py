"""What a pretraining run builds once, before its first step: the shard check, the run folder's
files, the engine factory the resume path calls, and the loaders.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from bertscale import checkpoint as ckpt_lib
from bertscale import distributed
from bertscale.config import recipe_to_dict
from bertscale.errors import UserError
from bertscale.files import copy_atomic, write_json_atomic
from bertscale.pretraining.plan import Plan


def check_shards(plan: Plan) -> None:
    """The shards are the manifest's: sizes and sample counts (tar headers only), and with
    data.verify_sha256 the hashes. Each rank checks its share (the corpus is read once per job,
    not once per rank), and every rank stops with the same message if one is bad. Collective."""
    from bertscale.data.loader import verify_shards

    env = plan.env
    problems = distributed.gather_problems(
        [msg for split in ("train", "eval")
         for msg in verify_shards(plan.manifest, split, env.rank, env.world_size,
                                  sha256=plan.recipe.data.verify_sha256)])
    if problems:
        more = f" (and {len(problems) - 1} more bad shards)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


def write_run_files(plan: Plan) -> None:
    """The run folder's vocabulary, resolved recipe and DeepSpeed JSON (rank 0)."""
    if plan.env.is_main:
        copy_atomic(Path(plan.manifest.vocab_file), plan.run_dir / ckpt_lib.VOCAB_FILE)
        write_json_atomic(plan.run_dir / "recipe.json", recipe_to_dict(plan.recipe))
        write_json_atomic(plan.run_dir / "deepspeed_config.json", plan.ds_config)


def engine_builder(plan: Plan, model: Any, optimizer: Any) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """`build(ds_config) -> (engine, scheduler)` for bertscale.resume.restore, which chooses the
    DeepSpeed config (a universal load needs its own) before the engine exists."""
    import deepspeed

    from bertscale import optim

    recipe = plan.recipe

    def build(ds_config: dict[str, Any]) -> tuple[Any, Any]:
        engine, _, _, scheduler = deepspeed.initialize(
            # The device is local_rank modulo the visible GPUs, not DeepSpeed's LOCAL_RANK as is.
            args=argparse.Namespace(device_rank=distributed.local_device_index(plan.env)),
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: optim.build_scheduler(opt, recipe.schedule, recipe.train.steps))
        optim.make_zero_aware(optimizer, engine)  # LAMB: trust ratios per original tensor under ZeRO
        return engine, scheduler

    return build


def _masking(plan: Plan) -> Any:
    from bertscale.data.loader import MaskingConfig

    d = plan.recipe.data
    return MaskingConfig(mask_prob=d.mask_prob, max_predictions_per_seq=d.max_predictions_per_seq,
                         whole_word=d.whole_word_masking)


def train_loader(plan: Plan) -> Any:
    """This rank's train stream from position 0; a resume moves it (`load_state_dict`): the
    loader alone holds the data position."""
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import LoaderConfig, open_loader

    r, t, env = plan.recipe, plan.recipe.train, plan.env
    return open_loader(plan.manifest, LoaderConfig(
        split="train", global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, rank=env.rank, world_size=env.world_size,
        seed=t.seed, masking=_masking(plan), num_workers=r.data.num_workers,
        bad_sample_policy=r.data.bad_sample_policy, max_bad_samples=r.data.max_bad_samples,
        verify_sha256=False,  # check_shards did, a share per rank
        fetch=FetchSettings.of(r.data)))


def eval_loader(plan: Plan) -> Any:
    """One pass over the first eval.samples of the eval split (see bertscale.pretraining.evaluator)."""
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import LoaderConfig, open_loader

    r, env = plan.recipe, plan.env
    micro = r.eval.micro_batch_size or r.train.micro_batch_size
    return open_loader(plan.manifest, LoaderConfig(
        split="eval", global_batch_size=micro * env.world_size, micro_batch_size=micro,
        rank=env.rank, world_size=env.world_size, seed=r.train.seed, masking=_masking(plan),
        verify_sha256=False, max_samples=r.eval.samples, fetch=FetchSettings.of(r.data)))
