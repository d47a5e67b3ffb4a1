"""`ltsearch` command line: one module per subcommand (torchtune's layout); a user error is one line + exit 2,
a diverged training run (nan/inf loss) one line + exit 3."""

from __future__ import annotations

import argparse
import importlib
import sys
import types

from ltsearch.cli._common import expand_overrides, one_line_error
from ltsearch.errors import LtsearchError, TrainingDiverged

SUBCOMMANDS = ("train", "data", "tune", "ablate", "report", "check", "ui", "runs")


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
    except LtsearchError as error:
        print(f"ltsearch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ltsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
