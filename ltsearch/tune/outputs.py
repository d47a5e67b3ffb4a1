"""What a sweep leaves: every trial collected from storage (`finish`), trials.parquet, history.parquet,
best.yaml, with several objectives the Pareto front (pareto.py), and the summary printed at the end.
"""

from __future__ import annotations

import ast
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas

from ltsearch.config import dump_yaml
from ltsearch.epochs import SELECTABLE
from ltsearch.results import location_exists, read_text_from, write_table_to, write_text_to
from ltsearch.tracking.record import CLASS_COUNTS
from ltsearch.tune._names import BEST_FILE, EPOCHS, HISTORY_FILE, PARETO_COLUMN, TRIALS_FILE, _join
from ltsearch.tune.epochlog import RAY_KEYS, read_epoch_log
from ltsearch.tune.importance import SUMMARY_MIN_TRIALS, Importance, compute as compute_importance, write as write_importance
from ltsearch.tune.objectives import Objective, select_epoch
from ltsearch.tune.pareto import PARETO_DIR, PARETO_FILE, PARETO_PLOT, front, front_table, write_front
from ltsearch.tune.progress import _fmt
from ltsearch.tune.settings import Sweep
from ltsearch.tune.trainable import TrialPlan, _plan, trial_run_config


@dataclass
class SweepOutcome:
    """What a finished sweep leaves: its directory, one row per trial, one row per trial-epoch, the best trial (on the
    first objective), and with several objectives the rows of pareto.parquet."""

    directory: str
    trials: list[dict[str, Any]]
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    finished: bool
    front: list[dict[str, Any]] | None = None
    importance: Importance | None = None  # when the summary computed it (enough finished trials)


def finish(sweep: Sweep, directory: str, grid: Any, stream: Any) -> SweepOutcome:
    """Collect every trial from storage; if all finished, write trials.parquet, history.parquet and best.yaml."""
    plan = _plan(sweep)
    trials, history = [], []
    logged = read_epoch_log(directory, EPOCHS)
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")  # not metrics["trial_id"]: a PBT exploit reports the donor's id
        trial_rows = logged.get(trial_id) or _epoch_rows(result)
        history.extend({"trial_id": trial_id, **row} for row in trial_rows)
        trials.append(_trial_row(trial_id, result, trial_rows, plan, sweep))
    finished = len(trials) == sweep.num_trials and all(t["status"] != "unfinished" for t in trials)
    outcome = SweepOutcome(directory, trials, history, _best_trial(trials, sweep.objective), finished)
    if not finished:
        print(f"the sweep stopped before every trial finished; continue it with: ltsearch tune --resume {directory}", file=stream)
        return outcome
    if sweep.objective.multi:
        on_front = {row["trial_id"] for row in front(trials, sweep.objective)}
        for row in trials:
            row[PARETO_COLUMN] = row["trial_id"] in on_front
    write_table_to(trials, _join(directory, TRIALS_FILE))
    write_table_to(history, _join(directory, HISTORY_FILE))
    best = outcome.best
    if best is not None:
        config = trial_run_config(plan, best["config"])
        values = ", ".join(f"{m} = {best[f'best/{m}']}" for m in sweep.objective.metrics)
        header = (f"# best trial {best['trial_id']} of sweep {directory}\n# {values} "
                  f"at epoch {best['best_epoch'] + 1}/{best['planned_epochs']} ({best['epochs']} epochs run)\n# rerun: ltsearch train {_join(directory, BEST_FILE)}\n")
        write_text_to(header + dump_yaml(config), _join(directory, BEST_FILE))
    if sweep.objective.multi:
        outcome.front = write_front(sweep.objective, list(sweep.space.keys), directory, trials, plan, sweep.name)
    _print_summary(sweep, outcome, stream)
    _importance_section(sweep, outcome, stream)
    return outcome


def _importance_section(sweep: Sweep, outcome: SweepOutcome, stream: Any) -> None:
    """With enough finished trials (and not under PBT), which key mattered: the table, importance.* files, kept on the outcome."""
    ended = sum(row["status"] in ("completed", "stopped") for row in outcome.trials)
    if ended < SUMMARY_MIN_TRIALS or sweep.scheduler.name == "pbt":
        return
    try:
        outcome.importance = compute_importance(sweep, outcome.trials)
        text = write_importance(outcome.importance, outcome.directory, sweep.name)
    except Exception as error:  # noqa: BLE001 - the sweep's results are written; an analysis on top must not fail the command
        print(f"parameter importance could not be computed ({type(error).__name__}: {error}); "
              f"try: ltsearch report {outcome.directory} --importance", file=stream, flush=True)
        return
    print("\n" + text, file=stream, flush=True)


def _best_trial(trials: list[dict[str, Any]], objective: Objective) -> dict[str, Any] | None:
    """The trial best on the first objective (the first such trial); on a tie, the one better on the next objectives,
    so that with several objectives best.yaml is a point of the front whenever a completed trial leads."""
    def rank(row: dict[str, Any]) -> tuple[float, ...]:
        values = [row.get(f"best/{m}") for m in objective.metrics]
        return tuple(s * v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf for s, v in zip(objective.signs(), values))

    scored = [row for row in trials if rank(row)[0] > -math.inf]
    return max(scored, key=rank) if scored else None


