"""`ltsearch` command line: one module per subcommand (torchtune's layout); a user error is one line + exit 2,
a diverged training run (nan/inf loss) one line + exit 3."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import sys
import types

from ltsearch.cli._common import expand_overrides, one_line_error
from ltsearch.errors import ConfigError, LtsearchError, TrainingDiverged

SUBCOMMANDS = ("train", "data", "tune", "ablate", "report", "check", "ui", "runs")

# A finished command leaves its memory to the OS: without this, interpreter shutdown runs full garbage collections
# over everything torch, Ray, MLflow and SQLAlchemy allocated (1-5 s on 2 cores after `ltsearch tune`), only to free
# it. Refcounted objects are still released and closed as usual, and the atexit handlers registered after this one
# (Ray's shutdown, MLflow's) run before it; only objects in reference cycles are left uncollected.
atexit.register(gc.freeze)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltsearch", description="Hyperparameter search and ablations for long-tailed image classification.")
    parser.error = types.MethodType(one_line_error, parser)  # type: ignore[method-assign]  # an unknown command: one line too
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"ltsearch.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(expand_overrides(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.handler(args) or 0)
    except TrainingDiverged as error:
        print(f"ltsearch {args.command}: error: {error}", file=sys.stderr)
        return TrainingDiverged.exit_code
    except ConfigError as error:
        print(f"ltsearch {args.command}: error: {blame_command_line(error, getattr(args, 'overrides', []))}", file=sys.stderr)
        return 2
    except LtsearchError as error:
        print(f"ltsearch {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)  # 2: bad input; 4: storage (StorageError)
    except KeyboardInterrupt:
        print(f"ltsearch {args.command}: interrupted", file=sys.stderr)
        return 130


def blame_command_line(error: ConfigError, overrides: list[str]) -> ConfigError:
    """The same error, naming `--set KEY=VALUE` as its source when that override set the offending key.

    Overrides are applied to the file before it is validated, so the error otherwise names the file, where
    the user would look for a value they typed on the command line.
    """
    named = {error.key, error.key.rsplit(": ", 1)[-1], error.key.split(": ", 1)[0].split(" x ", 1)[0]}
    for text in reversed(overrides or []):
        key = text.partition("=")[0].strip()
        if any(name == key or name.startswith(key + ".") or key.startswith(name + ".") for name in named):
            return error.with_source(f"--set {text}")
    return error


if __name__ == "__main__":
    sys.exit(main())
