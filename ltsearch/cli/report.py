"""`ltsearch report NAME|DIR [--format md|latex|html|csv] [--metric KEY] [--top N] [--diagnostics] [--importance]`: print
stored results, run nothing.

DIR is an ablation directory (its matrix, rebuilt from the runs' result files) or a sweep directory (its
best trials, or with several objectives its Pareto front); NAME finds the newest `<storage>/<NAME>-<time>`
directory of either kind. A partly finished ablation or sweep prints what exists, marked as partial.
`--importance` (sweeps) adds each searched key's importance per objective (tune/importance.py), written beside
the sweep's files and logged to its MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import types
from pathlib import Path

from ltsearch.cli._common import one_line_error
from ltsearch.config import read_saved
from ltsearch.errors import ConfigError

FORMATS = ("md", "latex", "html", "csv")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="print an ablation's matrix or a sweep's best trials from stored results")
    parser.error = types.MethodType(one_line_error, parser)  # type: ignore[method-assign]  # (no --set here to do it)
    parser.add_argument("target", help="an ablation or sweep directory, or a name (the newest <storage>/<name>-<time>)")
    parser.add_argument("--format", choices=FORMATS, default="md", help="md (default), latex, html or csv")
    parser.add_argument("--metric", help="the metric to show (default: the ablation's metric, or the sweep's objective)")
    parser.add_argument("--top", type=int, default=10, help="sweeps: how many trials (default 10)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="ablations: also what each row's method did while it was on (its aug/* and aux-loss means)")
    parser.add_argument("--importance", action="store_true",
                        help="sweeps: also each searched key's importance per objective (fANOVA, PED-ANOVA) from the finished trials; "
                             "writes importance.md/.parquet/.png in the sweep directory and logs them to the sweep's MLflow run")
    parser.add_argument("--storage", default="runs", help="where to look for NAME (default: runs)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    directory = locate(args.target, Path(args.storage))
    if (directory / "ablation.yaml").is_file():
        if args.importance:
            raise ConfigError("--importance", str(directory), "a sweep directory; an ablation's matrix already says what each row changes")
        print(ablation_report(directory, args.format, args.metric), end="")
        if args.diagnostics:
            print("\n" + diagnostics_report(directory), end="")
    else:
        print(sweep_report(directory, args.format, args.metric, args.top), end="")
        if args.importance:
            print("\n" + importance_report(directory), end="")
    return 0


def locate(target: str, storage: Path) -> Path:
    """A directory as given, or the newest `<storage>/<target>-*` holding an ablation or a sweep."""
    path = Path(target)
    if path.is_dir():
        if not ((path / "ablation.yaml").is_file() or (path / "sweep.yaml").is_file()):
            raise ConfigError("target", target, "an ablation directory (ablation.yaml) or a sweep directory (sweep.yaml)")
        return path
    if path.is_absolute() or len(path.parts) > 1:  # a path, not a name: nothing to look for under storage
        raise ConfigError("target", target, "an ablation or sweep directory, but there is no directory at this path")
    found = sorted((p for p in storage.glob(f"{target}-*") if (p / "ablation.yaml").is_file() or (p / "sweep.yaml").is_file()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError("target", target, f"a directory, or the name of an ablation or sweep under {storage}/ (none is called {target}-*)")
    return found[-1]


def ablation_report(directory: Path, fmt: str, metric: str | None) -> str:
    from ltsearch.ablate.matrix import build_matrix
    from ltsearch.ablate.outputs import collect
    from ltsearch.ablate.render import aggregated_rows, to_html, to_latex, to_markdown

    ablation = _saved_ablation(directory)
    results, _ = collect(ablation, str(directory))
    metric = metric or ablation.metric
    matrix = build_matrix(results, rows=list(ablation.rows), columns=list(ablation.column_labels), metric=metric,
                          baseline=ablation.baseline, seeds=list(ablation.seeds), fmt=ablation.fmt)
    ended = sum(r.status != "pending" for r in results)
    head = "" if ended == len(results) else f"partial: {ended} of {len(results)} runs have ended (cells marked n=k/N)\n\n"
    reference = (ablation.reference or None, ablation.reference_source) if metric == ablation.metric else (None, None)
    if fmt == "csv":
        return _csv(aggregated_rows(matrix))
    render = {"md": to_markdown, "latex": to_latex, "html": to_html}[fmt]
    return head + render(matrix, *reference)


def diagnostics_report(directory: Path) -> str:
    from ltsearch.ablate.diagnostics import diagnostics_markdown, row_diagnostics

    ablation = _saved_ablation(directory)
    return diagnostics_markdown(row_diagnostics(ablation, str(directory)), list(ablation.rows))


def _saved_ablation(directory: Path):
    from ltsearch.ablate.settings import parse_ablation

    return parse_ablation(read_saved(directory / "ablation.yaml", "target"), source=str(directory / "ablation.yaml"))


def sweep_report(directory: Path, fmt: str, metric: str | None, top: int) -> str:
    """The best `top` trials: from trials.parquet when the sweep finished, else from the driver's epoch log (partial).

    A multi-objective sweep prints its Pareto front instead (unless --metric asks for one metric's ranking); partial,
    each trial's point so far and whether it is on the front of the trials reported so far."""
    from ltsearch.results import read_table
    from ltsearch.tune import parse_sweep
    from ltsearch.tune._names import EPOCHS
    from ltsearch.tune.epochlog import read_epoch_log
    from ltsearch.tune.pareto import front, front_so_far, front_table, point_rows

    if fmt not in ("md", "csv"):
        raise ConfigError("--format", fmt, "md or csv for a sweep (latex and html are for ablation matrices)")
    sweep = parse_sweep(read_saved(directory / "sweep.yaml", "target"), source=str(directory / "sweep.yaml"))
    objective, keys = sweep.objective, list(sweep.space.keys)
    several = objective.multi and metric is None
    metric = metric or objective.metric
    mode = objective.mode_of(metric) if metric in objective.metrics else objective.mode
    sign = 1.0 if mode == "max" else -1.0
    if (directory / "trials.parquet").is_file():
        rows, head = read_table(directory / "trials.parquet"), ""
        if several:
            points = point_rows(front(rows, objective), objective, keys)
            return _csv(points) if fmt == "csv" else f"**{sweep.name}**\n\n" + front_table(objective, points, keys, rows)
        table = [{"trial": r["trial_id"], "status": r["status"], "epochs": r["epochs"], metric: r.get(f"best/{metric}"),
                  **{k: r.get(k) for k in keys}} for r in rows]
    else:
        logged = read_epoch_log(str(directory), EPOCHS)
        head = f"partial: the sweep has not finished; {len(logged)} trials reported so far\n\n"
        if several:
            table = front_so_far(objective, logged)
        else:
            table = []
            for trial, epochs in logged.items():
                values = [e[metric] for e in epochs if isinstance(e.get(metric), (int, float))]
                table.append({"trial": trial, "status": "running or stopped", "epochs": len(epochs),
                              metric: (max if sign > 0 else min)(values) if values else None})
    table.sort(key=lambda r: -sign * r[metric] if isinstance(r[metric], (int, float)) else float("inf"))
    table = table[:top]
    if fmt == "csv":
        return _csv(table)
    columns = list(table[0]) if table else ["trial"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in table]
    return head + f"**{sweep.name}: best {len(table)} trials by {metric} ({mode})**\n\n" + "\n".join(lines) + "\n"


def importance_report(directory: Path) -> str:
    """The importance table of a finished sweep; its files written beside the sweep's and logged to its MLflow run."""
    from ltsearch.results import read_table
    from ltsearch.tracking.record import attach_to_parent
    from ltsearch.tune import parse_sweep
    from ltsearch.tune.importance import IMPORTANCE_FILE, IMPORTANCE_PLOT, IMPORTANCE_TABLE, compute, wide_rows, write
    from ltsearch.tune.tracking import SWEEP_KIND

    if not (directory / "trials.parquet").is_file():
        raise ConfigError("--importance", str(directory), "a finished sweep (its trials.parquet); importances need every trial's result",
                          hint=f"Finish it first: ltsearch tune --resume {directory}")
    sweep = parse_sweep(read_saved(directory / "sweep.yaml", "target"), source=str(directory / "sweep.yaml"))
    result = compute(sweep, read_table(directory / "trials.parquet"))
    text = write(result, str(directory), directory.name)
    files = {name: (directory / name).read_bytes() for name in (IMPORTANCE_TABLE, IMPORTANCE_FILE, IMPORTANCE_PLOT)}
    said = attach_to_parent(sweep.tracking, sweep.name, SWEEP_KIND, str(directory.resolve()), files, {"importance.json": wide_rows(result)})
    return text + f"\nwrote {IMPORTANCE_TABLE}, {IMPORTANCE_FILE} and {IMPORTANCE_PLOT} in {directory}; {said}\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows)
    return out.getvalue()
