"""Where fine-tuning recipes come from: the built-in ones (bertscale/recipes/finetune/, the
paper's), a user's TOML file, and `--set a.b=value` overrides; and the built-in values that
`bertscale finetune --help` shows as defaults. The typed recipe itself is
bertscale.finetune.recipe. No torch: a recipe is read and refused before any heavy import."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from bertscale.config import apply_overrides, from_dict, load_toml, parse_override
from bertscale.errors import ConfigError
from bertscale.finetune.recipe import (FAMILIES, RECIPES, FinetuneRecipe, NerRecipe, SquadRecipe,
                                       format_list, format_number)

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "finetune"


def builtin(name: str) -> Path:
    """A recipe shipped in bertscale/recipes/finetune/."""
    path = RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
        raise ConfigError(f"no built-in fine-tuning recipe {name!r}; built-in: {known}")
    return path


def builtin_names(family: str | None = None) -> list[str]:
    """The built-in recipes (of one family), by name."""
    out = []
    for path in sorted(RECIPE_DIR.glob("*.toml")):
        if family is None or load_toml(path).get("family") == family:
            out.append(path.stem)
    return out


def read_source(source: str | Path) -> tuple[dict[str, Any], str, bool]:
    """A recipe's data from a TOML file or a built-in name: (data, where it came from, whether
    it is built in). The file's name is the recipe's name unless it sets one."""
    path = Path(source)
    builtin_name = not path.is_file() and path.suffix != ".toml" and "/" not in str(source)
    if builtin_name:
        path = builtin(str(source))
    data = load_toml(path)
    data.setdefault("name", path.stem)
    return data, str(path), builtin_name


def flat_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """The keys a recipe's data sets ("train.lr", ...)."""
    out: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def load_recipe(family: str, source: str | Path | dict[str, Any],
                overrides: list[str] | None = None, origin: str | None = None) -> FinetuneRecipe:
    """A fine-tuning recipe of `family` from a TOML file, a built-in name or a dict (read from
    `origin`), with `a.b=value` overrides; every error names the recipe (and the override) and
    the field. The checks that need the command's context (paths, what --eval-only leaves out)
    are `FinetuneRecipe.validate`'s."""
    if family not in RECIPES:
        raise ConfigError(f"unknown fine-tuning family {family!r}; choose {', '.join(FAMILIES)}")
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), origin or "recipe"
    else:
        data, where, _ = read_source(source)
    overrides = list(overrides or [])
    try:
        data = apply_overrides(data, overrides)
        data.setdefault("name", family)
        data.setdefault("family", family)
        if data["family"] != family:
            raise ConfigError(f"family = {data['family']!r}: a recipe for `bertscale finetune "
                              f"{data['family']}`, not {family}")
        recipe = from_dict(RECIPES[family], data)
    except ConfigError as e:
        raise ConfigError(f"{_blame(str(e), where, overrides)}: {e}") from None
    return recipe


def _blame(message: str, origin: str, overrides: list[str]) -> str:
    named = [o for o in overrides
             if re.search(rf"(?<![\w.]){re.escape('.'.join(parse_override(o)[0]))}(?!\w)", message)]
    return f"{', '.join(f'--set {o}' for o in named)} (over {origin})" if named else origin


def describe_defaults(family: str, key: str) -> str:
    """A key's value in the family's built-in recipes, for --help: `5e-5` or `5e-5 (v1.1),
    5e-5 (v2.0)`."""
    shown = []
    for name in builtin_names(family):
        recipe = load_recipe(family, name)
        value: Any = recipe
        for part in key.split("."):
            value = getattr(value, part)
        text = format_list(value) if isinstance(value, list) else (
            format_number(value) if isinstance(value, float) else str(value))
        shown.append((name, text))
    if len(shown) == 1:
        return shown[0][1]
    return ", ".join(f"{t} ({_variant(family, name)})" for name, t in shown)


def _variant(family: str, name: str) -> str:
    recipe = load_recipe(family, name)
    if isinstance(recipe, SquadRecipe):
        return f"v{recipe.data.version}"
    if isinstance(recipe, NerRecipe):
        return f"--mode {recipe.ner.mode}"
    return name
