"""The plan of a pretraining run: everything it needs to know, checked before a process group
exists, so that a bad recipe, batch, manifest or resume fails in seconds with one clear message
instead of N tracebacks.

`build_plan` reads the manifest, sizes the vocabulary, reads the DeepSpeed JSON and injects the
batch fields (`deepspeed_config`, the gradient accumulation that keeps the global batch at this
world size: `plan_batch`), picks the checkpoint a resume continues (bertscale.training.checkpoint.
resume: find, check_identity) or the weights `train.init_from` starts from, and makes sure the run folder can be written. It
runs on every rank with the same files, so every rank reaches the same verdict without talking.

`train.init_from` is a bertscale run or checkpoint folder (phase 2 after phase 1), or a Hugging
Face BERT folder (continued pretraining from a published checkpoint: `BertForPreTraining`,
`BertForMaskedLM` or an encoder alone, safetensors or bin). Either must have the recipe's shape
and the shards' tokenizer (for a Hugging Face folder: its vocab.txt and casing, which
`prepare --vocab FOLDER` takes); the parts a folder lacks (an encoder-only folder's MLM and NSP
heads and pooler) start fresh, and the run's first lines name them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertscale import distributed
from bertscale.config import ModelConfig, PretrainRecipe, padded_vocab_size, recipe_to_dict
from bertscale.errors import ConfigError, UserError
from bertscale.training.checkpoint import layout
from bertscale.training.checkpoint import resume as resume_lib
from bertscale.training.checkpoint.consolidated import load_consolidated
from bertscale.training.checkpoint.state import read_state

# The built-in DeepSpeed JSONs ship inside the package (bertscale/deepspeed_configs: in the
# repository a symlink to the top-level deepspeed_configs/, in a wheel the files themselves), so
# an installed bertscale finds them from any folder. BERTSCALE_DEEPSPEED_CONFIGS points elsewhere.
DEEPSPEED_CONFIG_DIR = Path(os.environ.get("BERTSCALE_DEEPSPEED_CONFIGS",
                                           Path(__file__).parent.parent / "deepspeed_configs"))
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "max_position_embeddings", "type_vocab_size", "hidden_act")
_PARTS = (("bert.pooler.", "pooler"), ("cls.predictions.", "MLM head"),
          ("cls.seq_relationship.", "NSP head"))


@dataclass
class InitFrom:
    """The weights a run starts from (`train.init_from`)."""

    path: Path
    """A bertscale checkpoint folder (step_N), or a Hugging Face folder."""
    kind: str
    """"bertscale" | "huggingface"."""
    step: int | None = None
    """The bertscale checkpoint's step."""
    architecture: str | None = None
    """A Hugging Face folder's architecture (config.json's architectures[0])."""
    fresh: list[str] = field(default_factory=list)
    """After `load_into`: the pooler / MLM / NSP parts the weights lacked (fresh init)."""

    def load_into(self, model: Any) -> None:
        """Copy the weights into a freshly initialised BertForPreTraining (every rank)."""
        from bertscale.model import load_pretrained

        source = f"train.init_from {self.path}"
        if self.kind == "bertscale":
            weights = load_consolidated(self.path)
            load_pretrained(model, weights.state_dict, source=source)
            return
        from bertscale.hf import load_hf_folder, pad_vocab_rows
        ck = load_hf_folder(self.path)
        state = pad_vocab_rows(ck.state_dict, model.state_dict())
        missing = load_pretrained(model, state, source=source, warn=False)
        self.fresh = [name for prefix, name in _PARTS if any(k.startswith(prefix) for k in missing)]

    def describe(self) -> str:
        """The run's opening line about its weights."""
        if self.kind == "bertscale":
            return f"initialised from {self.path} (step {self.step} weights)"
        loaded = [name for _, name in _PARTS if name not in self.fresh]
        fresh = (f"; {', '.join(self.fresh)} initialised fresh (not in the folder)"
                 if self.fresh else "")
        return (f"initialised from the Hugging Face {self.architecture} folder {self.path}: "
                f"encoder{''.join(', ' + n for n in loaded)} loaded{fresh}")


