"""Errors a user can act on. The CLI turns each into one message and exit code 2."""

from __future__ import annotations

import ast
import difflib
import re
from typing import Any


class LtsearchError(Exception):
    """Base class of every error the CLI reports as a user error (exit code 2)."""


class ConfigError(LtsearchError, ValueError):
    """A config value is wrong: names the dotted key, the value, what is allowed and how to fix it.

    The message shape follows Optuna's eager checks: the rule, then the offending values.
    """

    def __init__(self, key: str, value: Any, expected: str, *, hint: str | None = None, source: str | None = None,
                 message: str | None = None, choices: list[str] | None = None):
        self.key = key
        self.value = value
        self.expected = expected
        self.hint = hint
        self.source = source
        self.choices = choices
        self.message = message
        if message is not None:  # a complete one-line text of its own, e.g. `file:line:col: problem` for YAML
            super().__init__(message)
            return
        where = f"{source}: " if source else ""
        text = f"{where}config key '{key}': got {value!r}; expected {expected}."
        suggestion = suggest(key, value, expected, choices)
        if suggestion:
            text += f" Did you mean '{suggestion}'?"
        if hint:
            text += f" {hint}"
        super().__init__(text)

    def with_source(self, source: str) -> "ConfigError":
        """Return the same error, now naming the file (or `--set`) it came from."""
        if self.message is not None:
            return self
        return ConfigError(self.key, self.value, self.expected, hint=self.hint, source=source, choices=self.choices)


_LISTED = re.compile(r"\[((?:'[^'\n]*'(?:, )?)+)\]")


def suggest(key: str, value: Any, expected: str, choices: list[str] | None = None) -> str | None:
    """difflib's closest allowed name to what was written, for "did you mean" (None when nothing is close).

    Unknown-key errors compare the key's last part with the allowed keys; any other error compares a
    string value with the names listed in `expected` (registries, literals) or `choices`.
    """
    if choices is None:
        match = _LISTED.search(expected)
        if match is None:
            return None
        try:
            choices = [str(c) for c in ast.literal_eval("[" + match.group(1) + "]")]
        except (ValueError, SyntaxError):
            return None
    unknown_key = "known key" in expected or "allowed keys" in expected or "search key" in expected
    written = str(key).rsplit(".", 1)[-1] if unknown_key else value
    if not isinstance(written, str) or not written or written in choices:
        return None
    close = difflib.get_close_matches(written, choices, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[written.lower()]] if written.lower() in lowered else []
    return close[0] if close else None


class CheckpointError(LtsearchError):
    """A checkpoint cannot be used: unreadable, truncated, not written by ltsearch, or holding code (refused unread)."""


class UnsafeFileError(CheckpointError):
    """A file names objects other than tensors and plain data: refused before anything in it is built or run."""


class DataError(LtsearchError):
    """A dataset cannot be read or built (missing files, malformed lists, offline download)."""


class TrainingDiverged(LtsearchError):
    """A loss term became nan or inf: the run stops at once (exit code 3), the last good checkpoint stays.

    `epoch` and `step` are 0-indexed (`step` counts within the epoch); messages number epochs from 1,
    as progress lines do. `terms` maps each offending loss term to the value it first took.
    """

    exit_code = 3

    def __init__(self, epoch: int, epochs: int, step: int, steps_per_epoch: int, terms: dict[str, float], note: str | None = None):
        self.epoch, self.epochs, self.step, self.steps_per_epoch, self.terms, self.note = epoch, epochs, step, steps_per_epoch, terms, note
        named = ", ".join(f"{name} = {value}" for name, value in terms.items())
        message = (f"training diverged in epoch {epoch + 1}/{epochs}, step {step + 1}/{steps_per_epoch}: "
                   f"non-finite loss term(s) {named}; nothing after the last finished epoch is kept")
        super().__init__(message + (f"; {note}." if note else "."))

    def __reduce__(self):
        """Rebuilt from its fields, so Ray can copy and pickle it from a trial to the driver."""
        return type(self), (self.epoch, self.epochs, self.step, self.steps_per_epoch, self.terms, self.note)

    def with_note(self, note: str) -> "TrainingDiverged":
        """The same error, saying where the last good checkpoint is (the engine does not know the run directory)."""
        return TrainingDiverged(self.epoch, self.epochs, self.step, self.steps_per_epoch, self.terms, note)


class StorageError(LtsearchError):
    """A file could not be written (disk full, read-only or vanished storage): exit code 4.

    Raised after the half-written temporary file is removed, so what was written before stays whole.
    """

    exit_code = 4


class DataMismatch(DataError):
    """A trial holds other images than were recorded for it (the driver's data fingerprints, or its own
    checkpoint's): it stops rather than train, or resume, on a different subset than the run reports."""
