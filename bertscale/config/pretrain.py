"""The pretraining recipe: one TOML file per recipe (bertscale/recipes/*.toml), its sections as
the classes below, validated before any process group starts.

Relative paths in a recipe are read from the directory the command runs in (like every other CLI
path). Two phases (the paper's 128 then 512 tokens) are two recipes: phase 2 names phase 1's run
folder in `train.init_from` and takes its final weights only, with its own optimizer, schedule,
batch and shards; each phase is then an ordinary, separately resumable and requeueable job with
its own run folder.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bertscale.config.model import ModelConfig, model_config_from
from bertscale.config.optim import OptimizerConfig, ScheduleConfig
from bertscale.config.schema import (apply_overrides, builtin_recipe, coerce, from_dict,
                                     load_toml, parse_override, to_dict)
from bertscale.errors import ConfigError


@dataclass
class DataSection:
    """Where the samples come from and how they are masked (the loader's knobs)."""

    manifest: str = "shards/manifest.json"
    """Manifest written by `bertscale prepare`: a local path, or a URL in an object store
    (``s3://bucket/prefix/seq128/manifest.json``, ``gs://…``, ``az://…``) whose shards are then
    read from the store through the node cache. Its train split is trained on, its eval split
    evaluated. Its tokenizer defines the vocabulary size unless model.vocab_size says more."""
    mask_prob: float = 0.15
    """Share of tokens masked per sequence (the paper: 15%)."""
    max_predictions_per_seq: int = 20
    """Cap on masked positions per sequence: 20 at 128 tokens, 80 at 512 (Google / NVIDIA)."""
    whole_word_masking: bool = False
    """Mask all WordPieces of a word together."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: read in the training process)."""
    bad_sample_policy: Literal["raise", "skip"] = "raise"
    """A corrupt shard or sample stops the run ("raise") or is skipped and counted ("skip")."""
    max_bad_samples: int = 100
    """With "skip": the run stops after this many bad samples."""
    verify_sha256: bool = True
    """Also check each local shard's sha256 against the manifest before training (a full read;
    sizes and sample counts are always checked, from the tar headers only). The ranks share the
    work (shard i is read by rank i mod world size), so the corpus is read once per job; a bad
    shard stops every rank with its name. Off, a damaged sample met mid-run still stops every
    rank at the same step with one line naming shard, sample and position. Remote shards are
    checked as they are fetched, whatever this says."""
    shard_base: str | None = None
    """Where the shards are when not beside the manifest (overrides the manifest's own
    shard_base): a folder, a store prefix (``s3://bucket/bert/seq128``, after copying the shards
    there yourself) or a template with ``{name}`` (``pipe:aws s3 cp s3://b/p/{name} -``). The
    data's identity (fingerprint) does not depend on it."""
    cache_dir: Path | None = None
    """Remote shards: the node-local folder every rank of a node shares (fetched once per node,
    kept across requeues). Default: $BERTSCALE_CACHE/shards, else ~/.cache/bertscale/shards.
    Must be a local disk (the per-shard locks are flock locks)."""
    cache_limit_gb: float = 0.0
    """Remote shards: the cache's size bound in GB (10^9 bytes), least recently used shards
    evicted first, never one of the current or next shuffle window; 0 = no bound. Must hold two
    shuffle windows (checked at start)."""
    prefetch: bool = True
    """Remote shards: download the next shuffle window's shards in the background while the
    current one trains. Off, a step waits for each new shard's transfer."""
    fetch_concurrency: int = 4
    """Remote shards: concurrent downloads per rank (threads)."""
    fetch_retries: int = 5
    """Remote shards: retries of a transient failure (reset connection, timeout, 5xx, short
    read), with backoff from 0.5 s doubling; a missing object or a sha256 mismatch fails at once."""


@dataclass
class TrainSection:
    """Length of the run, batch geometry, precision / ZeRO (through the DeepSpeed config)."""

    steps: int = 1000
    """Optimizer steps of this phase."""
    global_batch_size: int = 256
    """Sequences per optimizer step over all ranks. Kept exactly: gradient accumulation =
    global_batch_size / (micro_batch_size x world size), which must be a whole number."""
    micro_batch_size: int = 32
    """Sequences per forward/backward on one rank."""
    deepspeed: str = "zero2_bf16"
    """DeepSpeed JSON: a name from deepspeed_configs/ ("zero2_bf16", "zero3_fp32", ...) or a
    path. It decides ZeRO stage, precision, offload and clipping; the batch fields are derived
    from this section and injected (a JSON that sets them differently is an error)."""
    seed: int = 42
    """Seeds the model initialisation, the data order and masking, and dropout (0 to 2^32 - 1)."""
    init_from: Path | None = None
    """Phase 2: run folder (or checkpoint folder) of phase 1; its newest committed weights are
    loaded, nothing else (fresh optimizer, schedule and data position). Or a Hugging Face BERT
    folder, to continue pretraining it: its weights (heads it lacks start fresh), with the
    shards prepared with its vocabulary (`prepare --vocab FOLDER`) and the recipe in its shape."""
    max_loss_scale_skips: int = 50
    """Stop when this many optimizer updates in a row were skipped for gradient overflow (fp16:
    loss-scale collapse) instead of training on with a scale near zero. Skipped updates are not
    steps: they are logged and counted, and their samples count as consumed."""
    check_every: int = 10
    """Read the step statistics back from the devices at least every N steps (also at every
    log, eval and checkpoint step, and after a skipped update). A NaN/inf loss and a preemption
    signal are acted on at a read, every rank at the same step; between reads no step waits for
    the GPU. Smaller: a preemption is answered sooner; each read drains the GPU's queue once."""


@dataclass
class EvalSection:
    """Held-out evaluation: MLM accuracy, NSP accuracy and the losses on the eval split."""

    every: int = 1000
    """Evaluate every N optimizer steps (0: only at the end)."""
    samples: int = 0
    """Held-out samples per evaluation: the first N of the eval split in stored order, the same
    samples whatever the number of ranks (0: the whole eval split)."""
    micro_batch_size: int = 0
    """Sequences per eval forward on one rank (0: the training micro batch)."""
    at_start: bool = False
    """Also evaluate before the first step (the untrained baseline)."""


@dataclass
class CheckpointSection:
    """Checkpoints in <run>/checkpoints/step_<N>/, each committed atomically."""

    every: int = 1000
    """Save every N optimizer steps (0: only at the end and on preemption)."""
    keep: int = 2
    """Committed checkpoints kept (older ones are deleted after each commit); at least 2."""
    at_end: bool = True
    """Save when the last step is done."""
    check_free_space: bool = True
    """Before each save, check that the checkpoint filesystem has room for one more checkpoint
    (the previous one's size), and before a resume's universal conversion room for the copy, and
    stop with a clear message if not. Turn off only where the filesystem reports free space
    wrongly; a write that fails is reported the same way."""


@dataclass
class LoggingSection:
    """Where the numbers go."""

    every: int = 10
    """Log a training line / metrics record every N optimizer steps."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """A redrawn progress bar on a terminal, plain lines otherwise ("auto")."""
    wandb: bool = True
    """Log to Weights & Biases (offline when there is no API key; never stops training)."""
    wandb_project: str = "bertscale"
    """W&B project name."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """"auto": online when an API key is configured, offline otherwise."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <run>/tensorboard (needs the tensorboard package)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of ONE device in the training precision, for MFU (H100 SXM bf16:
    989; A100 bf16: 312). 0: the CUDA device's datasheet peak when bertscale.perf knows it
    (H100, H200, A100), else MFU is not reported."""


@dataclass
class FastSection:
    """Speed-ups of the model (bertscale.parallelize.FastPaths). Only pad_vocab_multiple changes the
    parameters (rows no token reaches; export drops them), so exports are the same with or
    without any of them. Each has a parity test."""

    unpad: bool = False
    """Run the encoder on the real tokens only (phase 2 and short documents); attention per
    sequence, or the variable-length flash kernel on CUDA."""
    checkpoint_activations: bool = False
    """Recompute each encoder layer in the backward: less memory for a larger micro batch
    (phase 2 at 512 tokens)."""
    compile: bool = False
    """torch.compile each encoder layer; falls back to eager with one warning if it fails."""
    tf32: bool = False
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores (about 8x the fp32 rate on
    A100/H100, 10-bit mantissa inputs, fp32 accumulation). No effect on the CPU, nor on what
    already runs in bf16/fp16."""
    pad_vocab_multiple: int = 1
    """Round the word-embedding / MLM-decoder rows up to a multiple of this (NVIDIA pads 30,522
    to 30,528, a multiple of 8; 64 fills whole tensor-core tiles of the decoder matmul). The
    padded rows are never predicted: the MLM loss and accuracy use the tokenizer's vocabulary
    only, so the loss equals the unpadded model's; `export` writes the real vocabulary size.
    1: no padding. Ignored when [model] sets vocab_size itself."""


@dataclass
class DebugSection:
    """Fault injection for tests of the failure paths."""

    nan_loss_at_step: int = 0
    """Turn the loss of this optimizer step (1-based) into NaN on rank 0 (0: off)."""
    overflow_at_steps: list[int] = field(default_factory=list)
    """Make one gradient inf (on rank 0) while the update that would become each of these steps
    (1-based) is computed, so that DeepSpeed skips it as after an fp16 overflow; a step listed
    k times is skipped k times. ZeRO-1/2 (any precision); for tests of the step accounting."""
    forbid_host_syncs: bool = False
    """CUDA: fail the run when the step code between reads waits for the GPU (a sync such as
    `.item()` or `torch.cuda.synchronize()`); the reads and DeepSpeed's optimizer update are
    outside the check. For the GPU test of the sync-free step."""


MAX_SEED = 2**32 - 1
"""The largest train.seed: numpy's generators take seeds in [0, 2**32)."""
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"
"""Characters W&B refuses in a project name."""


@dataclass
class PretrainRecipe:
    """A whole pretraining job: model, data, optimizer, schedule, batch, eval, checkpoints."""

    name: str
    """Run name (W&B run, default run folder runs/<name>)."""
    model: ModelConfig
    """[model]: a preset name or a table with an optional `preset` and field overrides."""
    data: DataSection
    optimizer: OptimizerConfig
    """[optimizer]: AdamW or LAMB, lr, betas, eps, decay."""
    schedule: ScheduleConfig
    """[schedule]: warmup, linear / poly / constant decay."""
    train: TrainSection
    eval: EvalSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    debug: DebugSection
    fast: FastSection = field(default_factory=FastSection)
    """[fast]: the model's optional fast paths."""
    run_dir: Path | None = None
    """Run folder (checkpoints, metrics, logs); default runs/<name>."""
    vocab_size_explicit: bool = False
    """Whether [model] set vocab_size itself (else it is taken from the manifest's vocabulary)."""

    # Over ruff's complexity limit on purpose: one check per cross-field rule of a recipe, each with
    # its message.
    def validate(self) -> None:  # noqa: C901
        """Checks that need nothing but the recipe (the world size and the data come later)."""
        self.model.validate()
        t = self.train
        for name in ("steps", "global_batch_size", "micro_batch_size"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                              f"train.micro_batch_size {t.micro_batch_size}")
        if not 0.0 < self.data.mask_prob < 1.0:
            raise ConfigError(f"data.mask_prob must be in (0, 1), got {self.data.mask_prob}")
        if self.data.max_predictions_per_seq <= 0:
            raise ConfigError(f"data.max_predictions_per_seq must be positive, got "
                              f"{self.data.max_predictions_per_seq}")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        for where, value in (("data.cache_limit_gb", self.data.cache_limit_gb),
                             ("data.fetch_retries", self.data.fetch_retries)):
            if value < 0:
                raise ConfigError(f"{where} must be >= 0, got {value}")
        if self.data.fetch_concurrency < 1:
            raise ConfigError(f"data.fetch_concurrency must be >= 1, got "
                              f"{self.data.fetch_concurrency}")
        if self.checkpoint.keep < 2:
            raise ConfigError(f"checkpoint.keep must be at least 2 (a crash during a save must "
                              f"leave a committed one), got {self.checkpoint.keep}")
        for where, value in (("eval.every", self.eval.every), ("eval.samples", self.eval.samples),
                             ("eval.micro_batch_size", self.eval.micro_batch_size),
                             ("checkpoint.every", self.checkpoint.every),
                             ("debug.nan_loss_at_step", self.debug.nan_loss_at_step),
                             ("logging.peak_tflops", self.logging.peak_tflops)):
            if value < 0:
                raise ConfigError(f"{where} must be >= 0, got {value}")
        if any(s <= 0 for s in self.debug.overflow_at_steps):
            raise ConfigError(f"debug.overflow_at_steps must hold positive step numbers, got "
                              f"{self.debug.overflow_at_steps}")
        if self.fast.pad_vocab_multiple <= 0:
            raise ConfigError(f"fast.pad_vocab_multiple must be positive (1: no padding), got "
                              f"{self.fast.pad_vocab_multiple}")
        if self.logging.every <= 0:
            raise ConfigError(f"logging.every must be positive, got {self.logging.every}")
        if t.check_every <= 0:
            raise ConfigError(f"train.check_every must be positive, got {t.check_every}")
        if t.max_loss_scale_skips <= 0:
            raise ConfigError(f"train.max_loss_scale_skips must be positive, got {t.max_loss_scale_skips}")
        if not 0 <= t.seed <= MAX_SEED:  # numpy's generators take [0, 2**32)
            raise ConfigError(f"train.seed must be in [0, {MAX_SEED}], got {t.seed}")
        if self.data.max_bad_samples < 0:
            raise ConfigError(f"data.max_bad_samples must be >= 0, got {self.data.max_bad_samples}")
        if not self.name.strip():
            raise ConfigError("name must not be empty (it names the run and its default folder "
                              "runs/<name>)")
        bad = [c for c in self.logging.wandb_project if c in WANDB_PROJECT_FORBIDDEN]
        if not self.logging.wandb_project.strip() or bad or len(self.logging.wandb_project) > 128:
            raise ConfigError(f"logging.wandb_project = {self.logging.wandb_project!r}: W&B "
                              f"project names are 1 to 128 characters without any of "
                              f"{' '.join(WANDB_PROJECT_FORBIDDEN)}")


_RECIPE_SECTIONS: dict[str, type] = {
    "data": DataSection, "train": TrainSection, "eval": EvalSection,
    "checkpoint": CheckpointSection, "logging": LoggingSection, "debug": DebugSection,
    "fast": FastSection,
}


def load_pretrain_recipe(source: str | Path | dict[str, Any],
                         overrides: list[str] | None = None) -> PretrainRecipe:
    """A recipe from a TOML file, a built-in recipe name, or a dict, with `a.b=value` overrides.
    Every error names the file and the field."""
    if isinstance(source, dict):
        data, origin, default_name = dict(source), "recipe", "run"
    else:
        path = Path(source)
        if not path.is_file() and path.suffix != ".toml" and "/" not in str(source):
            path = builtin_recipe(str(source))
        data, origin, default_name = load_toml(path), str(path), path.stem
    as_written = copy.deepcopy(data)
    data = apply_overrides(data, list(overrides or []))
    try:
        if isinstance(data.get("eval"), dict) and "max_batches" in data["eval"]:
            raise ConfigError("eval.max_batches was replaced by eval.samples: a number of global "
                              "batches scores a different number of samples on each number of "
                              "ranks; set eval.samples = batches x eval micro batch x ranks of "
                              "the old setting")
        allowed = {"name", "run_dir", "model", "optimizer", "schedule", *_RECIPE_SECTIONS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown section or field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        if "model" not in data:
            raise ConfigError("missing [model] section (a preset name or a table)")
        model_raw = data["model"]
        model = model_config_from(model_raw)
        sections: dict[str, Any] = {key: from_dict(cls, data.get(key, {}), key)
                                    for key, cls in _RECIPE_SECTIONS.items()}
        if "optimizer" not in data:
            raise ConfigError("missing [optimizer] section (name, lr, ...)")
        recipe = PretrainRecipe(
            name=coerce(str, data.get("name", default_name), "name"),
            model=model,
            optimizer=from_dict(OptimizerConfig, data["optimizer"], "optimizer"),
            schedule=from_dict(ScheduleConfig, data.get("schedule", {}), "schedule"),
            run_dir=coerce(Path | None, data.get("run_dir"), "run_dir"),
            vocab_size_explicit=isinstance(model_raw, dict) and "vocab_size" in model_raw,
            **sections)
        recipe.validate()
        recipe.optimizer.validate()
        recipe.schedule.validate()
    except ConfigError as e:
        raise ConfigError(f"{_blame(str(e), origin, list(overrides or []), as_written)}: {e}") \
            from None
    return recipe


def _blame(message: str, origin: str, overrides: list[str], as_written: dict[str, Any]) -> str:
    """Where a recipe error comes from, for its message: the `--set` overrides whose field it
    names; else, when the recipe loads without the overrides, all of them; else the recipe."""
    if not overrides:
        return origin
    named = [o for o in overrides
             if re.search(rf"(?<![\w.]){re.escape('.'.join(parse_override(o)[0]))}(?!\w)", message)]
    if not named:
        try:
            load_pretrain_recipe(as_written)
        except ConfigError:
            return origin
        named = overrides
    return f"{', '.join(f'--set {o}' for o in named)} (over {origin})"


def recipe_to_dict(recipe: PretrainRecipe) -> dict[str, Any]:
    """The recipe as plain data (for checkpoints, logs and W&B), in its TOML layout."""
    out: dict[str, Any] = to_dict(recipe)
    out.pop("vocab_size_explicit", None)
    return out
