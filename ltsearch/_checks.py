"""Eager value checks that raise ConfigError with the key, the value and the rule (Optuna's message shape)."""

from __future__ import annotations

import math
from typing import Any

from ltsearch.errors import ConfigError


def number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, what: str | None = None) -> None:
    """Require low <= value <= high (strict where `*_open`), e.g. head_ratio in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a number")
    if not math.isfinite(value):
        raise ConfigError(key, value, "a finite number (not nan or inf)" + (f"; {describe_range(low, high, low_open, high_open)}" if low is not None or high is not None else ""))
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(key, value, describe_range(low, high, low_open, high_open) + (f" ({what})" if what else ""))


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"a value in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"a value {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"a value {'<' if high_open else '<='} {high}"
    return "a number"


def choice(key: str, value: Any, allowed: list[Any] | tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"one of {list(allowed)}")


def registered(key: str, value: Any, registry: Any) -> None:
    if not isinstance(value, str) or value not in registry:
        raise ConfigError(key, value, f"one of {registry.names()}")


def finite(key: str, value: Any) -> None:
    """Reject nan and ±inf (YAML's .nan/.inf), which pass every comparison-based range check."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "a finite number (not nan or inf)")


def integer(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "an integer")
