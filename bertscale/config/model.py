"""The BERT encoder's shape (`ModelConfig`), the paper's presets, and the Hugging Face heads a
checkpoint can be exported as."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from bertscale.config.schema import from_dict
from bertscale.errors import ConfigError


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

# (layers, hidden, heads); intermediate is 4 x hidden as in the paper and Turc et al. 2019.
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


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`."""
    return -(-vocab_size // multiple) * multiple
