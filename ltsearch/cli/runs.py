"""`ltsearch runs [NAME|DIR] [--set tracking.uri=...] [--limit N]`: what the store holds, in the terminal.

Without an argument: the newest sweeps, ablations and train runs, each with its trial counts by status and
its best trial. With a sweep directory, an experiment name or a run name: that sweep's trials, best first
by its objective, with the searched params (those that differ between trials) beside the scores.
Epochs are printed from 1, as everywhere else; the store keeps them 0-indexed. A multi-objective sweep's trials
show every objective and whether they are on its Pareto front.

The table goes to stdout; the links to open next (the sweep's saved view and MLflow's compare page for its best
trials or its front, at the store's own server or where `ltsearch ui` listens by default) go to stderr, as hints
do, so the table stays one row per run for grep and scripts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ltsearch.cli._common import add_overrides
from ltsearch.tracking import browse
from ltsearch.tracking.browse import TopRun
from ltsearch.tracking.settings import TrackingConfig

DEFAULT_LIMIT = 20
ERROR_WIDTH = 80
STATUS_ORDER = ("FINISHED", "RUNNING", "SCHEDULED", "FAILED", "KILLED")
CHILD_NOUN = {"sweep": "trial", "ablation": "cell"}  # the parent kinds and what their children are called


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("runs", help="list the sweeps, ablations and train runs in the MLflow store, or one sweep's trials")
    parser.add_argument("target", nargs="?", metavar="NAME|DIR",
                        help="a sweep directory, an experiment name or a run name: list that sweep's trials, best first")
    add_overrides(parser)
    parser.add_argument("--config", metavar="FILE", help="read the store's location from FILE's tracking: section (default: sqlite:///mlruns.db)")
    parser.add_argument("--limit", type=positive_int, default=DEFAULT_LIMIT, help=f"how many runs to list (default {DEFAULT_LIMIT})")
    parser.add_argument("--sync", metavar="DIR", help="write a finished sweep's or an ablation's directory into the store it was tracked "
                                                       "to (what an unreachable store missed); safe to repeat")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.sync:
        browse.load_settings(None, args.overrides)  # only tracking.* overrides: where to replay, not what
        return sync(Path(args.sync), args.overrides)
    settings = browse.load_settings(args.config, args.overrides)
    client = browse.open_client(settings)
    if args.target is None:
        runs = browse.latest(client, limit=args.limit)
        if not runs:
            print(f"no sweeps, ablations or train runs in {settings.resolved_uri()}. {browse.CREATE_HINT}")
            return 0
        print(overview(runs))
        parent = next((top for top in runs if top.kind in CHILD_NOUN), None)
        if parent is not None:
            print(links(settings, parent), file=sys.stderr)
        return 0
    top, siblings = browse.find(client, args.target)
    print(detail(top, siblings, args.limit))
    if top.kind in CHILD_NOUN:
        print(links(settings, top), file=sys.stderr)
    return 0


def links(settings: TrackingConfig, top: TopRun) -> str:
    """Where to open a sweep or an ablation in the UI: the same links `ltsearch ui` prints, at the store's own server, or
    where `ltsearch ui` listens by default."""
    from ltsearch.cli._links import children_links
    from ltsearch.tracking import server

    base = server.store_ui_base(settings)
    after = " (after `ltsearch ui`)" if base == server.base_url(server.LOOPBACK, server.DEFAULT_PORT) else ""
    return "\n".join([f"{top.kind} {top.name} in the MLflow UI{after}:", *children_links(base, top)])


def overview(runs: list[TopRun]) -> str:
    """One row per top-level run, newest first."""
    rows = [[top.kind, top.name, top.experiment, top.status, f"{top.started:%Y-%m-%d %H:%M}", _counts(top) if top.kind != "train" else "-",
             top.best.name if top.best else "-", _score(top.objective, top.metric), _number(top.test_top1), _path(top.dir)]
            for top in runs]
    return table(["KIND", "NAME", "EXPERIMENT", "STATUS", "STARTED", "CHILDREN", "BEST", "OBJECTIVE", "TEST/TOP1", "DIR"], rows)


def detail(top: TopRun, siblings: int, limit: int) -> str:
    """A header line for the run, then its children best first (at most `limit`)."""
    where = f"experiment {top.experiment}, {top.status}, started {top.started:%Y-%m-%d %H:%M}" + (f", dir {_path(top.dir)}" if top.dir else "")
    lines = [f"{top.kind} {top.name} ({where})"]
    if siblings > 1:
        lines.append(f"the newest of {siblings} runs in experiment {top.experiment}; name another by its run name or directory "
                     "(`ltsearch runs` lists them)")
    if top.kind not in CHILD_NOUN:
        lines.append(f"a single run: best/{top.metric} {_number(top.objective)}, best/test/top1 {_number(top.test_top1)}")
        return "\n".join(lines)
    noun, count = CHILD_NOUN[top.kind], len(top.children)
    if not count:
        lines.append(f"no {noun}s logged yet")
        return "\n".join(lines)
    shown = top.children[:limit]
    lines.append(f"{count} {noun}{'s' if count != 1 else ''} ({_counts(top)}), sorted by best/{top.metric}, "
                 f"{'lowest' if top.mode == 'min' else 'highest'} first" + (f"; the first {limit} shown (--limit)" if len(shown) < count else ""))
    params = browse.varying_params(top.children)
    others = [metric for metric, _ in top.objectives[1:]]  # a multi-objective sweep: its other objectives, and its front
    front = ["FRONT"] if others else []
    headers = ["#", "NAME", "STATUS", f"best/{top.metric}", *[f"best/{m}" for m in others], "best/test/top1", "EPOCHS", "SELECTED",
               "STOPPED", *front, *params, "ERROR"]
    rows = [[str(rank), child.name, child.status, _number(child.objective), *[_number(child.scores.get(m)) for m in others],
             _number(child.test_top1), _number(child.epochs), _number(None if child.selected_epoch is None else child.selected_epoch + 1),
             "early" if child.stopped_early else "", *(["yes" if child.pareto else ""] if others else []),
             *[child.params.get(key, "-") for key in params], _clip(child.error or "")]
            for rank, child in enumerate(shown, start=1)]
    lines.append(table(headers, rows))
    return "\n".join(lines)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart; trailing blanks stripped so empty last columns cost nothing."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [headers, *rows])


def _counts(top: TopRun) -> str:
    """'2 finished, 1 failed': the order a reader scans for (what worked, then what did not)."""
    counts = top.status_counts()
    order = sorted(counts, key=lambda status: (STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER), status))
    return ", ".join(f"{counts[status]} {status.lower()}" for status in order) if counts else "none"


def _score(value: float | None, metric: str) -> str:
    return "-" if value is None else f"{metric} {value:.2f}"


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def _path(directory: str | None) -> str:
    """A directory under the working directory is shown relative to it (shorter, and what the user typed)."""
    if not directory:
        return "-"
    if "://" in directory:
        return directory
    relative = os.path.relpath(directory)
    return relative if not relative.startswith("..") else str(Path(directory))


def _clip(text: str) -> str:
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 1] + "…"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def sync(directory: Path, overrides: list[str]) -> int:
    """Replay a directory into its store (or the one `--set tracking.uri=` names) from its own files.

    Runs are found by their tags and nothing is written twice, so this is safe to repeat.
    """
    import json

    import yaml

    from ltsearch.config import apply_overrides
    from ltsearch.errors import ConfigError

    def saved(name: str) -> dict:
        return apply_overrides(yaml.safe_load((directory / name).read_text()), overrides)

    if (directory / "ablation.yaml").is_file():
        from ltsearch.ablate.outputs import AblationOutcome, collect, matrices
        from ltsearch.ablate.settings import parse_ablation
        from ltsearch.ablate.tracking import record_ablation

        ablation = parse_ablation(saved("ablation.yaml"), source=str(directory / "ablation.yaml"))
        results, records = collect(ablation, str(directory.resolve()))
        outcome = AblationOutcome(str(directory.resolve()), results, matrices(ablation, results), all(r.status != "pending" for r in results))
        files = {name: (directory / name).read_bytes() for name in ("matrix.md", "matrix.tex", "matrix.html", "matrix.parquet", "heatmap.png")
                 if (directory / name).is_file()}
        said = record_ablation(ablation, str(directory.resolve()), outcome, records, files, None)
    elif (directory / "trials.parquet").is_file():
        from ltsearch.results import read_table
        from ltsearch.tune import SweepOutcome, parse_sweep
        from ltsearch.tune.tracking import record_sweep

        sweep = parse_sweep(saved("sweep.yaml"), source=str(directory / "sweep.yaml"))
        trials = [{**row, "config": json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]}
                  for row in read_table(directory / "trials.parquet")]
        outcome = SweepOutcome(str(directory.resolve()), trials, read_table(directory / "history.parquet"), None, True)
        said = record_sweep(sweep, str(directory.resolve()), outcome, {}, None)
    else:
        raise ConfigError("--sync", str(directory), "a finished sweep directory (trials.parquet) or an ablation directory (ablation.yaml)")
    print(said or f"{directory}: the store is still unreachable; nothing is lost, run this again later")
    return 0 if said else 1
