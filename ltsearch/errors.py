"""Errors a user can act on. The CLI turns each into one message and exit code 2."""

from __future__ import annotations

from typing import Any


class LtsearchError(Exception):
    """Base class of every error the CLI reports as a user error (exit code 2)."""


class ConfigError(LtsearchError, ValueError):
    """A config value is wrong: names the dotted key, the value, what is allowed and how to fix it.

    The message shape follows Optuna's eager checks: the rule, then the offending values.
    """

    def __init__(self, key: str, value: Any, expected: str, *, hint: str | None = None, source: str | None = None):
        self.key = key
        self.value = value
        self.expected = expected
        self.hint = hint
        self.source = source
        where = f"{source}: " if source else ""
        message = f"{where}config key '{key}': got {value!r}; expected {expected}."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def with_source(self, source: str) -> "ConfigError":
        """Return the same error, now naming the file (or `--set`) it came from."""
        return ConfigError(self.key, self.value, self.expected, hint=self.hint, source=source)


class DataError(LtsearchError):
    """A dataset cannot be read or built (missing files, malformed lists, offline download)."""
