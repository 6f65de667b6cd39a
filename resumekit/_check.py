"""Argument checks shared by the public API; each raises InvalidArgumentError."""

from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Sequence

from resumekit.errors import InvalidArgumentError


def as_int(
    value: object, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int (bools rejected), within ``[minimum, maximum]`` where given."""
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
    if maximum is not None and result > maximum:
        raise InvalidArgumentError(f"{name} must be <= {maximum:,}, got {result:,}")
    return result


def check_hashable(value: object, name: str) -> Hashable:
    """``value`` itself, after proving it can be a dict key."""
    try:
        hash(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be hashable, not {type(value).__name__}") from None
    return value


def check_interface(value: object, name: str, kind: str, methods: tuple[str, ...]) -> None:
    """Raise unless ``value`` has every method of ``methods`` (duck-typed protocols)."""
    missing = [m for m in methods if not callable(getattr(value, m, None))]
    if missing:
        raise InvalidArgumentError(
            f"{name} must be a {kind}; {type(value).__name__} has no {', '.join(missing)}"
        )


def check_bool(value: object, name: str) -> bool:
    """``value`` itself, after proving it is a bool (1 and "no" are not)."""
    if type(value) is not bool:
        raise InvalidArgumentError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_str(value: object, name: str) -> str:
    """``value`` itself, after proving it is a str."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, not {type(value).__name__}")
    return value


def as_wait_seconds(value: object, name: str) -> float:
    """``value`` as a finite number of seconds >= 0 (how long to block)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds, not {type(value).__name__}"
        )
    if not 0 <= value < float("inf"):
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def as_seconds(value: object, name: str, *, maximum: float) -> float:
    """``value`` as a number of seconds in ``(0, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds, not {type(value).__name__}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int past any float
        seconds = math.inf
    if not 0 < seconds <= maximum:
        raise InvalidArgumentError(f"{name} must be > 0 and <= {maximum:g} seconds, got {value!r}")
    return seconds


def as_positive(value: object, name: str) -> float:
    """``value`` as a finite number > 0 (a rate, a load): 0, NaN or inf divide into nonsense."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int past any float
        number = math.inf
    if not 0 < number < math.inf:
        raise InvalidArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_choice(value: object, name: str, options: Sequence[str]) -> str:
    """``value`` itself, after proving it is one of ``options``: an unknown name runs nothing."""
    text = check_str(value, name)
    if text not in options:
        raise InvalidArgumentError(
            f"{name} must be one of {', '.join(map(repr, options))}; got {text!r}"
        )
    return text


def check_callback(value: object, name: str) -> None:
    """Raise unless ``value`` is ``None`` or callable (a progress hook, say)."""
    if value is not None and not callable(value):
        raise InvalidArgumentError(f"{name} must be callable or None, not {type(value).__name__}")


def as_cap_seconds(value: object, name: str) -> float | None:
    """``value`` as an optional cap in seconds: ``None``, or a number > 0 (``inf``: no cap)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidArgumentError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
    return float(value)
