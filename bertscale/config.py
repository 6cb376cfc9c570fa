"""Typed configuration: dataclasses, presets, TOML recipes and command-line overrides.

Every field has a docstring-style comment beside it; `docs/configuration.md` is generated from
these classes, so they are the single source of truth. Validation happens here, before any
process group starts, and every error names the field and what would be accepted.
"""

from __future__ import annotations

import dataclasses
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
    """Segment (token type) embeddings: A and B."""
    initializer_range: float = 0.02
    """Std of the truncated normal used for every weight matrix."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (Google's release uses 1e-12)."""
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


def _coerce(tp: Any, value: Any, name: str) -> Any:
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
        return float(value)
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
