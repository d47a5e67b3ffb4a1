"""Command-line options the benchmarks share with `ltsearch` itself."""

from __future__ import annotations

import argparse
import sys

from ltsearch.cli._common import add_overrides, expand_overrides


def parse_with_overrides(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse with the CLI's own `--set KEY=VALUE` (`args.overrides`), so a benchmark takes overrides as `ltsearch`
    does, e.g. `--set data.name=npz data.path=.bench/cifar10_lt.npz data.imbalance=1` (benchmarks.export_npz)."""
    add_overrides(parser)
    return parser.parse_args(expand_overrides(sys.argv[1:]))


def overrides_flag(overrides: list[str]) -> str:
    """The overrides as they go on a published command line ('' without any)."""
    return f" --set {' '.join(overrides)}" if overrides else ""
