"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse
import types
from typing import NoReturn


def one_line_error(self: argparse.ArgumentParser, message: str) -> NoReturn:
    """argparse's error as one line (no usage block), exit code 2, like every other user error."""
    self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE`; every subcommand takes it, so this is also where its argument errors become one line."""
    parser.error = types.MethodType(one_line_error, parser)  # type: ignore[method-assign]
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set optim.lr=0.05 train.epochs=3 (several after one --set, or "
                             "--set repeated; values are YAML scalars or lists)")


def expand_overrides(argv: list[str]) -> list[str]:
    """`--set a=1 b=2 FILE` -> `--set a=1 --set b=2 FILE`: several overrides after one --set, as Hydra users type them.

    The run of KEY=VALUE words ends at the first word without '=' (a file, a name) or starting with '-', so
    positional arguments may still follow. The first word after --set is always its value, so a malformed
    override is reported as one (argparse would otherwise call it an unrecognised argument).
    """
    out: list[str] = []
    expecting_value = in_run = False
    for word in argv:
        if expecting_value:
            out.append(word)
            expecting_value, in_run = False, True
        elif in_run and "=" in word and not word.startswith("-"):
            out += ["--set", word]
        else:
            out.append(word)
            in_run, expecting_value = False, word == "--set"
    return out
