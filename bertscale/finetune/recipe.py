"""Typed fine-tuning recipes: one TOML file per recipe, one dataclass per section, every field
validated before anything runs (like pretraining's, bertscale.config).

    bertscale finetune glue [RECIPE] --set train.lr=[3e-5] --set data.task="MRPC" ...

A recipe holds what decides a fine-tuning grid: the paper's training settings ([train]: the
learning-rate grid, seeds, epochs, batch, warmup, ...), the task's data and lengths ([data]),
checkpoints, logging, fast paths and what is written ([output]); SQuAD adds its decoding
([decode]), NER its mode and tagger ([ner]). The built-in recipes (bertscale/recipes/finetune/)
are the paper's (Devlin et al. 2018, Sections 4.1-4.4): GLUE lr {5e-5, 4e-5, 3e-5, 2e-5}, batch
32, 3 epochs; SQuAD v1.1 lr 5e-5, batch 32, 3 epochs; SQuAD v2.0 lr 5e-5, batch 48, 2 epochs;
SWAG lr 2e-5, batch 16, 3 epochs; warmup 10% of the steps, AdamW with weight decay 0.01.

Every flag of `bertscale finetune` is a recipe key (`--lr` is `train.lr`, `--data-dir` is
`data.data_dir`: bertscale.commands.finetune lists them). Reading a recipe (built-in, file,
`--set`): bertscale.finetune.recipes. No torch here: a recipe is refused before any heavy import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bertscale.config import MAX_SEED, to_dict
from bertscale.errors import ConfigError

FAMILIES = ("glue", "squad", "swag", "ner")
GLUE_TASKS = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")
"""The nine GLUE tasks (bertscale.finetune.glue_tasks.TASKS describes each)."""
LAYER_NAMES = ("embeddings", "last", "second-to-last", "sum-last-four", "concat-last-four",
               "weighted-sum")
"""NER feature mode's hidden-state choices (bertscale.features reads them; a comma list of
layer indices is accepted too)."""


# ------------------------------------------------------------------------ common sections


@dataclass
class TrainSection:
    """The optimizer, schedule and batch of every run of the grid (AdamW with eps 1e-6, no decay
    on biases and LayerNorm weights; linear warmup, then linear decay to 0)."""

    lr: list[float] = field(default_factory=lambda: [5e-5, 4e-5, 3e-5, 2e-5])
    """Peak learning rates: one run per learning rate and seed; the best mean on dev wins."""
    seeds: list[int] = field(default_factory=lambda: [1])
    """Seeds of each learning rate (the head's initialisation, dropout, the data order); the
    results give mean and sample standard deviation over them."""
    epochs: float = 3.0
    """Passes over the training set (fractions allowed)."""
    batch_size: int = 32
    """The global batch: examples per optimizer step over all ranks."""
    warmup: float = 0.1
    """Fraction of the steps with a linear warmup from 0, in [0, 1)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (not on biases and LayerNorm weights)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this, as Google's run_classifier / run_squad."""
    max_steps: int = 0
    """Cap on the optimizer steps of each run (0: the epochs decide)."""
    eval_batch_size: int = 64
    """Examples per forward pass when predicting."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """"auto": bf16 on a GPU that has it, else fp16 with loss scaling; fp32 on the CPU."""
    device: str = "auto"
    """"auto", "cpu", "cuda" or "cuda:N" (under a launcher, "auto" and "cuda" are this rank's
    GPU)."""
    check_every: int = 10
    """Read the step statistics back from the devices at least every N steps (also at every
    logged and checkpointed step). A NaN/inf loss and a preemption signal are acted on at a
    read, every rank at the same step."""


@dataclass
class CheckpointSection:
    """Committed checkpoints of each run (its folder's checkpoints/step_N), so that a re-run of
    the grid continues an unfinished run; a preemption (SIGTERM, SIGUSR1) or Ctrl-C always
    commits one first."""

    every: int = 0
    """Also save every N steps (0: only when preempted or interrupted)."""
    keep: int = 2
    """Committed checkpoints kept per run (at least 2). A finished run keeps none."""
    check_free_space: bool = True
    """Before a save, refuse it (one line, exit 2) when the disk has less room than the previous
    checkpoint took."""


@dataclass
class LoggingSection:
    """The progress display and where each step's numbers go (metrics.jsonl in every run folder,
    W&B and TensorBoard when asked)."""

    every: int = 50
    """The progress line's loss is the mean of the last N steps; without a terminal, a line
    every N steps (0: only the closing line)."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """A redrawn progress bar on a terminal, plain lines otherwise ("auto")."""
    wandb: bool = False
    """Log each run to Weights & Biases (offline without an API key; never stops the run)."""
    tensorboard: bool = False
    """Also write TensorBoard events to each run folder (needs the tensorboard package)."""


@dataclass
class FastSection:
    """The encoder's fast paths (bertscale.parallelize.FastPaths); each has a parity test against
    the plain path."""

    unpad: bool = False
    """Run the encoder on the real tokens only: no work on padding (pays at GLUE lengths)."""
    compile: bool = False
    """torch.compile the encoder layers (eager, with a warning, on failure)."""
    checkpoint_activations: bool = False
    """Recompute each layer in the backward: less memory, more time."""


@dataclass
class OutputSection:
    """What a grid writes besides its results and predictions."""

    save_model: bool = False
    """Also write each run's fine-tuned model (a Hugging Face folder, head included, with its
    task in bertscale_task.json) to OUTPUT_DIR/<task>/runs/<run>/model."""
    overwrite: bool = False
    """Delete OUTPUT_DIR/<task>/ when it holds results of other settings (default: refuse)."""


# ------------------------------------------------------------------------ task sections


@dataclass
class GlueData:
    """A GLUE task from the GLUE TSV files or Hugging Face's GLUE."""

    task: str = ""
    """CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI; a comma list; or "all" (every task
    with a training set under data_dir)."""
    data_dir: Path | None = None
    """The GLUE folder holding <Task>/train.tsv ... (or one task's folder), or Hugging Face's
    GLUE: <config>/train-*.parquet ... or a save_to_disk folder."""
    max_seq_length: int = 128
    """Word pieces per pair, truncated longest-first."""
    max_train_samples: int = 0
    """Use the first N training examples (0: all)."""
    max_eval_samples: int = 0
    """Score only the first N examples of each dev file (0: all)."""
    predict_test: bool = True
    """Write the test-set predictions (the GLUE submission files)."""


