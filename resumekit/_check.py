"""Argument checks shared by the public API; each raises InvalidArgumentError."""

from __future__ import annotations

import operator
from collections.abc import Hashable

from resumekit.errors import InvalidArgumentError


def as_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (bools rejected), at least ``minimum`` when given."""
    if type(value) is int:
        result = value
    elif isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an int, not bool")
    else:
        try:
            result = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidArgumentError(
                f"{name} must be an int, not {type(value).__name__}"
            ) from None
    if minimum is not None and result < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {result}")
    return result


def check_hashable(value: object, name: str) -> Hashable:
    """``value`` itself, after proving it can be a dict key."""
    try:
        hash(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be hashable, not {type(value).__name__}") from None
    return value
