"""`ltsearch ablate FILE [--set k=v ...] [--address A] [--out DIR] [--dry-run]` and `ltsearch ablate --resume DIR`.

Runs every row × column × seed pair of an ablation file on Ray (locally or on a cluster), each run
selected on validation, and writes the matrix (Markdown, LaTeX, HTML, Parquet, heatmap) into the
ablation directory; tracked in MLflow as one parent run with a child run per cell × seed. Rerunning the
same file with the same `--out`, or `--resume DIR`, trains only the runs that have not ended (so adding a
seed or a row trains only the new runs).
"""

from __future__ import annotations

import argparse

from ltsearch.cli._common import add_overrides
from ltsearch.cli.tune import use_token_auth
from ltsearch.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ablate", help="run an ablation matrix (rows x columns x seeds) on Ray and write the paper-style tables")
    parser.add_argument("file", nargs="?", help="ablation file: base, rows (or auto), columns, seeds, metric, baseline, reference")
    add_overrides(parser)
    parser.add_argument("--address", help="join a running Ray cluster: auto, IP:PORT or ray://HOST:PORT (default: start Ray here)")
    parser.add_argument("--out", help="ablation directory (default: <storage or runs>/<name>-<time>); an existing one of the same "
                                      "ablation is continued: only runs without a result are trained")
    parser.add_argument("--resume", metavar="DIR", help="continue the ablation saved in DIR (its ablation.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="validate every run and print the matrix shape, runs and epochs; start nothing")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="train every one of the runs from epoch 0, even those that agree until their method's start epoch "
                             "(by default such runs train that shared prefix once and fork from it; same as --set share_prefix=false)")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS", help="seconds between progress tables (default 10)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    use_token_auth(args.address)
    if args.no_share_prefix:
        args.overrides = [*args.overrides, "share_prefix=false"]
    from ltsearch.ablate.runner import resume_ablation, run_ablation
    from ltsearch.ablate.settings import load_ablation

    if args.resume:
        if args.file or args.overrides or args.out or args.dry_run:
            raise ConfigError("--resume", args.resume, "an ablation directory alone: it continues as saved",
                              hint="To change the ablation, edit the file and rerun it with --out DIR: only new runs are trained.")
        outcome = resume_ablation(args.resume, address=args.address)
    else:
        if not args.file:
            raise ConfigError("file", None, "an ablation file, e.g. `ltsearch ablate ablations/safa_table6.yaml`, or --resume DIR")
        ablation = load_ablation(args.file, args.overrides)
        if args.dry_run:
            from ltsearch.prefix.plan import ablation_configs, describe_sharing

            print(ablation.describe())
            print(describe_sharing(ablation_configs(ablation), ablation.execution.share_prefix))
            return 0
        outcome = run_ablation(ablation, directory=args.out, address=args.address, progress_interval_s=args.progress_every)
    if not outcome.finished:
        return 130
    return 0 if any(r.status == "completed" for r in outcome.results) else 1