def resolve_init_from(path: Path, model: ModelConfig, tokenizer_hash: str) -> InitFrom:
    """`train.init_from` checked against the recipe's model and the shards' tokenizer, before
    any process group: a mismatch is one line saying what to change."""
    from bertscale import hf

    if not hf.is_hf_folder(path):
        try:
            committed = layout.resolve(path)
        except UserError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        resume_lib.check_compatible(read_state(committed).run, tokenizer_hash=tokenizer_hash,
                                    manifest_fingerprint=None, model_config=model,
                                    where=f"train.init_from {committed.path}")
        return InitFrom(committed.path, "bertscale", step=committed.step)
    from bertscale.tokenizer import vocab_hash

    theirs, architecture = hf.read_hf_config(path)
    diff = [k for k in _SHAPE if getattr(theirs, k) != getattr(model, k)]
    if diff:
        shown = "; ".join(f"{k} {getattr(model, k)} vs {getattr(theirs, k)}" for k in diff)
        sets = " ".join(f"--set model.{k}={getattr(theirs, k)!r}".replace("'", '"') for k in diff)
        raise ConfigError(f"train.init_from {path}: the recipe's model differs from its "
                          f"config.json ({shown}); give the recipe the checkpoint's shape: {sets}")
    vocab, lowercase = hf.tokenizer_of_folder(path)
    if vocab_hash(vocab, lowercase) != tokenizer_hash:
        raise UserError(f"train.init_from {path}: the shards were prepared with another tokenizer "
                        f"than the checkpoint's ({vocab}, {'un' if lowercase else ''}cased); "
                        f"prepare them with `bertscale prepare --vocab {path} …`")
    if theirs.vocab_size > model.vocab_size:
        raise ConfigError(f"train.init_from {path}: config.json has vocab_size "
                          f"{theirs.vocab_size}, more than the model's {model.vocab_size}; set "
                          f"model.vocab_size = {theirs.vocab_size}")
    return InitFrom(path, "huggingface", architecture=architecture)


@dataclass
class Plan:
    recipe: PretrainRecipe
    env: distributed.DistEnv
    run_dir: Path
    manifest: Any                      # bertscale.data.shards.Manifest
    model_config: ModelConfig
    tokenizer_hash: str
    ds_config: dict[str, Any]          # what deepspeed.initialize gets, batch fields injected
    ds_config_path: Path
    precision: str                     # "fp32" | "bf16" | "fp16"
    zero_stage: int
    grad_accum: int
    resume_from: resume_lib.ResumePoint | None
    init_from: InitFrom | None
    stop_at_step: int | None
    store: Any = None
    """The object store the run folder lives in (training.checkpoint.store.RunStore), None for a
    local run folder; `run_dir` is then its node-local staging copy."""

    @property
    def stop_at(self) -> int:
        """The step this process trains to: `train.steps`, or `--stop-at-step` if sooner."""
        steps = self.recipe.train.steps
        return min(steps, self.stop_at_step) if self.stop_at_step else steps