@dataclass
class SquadData:
    """SQuAD v1.1 or v2.0 from the official JSON files (or Hugging Face's Parquet)."""

    version: Literal["1.1", "2.0"] = "1.1"
    """The SQuAD version of the files (v2.0 has unanswerable questions)."""
    train_file: Path | None = None
    """e.g. train-v1.1.json (not needed with --eval-only)."""
    predict_file: Path | None = None
    """e.g. dev-v1.1.json: predicted and scored."""
    max_seq_length: int = 384
    """Word pieces per window."""
    doc_stride: int = 128
    """Tokens between window starts over a long context."""
    max_query_length: int = 64
    """Question word pieces kept."""
    max_train_samples: int = 0
    """Use the first N training questions (0: all)."""
    max_eval_samples: int = 0
    """Predict and score only the first N questions of predict_file (0: all)."""


@dataclass
class SquadDecode:
    """How answers are decoded from the start and end logits."""

    n_best_size: int = 20
    """Start / end candidates per window."""
    max_answer_length: int = 30
    """Longest answer in tokens."""
    null_score_diff_threshold: float = 0.0
    """v2.0: answer "" when the null score minus the best span's score exceeds this."""
    write_nbest: bool = False
    """Also write nbest_predictions.json."""


@dataclass
class SwagData:
    """SWAG from the official train/val/test CSV files (or Hugging Face's SWAG)."""

    data_dir: Path | None = None
    """Folder with train.csv, val.csv and optionally test.csv, or Hugging Face's SWAG."""
    max_seq_length: int = 128
    """Word pieces per context + ending."""
    max_train_samples: int = 0
    """Use the first N training examples (0: all)."""
    max_eval_samples: int = 0
    """Score only the first N val.csv examples (0: all)."""
    predict_test: bool = True
    """Write predictions for test.csv when the folder has it."""


