"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set optim.lr=0.05 train.epochs=3 (several after one --set, or "
                             "--set repeated; values are YAML scalars or lists)")
