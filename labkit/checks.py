"""Argument checks shared by every config and function: one message format, `<name> must be ..., got <value>`.

The ground floor beside `device`: imports nothing from labkit, so any module may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def is_int(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite-or-infinite real that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """`value` if it is an integer >= minimum; else `error` naming `name` and the bad value."""
    if not is_int(value) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_ints(owner, names: Iterable[str], minimum: int = 1) -> None:
    """check_int on several attributes of `owner` (a config's __post_init__)."""
    for name in names:
        check_int(name, getattr(owner, name), minimum)


def check_optional_int(name: str, value, minimum: int = 1) -> int | None:
    """None, or an integer >= minimum."""
    return None if value is None else check_int(name, value, minimum)


def check_positive(name: str, value, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """A number > 0 (>= 0 with allow_zero), finite unless allow_inf."""
    ok = is_number(value) and (value >= 0 if allow_zero else value > 0) and (allow_inf or value < math.inf)
    if not ok:  # NaN fails both comparisons
        raise ValueError(f"{name} must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return value


def check_choice(name: str, value, choices: Iterable) -> object:
    """`value` if it is one of `choices`; else a message listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, choices))}")
    return value