@dataclass
class NerData:
    """CoNLL-2003-style files: one token per line, the word first and its tag last."""

    train_file: Path | None = None
    """e.g. eng.train (not needed with --eval-only)."""
    dev_file: Path | None = None
    """e.g. eng.testa: scored, and picks the learning rate."""
    test_file: Path | None = None
    """e.g. eng.testb: scored with the chosen run, never used to choose."""
    max_seq_length: int = 256
    """Word pieces per sentence (at least 3: [CLS], a word, [SEP])."""
    tag_scheme: Literal["iob2", "keep"] = "iob2"
    """Train on IOB2 tags (every entity opens with B-), or on the tags as written."""
    max_train_samples: int = 0
    """Use the first N training sentences (0: all)."""
    max_eval_samples: int = 0
    """Score only the first N sentences of dev_file (and test_file) (0: all)."""


@dataclass
class NerSection:
    """The paper's two ways (Section 5.3): fine-tune the whole model, or a tagger on frozen
    features."""

    mode: Literal["finetune", "feature"] = "finetune"
    """finetune: BertForTokenClassification, the first piece of each word labelled; feature:
    BERT frozen, a tagger trained on its features."""
    layers: str = "concat-last-four"
    """Feature mode: the hidden states used, as `bertscale embed --layers` (the paper's best)."""
    layer_weights: list[float] = field(default_factory=list)
    """Feature mode, weighted-sum: one weight per layer."""
    tagger: Literal["bilstm", "linear"] = "bilstm"
    """Feature mode: the paper's two-layer BiLSTM, or one linear layer."""
    tagger_hidden: int = 768
    """BiLSTM units per direction."""
    tagger_layers: int = 2
    """BiLSTM layers."""
    tagger_dropout: float = 0.5
    """Dropout on the features and between the tagger's layers, in [0, 1)."""


# ------------------------------------------------------------------------ the recipes


Namer = Callable[[str], str]
"""A key as the user wrote it: the command's flag for it, or the key itself."""


def _key(name: str) -> str:
    return name