def _epoch_rows(result: Any) -> list[dict[str, Any]]:
    """One row per epoch (the last report wins when a restored trial re-ran an epoch).

    Ray reads a trial's reports from its result.json; when that file is missing (seen under PBT, whose
    exploits restart trials) the same reports are in progress.csv, so a finished trial is never lost.
    """
    frame = result.metrics_dataframe
    if frame is None or EPOCHS not in frame:
        frame = _progress_csv(result.path)
    if frame is None or EPOCHS not in frame:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in frame.to_dict("records"):
        row = {k: _plain(v) for k, v in record.items() if k not in RAY_KEYS and not k.startswith("config/")}
        by_epoch[int(record[EPOCHS])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _plain(value: Any) -> Any:
    """Python scalars and lists (per-class accuracies) from what pandas and progress.csv hold."""
    if isinstance(value, str) and value.startswith("["):
        try:
            return [_plain(v) for v in ast.literal_eval(value)]  # progress.csv writes lists as their repr
        except (ValueError, SyntaxError):
            return value
    if hasattr(value, "tolist") and getattr(value, "ndim", 0):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def error_reason(error: BaseException | None) -> str | None:
    """The exception's own line ("TrainingDiverged: training diverged in epoch 3/10, ..."), not Ray's task header."""
    if error is None:
        return None
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _progress_csv(trial_path: str) -> Any:
    """The trial's progress.csv as a DataFrame, or None when it is absent or unreadable."""
    location = _join(trial_path, "progress.csv")
    if not location_exists(location):
        return None
    try:
        return pandas.read_csv(io.StringIO(read_text_from(location)))
    except (ValueError, OSError):
        return None


def _trial_row(trial_id: str, result: Any, rows: list[dict[str, Any]], plan: TrialPlan, sweep: Sweep) -> dict[str, Any]:
    config = {k: v for k, v in (result.config or {}).items()}
    epochs = rows[-1][EPOCHS] if rows else 0
    planned = trial_run_config(plan, config).train.epochs
    status = "error" if result.error else "completed" if epochs >= planned else "stopped" if (result.metrics or {}).get("done") else "unfinished"
    best = select_epoch(rows, sweep.objective, SELECTABLE)  # never an epoch before the method started (`train.select_epochs`)
    metric_keys = [k for k in (rows[-1] if rows else {}) if k not in (EPOCHS, "node_id", "epoch", CLASS_COUNTS) and not k.startswith("best/")]
    out: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": epochs, "planned_epochs": planned,
                           "best_epoch": best.get("epoch") if best else None, "node_id": rows[-1].get("node_id") if rows else None,
                           "error": error_reason(result.error), "config": config}
    out.update({key: config.get(key) for key in sweep.space.keys})
    out.update({f"final/{k}": rows[-1].get(k) for k in metric_keys})
    out.update({f"best/{k}": (best or {}).get(k) for k in metric_keys})
    return out


def _print_summary(sweep: Sweep, outcome: SweepOutcome, stream: Any) -> None:
    statuses: dict[str, int] = {}
    for row in outcome.trials:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    metric = sweep.objective.metric
    print(f"done: {len(outcome.trials)} trials (" + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ")", file=stream)
    for row in outcome.trials:
        if row["status"] == "error":
            print(f"  trial {row['trial_id']} failed: {row['error']}", file=stream)
    best = outcome.best
    if best is None:
        print("no trial reported the metric; see the error.txt files under " + outcome.directory, file=stream)
        return
    params = ", ".join(f"{k}={_fmt(best['config'].get(k))}" for k in sweep.space.keys if k in best["config"])
    test = best.get("best/test/top1")
    others = "".join(f", {m} {_fmt(best.get(f'best/{m}'))}" for m in sweep.objective.metrics[1:])
    print(f"best trial {best['trial_id']}: {metric} {_fmt(best[f'best/{metric}'])}{others} at epoch {best['best_epoch'] + 1}/{best['planned_epochs']}"
          f"{f' (test/top1 {_fmt(test)} there)' if test is not None else ''}; {params}", file=stream)
    print(f"wrote {_join(outcome.directory, BEST_FILE)} (rerun: ltsearch train {_join(outcome.directory, BEST_FILE)}), "
          f"{TRIALS_FILE}, {HISTORY_FILE}", file=stream, flush=True)
    if outcome.front is not None:
        print("\n" + front_table(sweep.objective, outcome.front, list(sweep.space.keys), outcome.trials), file=stream)
        first = _join(outcome.directory, outcome.front[0]["file"]) if outcome.front else None
        print(f"wrote {PARETO_FILE}, {PARETO_PLOT} and one run config per point in {_join(outcome.directory, PARETO_DIR)}/"
              + (f" (rerun one: ltsearch train {first})" if first else ""), file=stream, flush=True)
