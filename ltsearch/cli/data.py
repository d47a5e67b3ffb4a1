"""`ltsearch data CONFIG`: show the constructed long-tailed dataset (counts per class and split, the construction)."""

from __future__ import annotations

import argparse
import json

from ltsearch.cli._common import add_overrides
from ltsearch.config import load_run_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="print the constructed dataset: classes, per-class counts, construction")
    parser.add_argument("config", nargs="?", help="run config YAML (default: the embedded digits default)")
    add_overrides(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ltsearch.data import build_dataset, verify_files  # torch: imported when the command runs, not with the parser

    config = load_run_config(args.config, args.overrides)
    data = build_dataset(config.data)
    verify_files(data)
    summary = data.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    counts = summary["counts"]
    print(f"{summary['name']}: {summary['num_classes']} classes; construction {summary['construction']}")
    print(f"{'class':>24} {'train':>7} {'val':>6} {'test':>6}")
    for index, name in enumerate(summary["class_names"]):
        print(f"{name[:24]:>24} {counts['train'][index]:>7} {counts['val'][index]:>6} {counts['test'][index]:>6}")
    print(f"{'total':>24} {sum(counts['train']):>7} {sum(counts['val']):>6} {sum(counts['test']):>6}")
    return 0
