"""Typed configuration: dataclasses, presets, TOML recipes and command-line overrides.

Every field has a docstring-style comment beside it; `docs/configuration.md` is generated from
these classes, so they are the single source of truth. Validation happens here, before any
process group starts, and every error names the field and what would be accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from bertscale.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Shape of the BERT encoder. Field names follow Google's / Hugging Face's bert_config.json,
    so a Hugging Face config.json maps onto this class key for key."""

    vocab_size: int = 30522
    """WordPiece vocabulary size (the embedding and MLM decoder rows)."""
    hidden_size: int = 768
    """Width H of every layer."""
    num_hidden_layers: int = 12
    """Number of Transformer layers L."""
    num_attention_heads: int = 12
    """Attention heads A; hidden_size must be divisible by it."""
    intermediate_size: int = 3072
    """Feed-forward inner width (4H in the paper)."""
    hidden_act: Literal["gelu", "gelu_new", "relu"] = "gelu"
    """Feed-forward activation. "gelu" is the exact erf form Google's release uses."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings, attention output and feed-forward output."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on the attention probabilities."""
    max_position_embeddings: int = 512
    """Learned absolute positions; the longest sequence the model accepts."""
    type_vocab_size: int = 2
    """Segment (token type) embeddings: A and B (at least 2 for NSP or SOP shards)."""
    initializer_range: float = 0.02
    """Std of the truncated normal used for every weight matrix (positive)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon, positive (Google's release uses 1e-12)."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row is not special-cased beyond initialisation."""

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"model.num_attention_heads {self.num_attention_heads}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {p}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"model.pad_token_id {self.pad_token_id} is outside the vocabulary "
                              f"(size {self.vocab_size})")
        # The std of the weights' truncated normal, and the LayerNorm epsilon under a square
        # root: zero or negative is a crash at initialisation, or NaN from the first step.
        for name in ("initializer_range", "layer_norm_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"model.{name} must be positive, got {v}")


# (layers, hidden, heads); intermediate is 4 x hidden as in the paper and Turc et al. 2019.
# The Hugging Face architectures a checkpoint can be exported as / read from (config.json's
# "architectures"), each with the key prefixes of its head. Here rather than in hf.py so
# that argument parsers can list them without importing torch.
HEADS: dict[str, tuple[str, ...]] = {
    "BertModel": (),
    "BertForPreTraining": ("cls.predictions.", "cls.seq_relationship."),
    "BertForMaskedLM": ("cls.predictions.",),
    "BertForNextSentencePrediction": ("cls.seq_relationship.",),
    "BertForSequenceClassification": ("classifier.",),
    "BertForMultipleChoice": ("classifier.",),
    "BertForTokenClassification": ("classifier.",),
    "BertForQuestionAnswering": ("qa_outputs.",),
}

_PRESET_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}
PRESETS = tuple(_PRESET_SHAPES)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The paper's BERT-Base / BERT-Large, or a small size from Turc et al. 2019."""
    if name not in _PRESET_SHAPES:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    layers, hidden, heads = _PRESET_SHAPES[name]
    cfg = ModelConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      intermediate_size=4 * hidden)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------ generic machinery


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a plain dict, checking names and types.

    `where` is the dotted path used in error messages ("train.optimizer").
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown field {name!r}; allowed: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


# Over ruff's complexity limit on purpose: one branch per supported field type.
def _coerce(tp: Any, value: Any, name: str) -> Any:  # noqa: C901
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name} = {value!r} is not allowed; choose one of "
                              f"{', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
                if isinstance(arg, type) and type(value) is arg:
                    raise  # the value has this type: its own complaint says what is wrong
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{name} = {value!r} matches none of the accepted types")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # No field wants NaN or infinity, and TOML writes both (`nan`, `inf`).
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (Paths as strings), for checkpoints and logs."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as TOML when it parses
    (numbers, booleans, lists, quoted strings) and as a bare string otherwise."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty field name")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (before it becomes dataclasses)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
        node[path[-1]] = value
    return data


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe, with the file named in every error."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def builtin_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the package (bertscale/recipes/NAME.toml)."""
    path = Path(__file__).parent / "recipes" / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.toml"))
        raise ConfigError(f"no built-in recipe {name!r}; built-in: {', '.join(known)}")
    return path


def model_config_from(data: dict[str, Any] | str, where: str = "model") -> ModelConfig:
    """A model section: either a preset name, or a table with an optional `preset` key plus
    field overrides (`{preset = "base", vocab_size = 28996}`)."""
    if isinstance(data, str):
        return preset(data)
    data = dict(data)
    base = data.pop("preset", None)
    cfg = from_dict(ModelConfig, data, where)
    if base is not None:
        explicit = {k: getattr(cfg, k) for k in data}
        cfg = preset(base, **explicit)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------ pretraining recipe