def plan_batch(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation steps that keep `global_batch` on `world_size` ranks.

    global_batch = micro_batch x accumulation x world_size must hold exactly; otherwise the
    error says which world sizes would work for this global and micro batch.
    """
    for name, value in (("global batch", global_batch), ("micro batch", micro_batch),
                        ("world size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if global_batch % micro_batch:
        micro_ok = [m for m in range(1, min(global_batch, 4 * micro_batch) + 1) if global_batch % m == 0]
        raise ConfigError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch}, so no "
            f"number of ranks can keep it; micro batches that divide it: "
            f"{', '.join(map(str, micro_ok))}")
    per_micro = global_batch // micro_batch
    if per_micro % world_size:
        raise ConfigError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} x "
            f"{world_size} ranks; with micro batch {micro_batch} it works on "
            f"{_describe_world_sizes(per_micro, world_size)} ranks (or change the micro batch)")
    return per_micro // world_size


def workable_world_sizes(global_batch: int, micro_batch: int, limit: int = 1024) -> list[int]:
    """Every world size up to `limit` on which `global_batch` splits into whole micro batches."""
    if global_batch % micro_batch:
        return []
    per_micro = global_batch // micro_batch
    return [w for w in range(1, min(per_micro, limit) + 1) if per_micro % w == 0]


def _describe_world_sizes(per_micro: int, requested: int) -> str:
    sizes = workable_world_sizes(per_micro, 1)
    if len(sizes) > 12:
        # Many divisors: the ones near the request matter, plus the nearest one above 2x.
        near = [w for w in sizes if w <= 2 * requested]
        above = [w for w in sizes if w > 2 * requested][:1]
        return ", ".join(map(str, near + above)) + ", ..."
    return ", ".join(map(str, sizes))


def resolve_deepspeed_config(value: str) -> Path:
    """A DeepSpeed JSON given by path, or by name: ./deepspeed_configs/NAME.json (a user's edited
    copy in the current folder) first, then the built-in DEEPSPEED_CONFIG_DIR/NAME.json."""
    path = Path(value)
    candidates = [path] if path.suffix == ".json" or "/" in value else []
    candidates += [Path("deepspeed_configs") / f"{value}.json", DEEPSPEED_CONFIG_DIR / f"{value}.json"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
    builtin = f"built-in configs: {', '.join(known)}" if known else f"no built-in configs in {DEEPSPEED_CONFIG_DIR}"
    raise ConfigError(f"train.deepspeed = {value!r}: no such file; {builtin}")


def deepspeed_config(recipe: PretrainRecipe, world_size: int,
                     cuda: bool) -> tuple[dict[str, Any], Path, str, int, int]:
    """Read the DeepSpeed JSON and inject the batch fields derived from the recipe."""
    t = recipe.train
    path = resolve_deepspeed_config(t.deepspeed)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    # The global batch is the recipe's at every world size (also after an elastic resume);
    # when it cannot be split, the error lists the world sizes that would work.
    try:
        accum = plan_batch(t.global_batch_size, t.micro_batch_size, world_size)
    except ConfigError as e:
        raise ConfigError(f"train.global_batch_size / train.micro_batch_size: {e}") from None
    derived = dict(zip(_BATCH_KEYS, (t.global_batch_size, t.micro_batch_size, accum)))
    for key, value in derived.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            raise ConfigError(f"{path}: sets {key} = {cfg[key]}, but the recipe gives {value} "
                              f"(global {t.global_batch_size} = micro {t.micro_batch_size} x accumulation "
                              f"{accum} x {world_size} ranks); remove the batch fields from the JSON")
    for key, section in (("optimizer", "[optimizer]"), ("scheduler", "[schedule]")):
        if key in cfg:
            raise ConfigError(f"{path}: has a {key!r} section; the recipe's {section} defines it "
                              f"(remove it from the JSON)")
    cfg.update(derived)
    fp16 = bool(cfg.get("fp16", {}).get("enabled", False))
    bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError(f"{path}: enables both fp16 and bf16")
    if fp16 and not cuda:
        raise ConfigError(f"{path}: enables fp16, which DeepSpeed supports only on GPUs; on the CPU "
                          f"use a bf16 or fp32 config (e.g. train.deepspeed = "
                          f"\"{path.stem.replace('fp16', 'bf16')}\")")
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    # A client (torch) optimizer under ZeRO is "untested" in DeepSpeed's words; ours are tested.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed's throughput timer, on by default, calls torch.cuda.synchronize() at every
    # forward and every engine.step(): a drained GPU queue per micro-batch. The trainer times
    # its steps itself, between reads (bertscale.pretraining.metrics).
    cfg.setdefault("timers", {"throughput": {"enabled": False}})
    return cfg, path, "fp16" if fp16 else "bf16" if bf16 else "fp32", stage, accum


def build_plan(recipe: PretrainRecipe, env: distributed.DistEnv, run_dir: Path, resume: str,
               stop_at_step: int | None = None) -> Plan:
    import torch

    from bertscale.data.shards import read_manifest

    _check_paths(recipe)
    try:
        manifest = read_manifest(recipe.data.manifest, shard_base=recipe.data.shard_base,
                                 cache_dir=recipe.data.cache_dir)
    except ConfigError:
        raise
    except UserError as e:
        raise ConfigError(f"data.manifest: {e}") from None
    model = _model_for(recipe, manifest)
    _check_against_data(recipe, manifest, env)
    _check_recipe(recipe)
    ds_config, ds_path, precision, stage, accum = deepspeed_config(
        recipe, env.world_size, cuda=torch.cuda.is_available())

    # Resume: the newest committed checkpoint of this run folder, if it is the same run. The
    # manifest's tokenizer hash is the tokenizer's identity for resumes and init_from.
    tokenizer_hash = manifest.tokenizer_hash
    resume_point = resume_lib.find(run_dir, resume, {"train": ("step",),
                                                     "data": ("consumed_samples",)})
    if resume_point is not None:
        resume_point = resume_lib.check_identity(resume_point, resume_lib.Identity(
            tokenizer_hash, manifest.fingerprint, model, recipe_to_dict(recipe), stage, precision))
    init_from = None
    if recipe.train.init_from is not None and resume_point is None:
        init_from = resolve_init_from(Path(recipe.train.init_from), model, tokenizer_hash)
    _check_run_folder(run_dir, Path(manifest.vocab_file))
    return Plan(recipe, env, run_dir, manifest, model, tokenizer_hash, ds_config, ds_path,
                precision, stage, accum, resume_point, init_from, stop_at_step)


def _model_for(recipe: PretrainRecipe, manifest: Any) -> ModelConfig:
    """The recipe's model, its vocabulary sized to the manifest's unless the recipe sets it."""
    import dataclasses

    vocab_file, vocab_size = Path(manifest.vocab_file), manifest.vocab_size
    model = recipe.model
    if not recipe.vocab_size_explicit:
        model = dataclasses.replace(model, vocab_size=padded_vocab_size(
            vocab_size, recipe.fast.pad_vocab_multiple))
    elif model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size {model.vocab_size} is smaller than the manifest's "
                          f"vocabulary ({vocab_size} tokens in {vocab_file})")
    if manifest.pair_objective in ("nsp", "sop") and model.type_vocab_size < 2:
        raise ConfigError(f"model.type_vocab_size = {model.type_vocab_size}, but the shards of "
                          f"{manifest.path} hold sentence pairs ({manifest.pair_objective}), "
                          f"whose segments A and B need 2 token types")
    if manifest.seq_len > model.max_position_embeddings:
        raise ConfigError(f"the shards hold {manifest.seq_len}-token sequences but "
                          f"model.max_position_embeddings is {model.max_position_embeddings}")
    return model


def _check_against_data(recipe: PretrainRecipe, manifest: Any, env: distributed.DistEnv) -> None:
    """The batch, eval and masking settings against what the shards hold."""
    if manifest.num_samples("train") < recipe.train.global_batch_size:
        raise UserError(f"{manifest.path}: the train split has {manifest.num_samples('train')} samples, "
                        f"fewer than one global batch ({recipe.train.global_batch_size})")
    if manifest.num_samples("eval") == 0:
        raise UserError(f"{manifest.path}: the eval split has no samples (prepare with an "
                        f"eval fraction above 0)")
    if recipe.eval.samples > manifest.num_samples("eval") and env.is_main:
        # Still the same samples on any number of ranks: all of them.
        print(f"warning: eval.samples = {recipe.eval.samples}, but the eval split of "
              f"{manifest.path} has {manifest.num_samples('eval')} samples: evaluating on all of "
              f"them", file=sys.stderr, flush=True)
    # A sequence of T tokens has T - 3 maskable tokens ([CLS] and two [SEP]) at most.
    maskable = manifest.seq_len - 3
    if recipe.data.max_predictions_per_seq > maskable:
        raise ConfigError(f"data.max_predictions_per_seq = {recipe.data.max_predictions_per_seq} "
                          f"is more than the {maskable} maskable tokens of a {manifest.seq_len}-token "
                          f"sequence in {manifest.path} (the paper: 20 at 128, 80 at 512)")


def _check_recipe(recipe: PretrainRecipe) -> None:
    """What the recipe asks of the schedule and the installed packages."""
    from bertscale.optim import warmup_steps
    if warmup_steps(recipe.schedule, recipe.train.steps) > recipe.train.steps:
        raise ConfigError(f"schedule.warmup {recipe.schedule.warmup} is longer than train.steps "
                          f"{recipe.train.steps}")
    if recipe.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("logging.tensorboard = true (--tensorboard) needs the tensorboard "
                              "package: pip install 'bertscale[tensorboard]'") from None


def _not_a_folder(path: Path) -> Path | None:
    """The first part of `path` that exists and is not a folder (so `path` cannot be one)."""
    for p in [path, *path.parents]:
        if p.exists():
            return None if p.is_dir() else p
    return None


def _check_paths(recipe: PretrainRecipe) -> None:
    """The recipe's local folders can be what they are meant to be (read or made later)."""
    from bertscale.data import remote

    d = recipe.data
    base = d.shard_base
    if base and not remote.is_remote(base) and "{name}" not in base and not Path(base).is_dir():
        raise ConfigError(f"data.shard_base = {base!r}: folder not found")
    if d.cache_dir is not None:
        blocker = _not_a_folder(Path(d.cache_dir))
        if blocker is not None:
            raise ConfigError(f"data.cache_dir = {str(d.cache_dir)!r}: {blocker} is not a folder")


def _check_run_folder(run_dir: Path, vocab_file: Path) -> None:
    """The run folder exists, is writable, and was not started with another vocabulary."""
    run_vocab = run_dir / layout.VOCAB_FILE
    if run_vocab.is_file() and run_vocab.read_bytes() != vocab_file.read_bytes():
        raise UserError(f"{run_vocab}: this run folder was started with another vocabulary than "
                        f"{vocab_file}; use a new --run-dir")
    blocker = _not_a_folder(run_dir)
    if blocker is not None:
        raise ConfigError(f"run folder {run_dir} (--run-dir, or the recipe's run_dir): {blocker} "
                          f"is not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"{run_dir}: run folder is not writable")