@dataclass
class FinetuneRecipe:
    """A fine-tuning grid: what every task shares. A family's recipe adds its [data] (and
    [decode] or [ner])."""

    name: str
    """The recipe's name (results.json records it)."""
    family: str = ""
    """glue, squad, swag or ner: the command a recipe file is for."""
    pretrained: Path | None = None
    """The weights to fine-tune: a Hugging Face BERT folder, or a bertscale run or checkpoint
    folder (with --eval-only: a fine-tuned model folder written with output.save_model)."""
    output_dir: Path | None = None
    """results.json and prediction files go to OUTPUT_DIR/<task>/."""
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    fast: FastSection = field(default_factory=FastSection)
    output: OutputSection = field(default_factory=OutputSection)

    def validate(self, n: Namer = _key, *, eval_only: bool = False, runnable: bool = True
                 ) -> None:
        """Every field's own check, and what the fields must agree on. `n(key)` is how the
        user spelled the key (a flag of the command, or the key), for the messages. With
        `runnable` False (--print-config) the keys a run needs (the data, the weights, the
        output folder) may be unset and their files absent."""
        if not self.name.strip():
            raise ConfigError("name must not be empty")
        if runnable:
            for key in ("pretrained", "output_dir"):
                if getattr(self, key) is None:
                    raise ConfigError(f"{n(key)} is required (the recipe has none)")
            if not Path(self.pretrained or "").exists():
                from bertscale.pretrained import not_found   # a Hub name: say it is not fetched
                raise ConfigError(f"{n('pretrained')} {not_found(self.pretrained or '')}")
            _folder_possible(self.output_dir, n("output_dir"))
        self._validate_train(n)
        c, lg = self.checkpoint, self.logging
        _at_least(c.every, 0, n("checkpoint.every"))
        if c.keep < 2:
            raise ConfigError(f"{n('checkpoint.keep')} must be at least 2 (a crash during a save "
                              f"must leave a committed one), got {c.keep}")
        _at_least(lg.every, 0, n("logging.every"))

    def _validate_train(self, n: Namer) -> None:
        t = self.train
        if not t.lr:
            raise ConfigError(f"{n('train.lr')} is empty")
        if any(lr <= 0 for lr in t.lr):
            raise ConfigError(f"{n('train.lr')} {format_list(t.lr)}: learning rates must be "
                              f"positive")
        if not t.seeds:
            raise ConfigError(f"{n('train.seeds')} is empty")
        if any(not 0 <= s <= MAX_SEED for s in t.seeds):
            raise ConfigError(f"{n('train.seeds')} {format_list(t.seeds)}: seeds must be in "
                              f"[0, {MAX_SEED}]")
        for key, value in (("epochs", t.epochs), ("batch_size", t.batch_size),
                           ("eval_batch_size", t.eval_batch_size),
                           ("max_grad_norm", t.max_grad_norm), ("check_every", t.check_every)):
            if value <= 0:
                raise ConfigError(f"{n('train.' + key)} must be positive, got {value:g}")
        if not 0 <= t.warmup < 1:
            raise ConfigError(f"{n('train.warmup')} is a fraction in [0, 1), got {t.warmup:g}")
        _at_least(t.weight_decay, 0, n("train.weight_decay"))
        _at_least(t.max_steps, 0, n("train.max_steps"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
            raise ConfigError(f"{n('train.device')} {t.device!r}: choose auto, cpu, cuda or "
                              f"cuda:N")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, in its TOML layout (for --print-config and results)."""
        out: dict[str, Any] = to_dict(self)
        return out

    def summary(self) -> dict[str, Any]:
        """The training settings every run of the grid shares, as results.json and
        settings.json record them."""
        t = self.train
        return {"epochs": t.epochs, "batch_size": t.batch_size, "warmup": t.warmup,
                "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
                "max_steps": t.max_steps or None, "precision": t.precision,
                "fast_paths": {"unpad": self.fast.unpad,
                               "checkpoint_activations": self.fast.checkpoint_activations,
                               "compile": self.fast.compile}}


@dataclass
class GlueRecipe(FinetuneRecipe):
    data: GlueData = field(default_factory=GlueData)

    def validate(self, n: Namer = _key, *, eval_only: bool = False, runnable: bool = True
                 ) -> None:
        super().validate(n, eval_only=eval_only, runnable=runnable)
        d = self.data
        names = [t.strip() for t in d.task.split(",") if t.strip()]
        if not names and runnable:
            raise ConfigError(f"{n('data.task')} is required: a GLUE task, a comma list, or all")
        for name in names:
            if name.lower() != "all" and glue_task(name) is None:
                raise ConfigError(f"{n('data.task')} {name!r}: unknown GLUE task; choose from "
                                  f"{', '.join(GLUE_TASKS)} or all")
        if runnable:
            _need_folder(d.data_dir, n("data.data_dir"))
        _lengths(d, n)


@dataclass
class SquadRecipe(FinetuneRecipe):
    data: SquadData = field(default_factory=SquadData)
    decode: SquadDecode = field(default_factory=SquadDecode)

    def validate(self, n: Namer = _key, *, eval_only: bool = False, runnable: bool = True
                 ) -> None:
        super().validate(n, eval_only=eval_only, runnable=runnable)
        d, dec = self.data, self.decode
        if runnable and not eval_only:
            _need_file(d.train_file, n("data.train_file"), "unless --eval-only")
        if runnable:
            _need_file(d.predict_file, n("data.predict_file"))
        _lengths(d, n)
        for key, value in (("data.doc_stride", d.doc_stride),
                           ("data.max_query_length", d.max_query_length),
                           ("decode.n_best_size", dec.n_best_size),
                           ("decode.max_answer_length", dec.max_answer_length)):
            if value <= 0:
                raise ConfigError(f"{n(key)} must be positive, got {value}")


@dataclass
class SwagRecipe(FinetuneRecipe):
    data: SwagData = field(default_factory=SwagData)

    def validate(self, n: Namer = _key, *, eval_only: bool = False, runnable: bool = True
                 ) -> None:
        super().validate(n, eval_only=eval_only, runnable=runnable)
        if runnable:
            _need_folder(self.data.data_dir, n("data.data_dir"))
        _lengths(self.data, n)


@dataclass
class NerRecipe(FinetuneRecipe):
    data: NerData = field(default_factory=NerData)
    ner: NerSection = field(default_factory=NerSection)

    def validate(self, n: Namer = _key, *, eval_only: bool = False, runnable: bool = True
                 ) -> None:
        super().validate(n, eval_only=eval_only, runnable=runnable)
        d, m = self.data, self.ner
        if runnable and not eval_only:
            _need_file(d.train_file, n("data.train_file"), "unless --eval-only")
        if runnable:
            _need_file(d.dev_file, n("data.dev_file"))
        if runnable and d.test_file is not None:
            _need_file(d.test_file, n("data.test_file"))
        _lengths(d, n)
        if d.max_seq_length < 3:
            raise ConfigError(f"{n('data.max_seq_length')} {d.max_seq_length}: needs room for "
                              f"[CLS], a word and [SEP] (at least 3)")
        if m.layers not in LAYER_NAMES and not re.fullmatch(r"-?\d+(,-?\d+)*", m.layers):
            raise ConfigError(f"{n('ner.layers')} {m.layers!r}: choose one of "
                              f"{', '.join(LAYER_NAMES)} or a comma list of layer indices")
        for key, value in (("ner.tagger_hidden", m.tagger_hidden),
                           ("ner.tagger_layers", m.tagger_layers)):
            if value <= 0:
                raise ConfigError(f"{n(key)} must be positive, got {value}")
        if not 0 <= m.tagger_dropout < 1:
            raise ConfigError(f"{n('ner.tagger_dropout')} is a probability in [0, 1), got "
                              f"{m.tagger_dropout:g}")
        if m.layer_weights and m.layers != "weighted-sum":
            raise ConfigError(f"{n('ner.layer_weights')} is for {n('ner.layers')} weighted-sum, "
                              f"not {m.layers!r}")


RECIPES: dict[str, type[FinetuneRecipe]] = {"glue": GlueRecipe, "squad": SquadRecipe,
                                            "swag": SwagRecipe, "ner": NerRecipe}


def glue_task(name: str) -> str | None:
    """The GLUE task `name` stands for (any case, with or without the hyphen), or None."""
    for task in GLUE_TASKS:
        if task.lower() == name.lower() or task.replace("-", "").lower() == \
                name.replace("-", "").lower():
            return task
    return None


def _at_least(value: float, low: float, name: str) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low:g}, got {value:g}")


def _lengths(data: Any, n: Namer) -> None:
    if data.max_seq_length <= 0:
        raise ConfigError(f"{n('data.max_seq_length')} must be positive, got "
                          f"{data.max_seq_length}")
    for key in ("max_train_samples", "max_eval_samples"):
        _at_least(getattr(data, key), 0, n(f"data.{key}"))


def _need_file(path: Path | None, name: str, unless: str = "") -> None:
    if path is None:
        raise ConfigError(f"{name} is required" + (f" ({unless})" if unless else ""))
    if not path.exists():
        raise ConfigError(f"{name} {path}: no such file")


def _need_folder(path: Path | None, name: str) -> None:
    if path is None:
        raise ConfigError(f"{name} is required")
    if not path.is_dir():
        raise ConfigError(f"{name} {path}: no such folder")


def _folder_possible(path: Path | None, name: str) -> None:
    """`path` is a folder or can become one (no file stands in its way)."""
    for p in [path, *path.parents] if path is not None else []:
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{name} {path}: {p} is not a folder")
            return


def format_number(v: float) -> str:
    """A learning rate as a user writes it: 5e-5, 1e-3, 2.5e-5 (Python writes 5e-05, 0.001)."""
    text = f"{v:e}" if isinstance(v, float) and 0 < abs(v) < 0.01 else f"{v:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_list(values: list[float] | list[int]) -> str:
    """`5e-5,4e-5`: a list value as a comma list."""
    return ",".join(format_number(v) for v in values)
