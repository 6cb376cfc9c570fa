"""Typed configs from plain data: dataclasses built from TOML tables with every name and type
checked (`from_dict`), `a.b=value` overrides, TOML files, and back to plain data (`to_dict`)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from bertscale.errors import ConfigError

T = TypeVar("T")


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
        kwargs[key] = coerce(hints[key], value, name)
    return cls(**kwargs)


# Over ruff's complexity limit on purpose: one branch per supported field type.
def coerce(tp: Any, value: Any, name: str) -> Any:  # noqa: C901
    """`value` checked (and converted where lossless: int to float, str to Path) as type `tp`."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
                return coerce(arg, value, name)
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
        items = [coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
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
    path = Path(__file__).parent.parent / "recipes" / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.toml"))
        raise ConfigError(f"no built-in recipe {name!r}; built-in: {', '.join(known)}")
    return path