#
# One TOML file per recipe (bertscale/recipes/*.toml). Sections map onto the classes below;
# bertscale.optim builds the torch optimizer and schedule from [optimizer] and [schedule]. Relative
# paths in a recipe are read from the directory the command runs in (like every other CLI path).
#
# Two phases (the paper's 128 then 512 tokens) are two recipes: phase 2 names phase 1's run folder
# in `train.init_from` and takes its final weights only, with its own optimizer, schedule, batch
# and shards. Chosen over one recipe with [[phases]] because each phase is then an ordinary,
# separately resumable and requeueable job with its own run folder.


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
class OptimizerConfig:
    """Which optimizer, and its hyperparameters (defaults: the paper's Adam)."""

    name: Literal["adamw", "lamb"] = "adamw"
    """"adamw" (the paper's Adam with decoupled weight decay) or "lamb" (You et al. 2019, for
    large batches; made correct under ZeRO by `make_zero_aware`)."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup (the paper: 1e-4 for Adam at batch 256)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates."""
    eps: float = 1e-6
    """Added to sqrt(v_hat) in the denominator (the paper's BERT uses 1e-6)."""
    weight_decay: float = 0.01
    """Decoupled weight decay on weight matrices and embeddings; never on biases or LayerNorm."""
    implementation: Literal["foreach", "fused", "loop"] = "foreach"
    """"foreach": multi-tensor kernels; "fused": torch's fused AdamW (AdamW only); "loop": one
    tensor at a time, the slow reference the fast paths are tested against."""

    def validate(self, where: str = "optimizer") -> None:
        if self.name not in ("adamw", "lamb"):
            raise ConfigError(f"{where}.name = {self.name!r} is not allowed; choose one of "
                              f"'adamw', 'lamb'")
        if self.implementation not in ("foreach", "fused", "loop"):
            raise ConfigError(f"{where}.implementation = {self.implementation!r} is not allowed; "
                              f"choose one of 'foreach', 'fused', 'loop'")
        if self.name == "lamb" and self.implementation == "fused":
            raise ConfigError(f"{where}.implementation = 'fused' exists only for adamw; "
                              f"for lamb choose 'foreach' or 'loop'")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{where}.lr must be a positive number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ConfigError(f"{where}.eps must be positive, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{where}.weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay (the paper: 10k warmup, linear decay)."""

    warmup: int | float = 10000
    """Warmup length: an integer number of optimizer steps, or a float in [0, 1) giving a
    fraction of the total steps (0.01 = the first 1%)."""
    decay: Literal["linear", "poly", "constant"] = "linear"
    """After warmup: "linear" to min_lr_ratio at the last step, "poly" with exponent `power`
    (NVIDIA's BERT uses 0.5 for LAMB), or "constant" at the peak."""
    power: float = 1.0
    """Exponent of the "poly" decay (1.0 is linear)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak, for "linear" and "poly"."""

    def validate(self, where: str = "schedule") -> None:
        w = self.warmup
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"{where}.warmup must be an integer number of steps or a fraction "
                              f"in [0, 1), got {w!r}")
        if isinstance(w, float) and not 0.0 <= w < 1.0:
            raise ConfigError(f"{where}.warmup = {w!r}: a float is a fraction of the total steps "
                              f"and must be in [0, 1); give a step count as an integer")
        if isinstance(w, int) and w < 0:
            raise ConfigError(f"{where}.warmup must be >= 0 steps, got {w}")
        if self.decay not in ("linear", "poly", "constant"):
            raise ConfigError(f"{where}.decay = {self.decay!r} is not allowed; choose one of "
                              f"'linear', 'poly', 'constant'")
        if not self.power > 0:
            raise ConfigError(f"{where}.power must be positive, got {self.power!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{where}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps (a fraction is rounded to the nearest step)."""
    if isinstance(cfg.warmup, float):
        return int(round(cfg.warmup * total_steps))
    return int(cfg.warmup)


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


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`."""
    return -(-vocab_size // multiple) * multiple


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
        sections = {key: from_dict(cls, data.get(key, {}), key) for key, cls in _RECIPE_SECTIONS.items()}
        if "optimizer" not in data:
            raise ConfigError("missing [optimizer] section (name, lr, ...)")
        recipe = PretrainRecipe(
            name=_coerce(str, data.get("name", default_name), "name"),
            model=model,
            optimizer=from_dict(OptimizerConfig, data["optimizer"], "optimizer"),
            schedule=from_dict(ScheduleConfig, data.get("schedule", {}), "schedule"),
            run_dir=_coerce(Path | None, data.get("run_dir"), "run_dir"),
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
    out = to_dict(recipe)
    out.pop("vocab_size_explicit", None)
    return out
