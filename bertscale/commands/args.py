"""Small argument helpers the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from bertscale.errors import UserError

T = TypeVar("T")

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What `register(subparsers)` of a command module is given (`add_subparsers()`)."""


def parse_list(text: str, kind: Callable[[str], T], flag: str) -> list[T]:
    """A comma-separated flag value (`--lr 2e-5,3e-5`) as a list of `kind`, or one clear error."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma-separated list of "
                        f"{getattr(kind, '__name__', 'value')}s") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values
