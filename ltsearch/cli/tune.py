"""`ltsearch tune FILE [--set k=v] [--address A] [--out DIR]` and `ltsearch tune --resume DIR`.

Runs a search file on Ray Tune: locally (Ray started in-process) or on a cluster (`--address auto`,
`IP:PORT` or `ray://HOST:PORT`). Writes into the sweep directory: `sweep.yaml` (the resolved file,
what `--resume` reads), one folder per trial (Ray's results and checkpoints), and at the end
`best.yaml` (rerun it with `ltsearch train`), `trials.parquet` and `history.parquet`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ltsearch.cli._common import add_overrides
from ltsearch.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="search hyperparameters on Ray Tune (Optuna samplers, ASHA), locally or on a Ray cluster")
    parser.add_argument("file", nargs="?", help="search file: a run config (or `base:`) plus `space:`, `search:`, `scheduler:` ...")
    add_overrides(parser)
    parser.add_argument("--address", help="join a running Ray cluster: auto, IP:PORT or ray://HOST:PORT (default: start Ray here)")
    parser.add_argument("--out", help="sweep directory, a local path or a URI such as s3://bucket/sweeps/x "
                                      "(default: <storage or runs>/<name>-<time>); must not exist yet")
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR: finished trials are kept, "
                                                        "unfinished ones resume from their checkpoints")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS", help="seconds between progress tables (default 10)")
    parser.set_defaults(handler=run)


def use_token_auth(address: str | None, environ: dict[str, str] = os.environ) -> None:
    """Send this machine's Ray token when joining a cluster by IP:PORT (clusters use token auth by default).

    `address=auto` turns token auth on by itself when a token exists; an explicit address does not, and
    Ray reads RAY_AUTH_MODE once, when it is imported, so this must run before `import ray`.
    A user's own RAY_AUTH_MODE always wins.
    """
    if address in (None, "local", "auto") or address.startswith("ray://") or "RAY_AUTH_MODE" in environ:
        return
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        environ["RAY_AUTH_MODE"] = "token"


def run(args: argparse.Namespace) -> int:
    use_token_auth(args.address)
    from ltsearch.tune import load_sweep, resume_sweep, run_sweep  # Ray and torch: imported only when a sweep runs

    if args.resume:
        if args.file or args.overrides or args.out:
            raise ConfigError("--resume", args.resume, "a sweep directory alone: the sweep continues exactly as it was saved",
                              hint="Drop FILE, --set and --out; to change the search, start a new sweep.")
        outcome = resume_sweep(args.resume, address=args.address)
    else:
        if not args.file:
            raise ConfigError("file", None, "a search file, e.g. `ltsearch tune search_spaces/quickstart.yaml`, or --resume DIR")
        sweep = load_sweep(args.file, args.overrides)
        outcome = run_sweep(sweep, directory=args.out, address=args.address, progress_interval_s=args.progress_every)
    if not outcome.finished:
        return 130
    return 0 if outcome.best is not None else 1
