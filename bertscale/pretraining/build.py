"""What a pretraining run builds once, before its first step: the shard check, the run folder's
files, the model, the engine factory the resume path calls, and the loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bertscale import distributed
from bertscale.config import recipe_to_dict
from bertscale.errors import UserError
from bertscale.files import copy_atomic, write_json_atomic
from bertscale.pretraining.plan import Plan
from bertscale.seeding import seed_all
from bertscale.training.checkpoint.layout import VOCAB_FILE
from bertscale.training.deepspeed_engine import DeepSpeedFactory, mark_universal

if TYPE_CHECKING:
    import torch

    from bertscale.data.loader import MaskingConfig, PretrainLoader
    from bertscale.model import BertForPreTraining


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
        copy_atomic(Path(plan.manifest.vocab_file), plan.run_dir / VOCAB_FILE)
        write_json_atomic(plan.run_dir / "recipe.json", recipe_to_dict(plan.recipe))
        write_json_atomic(plan.run_dir / "deepspeed_config.json", plan.ds_config)


def model(plan: Plan) -> tuple[BertForPreTraining, torch.optim.Optimizer]:
    """The model (same initial weights on every rank: seeded identically first) and its
    optimizer; the weights of `train.init_from` if the run starts from them."""
    from bertscale import optim, perf
    from bertscale.model import BertForPreTraining
    from bertscale.parallelize import FastPaths, apply_fast_paths

    recipe, t = plan.recipe, plan.recipe.train
    seed_all(t.seed)
    fast = recipe.fast
    perf.set_tf32(fast.tf32)
    model = BertForPreTraining(plan.model_config)
    apply_fast_paths(model, FastPaths(
        unpad=fast.unpad, checkpoint_activations=fast.checkpoint_activations, compile=fast.compile))
    if plan.init_from is not None:
        plan.init_from.load_into(model)  # a bertscale run's or a Hugging Face folder's weights
    mark_universal(model)
    optimizer = optim.build_optimizer(recipe.optimizer, model)
    return model, optimizer


def engine_factory(plan: Plan, model: BertForPreTraining,
                   optimizer: torch.optim.Optimizer) -> DeepSpeedFactory:
    """The DeepSpeed engine of the plan, for bertscale.training.checkpoint.resume.restore, which
    decides how a checkpoint loads (a universal load needs its own config) before the engine
    exists."""
    from bertscale import optim

    recipe = plan.recipe
    return DeepSpeedFactory(
        model, optimizer, plan.ds_config,
        lambda opt: optim.build_scheduler(opt, recipe.schedule, recipe.train.steps),
        device_rank=distributed.local_device_index(plan.env), world_size=plan.env.world_size,
        fp16=plan.precision == "fp16", check_free_space=recipe.checkpoint.check_free_space)


def _masking(plan: Plan) -> MaskingConfig:
    from bertscale.data.loader import MaskingConfig

    d = plan.recipe.data
    return MaskingConfig(mask_prob=d.mask_prob, max_predictions_per_seq=d.max_predictions_per_seq,
                         whole_word=d.whole_word_masking)


def train_loader(plan: Plan) -> PretrainLoader:
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


def eval_loader(plan: Plan) -> PretrainLoader:
    """One pass over the first eval.samples of the eval split (see bertscale.pretraining.evaluator)."""
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import LoaderConfig, open_loader

    r, env = plan.recipe, plan.env
    micro = r.eval.micro_batch_size or r.train.micro_batch_size
    return open_loader(plan.manifest, LoaderConfig(
        split="eval", global_batch_size=micro * env.world_size, micro_batch_size=micro,
        rank=env.rank, world_size=env.world_size, seed=r.train.seed, masking=_masking(plan),
        verify_sha256=False, max_samples=r.eval.samples, fetch=FetchSettings.of(r.data)))
