"""The Pareto front of a multi-objective sweep as a result: `pareto.parquet`, one runnable `pareto/NN.yaml` per point,
`pareto.png`, and the table printed at the end of the sweep and by `ltsearch report`.

A trial's point is its objectives at its selected epoch (objectives.py: one model per trial). The front is taken
among trials that trained their whole budget ("completed"): a trial the scheduler stopped early holds values at
fewer epochs than its configuration trains when rerun, so it is drawn (hollow) but cannot be a point of the front.
A point is on the front when no other completed trial is at least as good on every objective and better on one;
trials with equal values keep each other. Points are numbered best first on the first objective.
"""

from __future__ import annotations

import json
from typing import Any

from ltsearch.config import dump_yaml
from ltsearch.epochs import SELECTABLE
from ltsearch.plots import pareto_plot
from ltsearch.results import write_bytes_to, write_table_to, write_text_to
from ltsearch.tune._names import _join
from ltsearch.tune.objectives import EPOCH_RULE_TEXT, Objective, non_dominated, select_epoch
from ltsearch.tune.trainable import TrialPlan, trial_run_config

PARETO_FILE = "pareto.parquet"
PARETO_PLOT = "pareto.png"
PARETO_DIR = "pareto"
#: trial statuses whose point may be on the front (see the module docstring)
ELIGIBLE = ("completed",)


def front(trials: list[dict[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    """The non-dominated eligible trials, best first on the first objective (then the next ones, then the trial id)."""
    candidates = [(row, objective.values(row, "best/")) for row in trials if row.get("status") in ELIGIBLE]
    scored = [(row, values) for row, values in candidates if values is not None]
    signs = objective.signs()
    kept = [scored[i] for i in non_dominated([values for _, values in scored], signs)]
    kept.sort(key=lambda item: (*(-s * v for s, v in zip(signs, item[1])), str(item[0]["trial_id"])))
    return [row for row, _ in kept]


def point_name(index: int, count: int) -> str:
    """`01` ... `12`: zero-padded so the files sort in the front's order."""
    return f"{index + 1:0{max(2, len(str(count)))}d}"


def test_key(metric: str) -> str:
    """The test counterpart of a validation objective (`val/few` -> `test/few`), reported at the same epoch."""
    return "test/" + metric.split("/", 1)[1]


def point_rows(points: list[dict[str, Any]], objective: Objective, keys: list[str]) -> list[dict[str, Any]]:
    """One row per front point for pareto.parquet: its number and file, the trial, the objectives and their test
    counterparts at the selected epoch, test/top1 there, the sampled keys and the trial's config (JSON)."""
    rows = []
    for index, trial in enumerate(points):
        name = point_name(index, len(points))
        tests = dict.fromkeys([test_key(m) for m in objective.metrics] + ["test/top1"])
        row: dict[str, Any] = {"point": index + 1, "file": f"{PARETO_DIR}/{name}.yaml", "trial_id": trial["trial_id"],
                               "status": trial["status"], "epochs": trial["epochs"], "best_epoch": trial["best_epoch"]}
        row.update({f"best/{m}": trial.get(f"best/{m}") for m in objective.metrics})
        row.update({f"best/{t}": trial.get(f"best/{t}") for t in tests})
        row.update({key: trial.get(key) for key in keys})
        config = trial["config"]
        row["config"] = config if isinstance(config, str) else json.dumps(config, sort_keys=True, default=str)
        rows.append(row)
    return rows


def write_front(objective: Objective, keys: list[str], directory: str, trials: list[dict[str, Any]], plan: TrialPlan,
                title: str) -> list[dict[str, Any]]:
    """pareto.parquet, pareto/NN.yaml and pareto.png in `directory`; returns the rows of pareto.parquet."""
    points = front(trials, objective)
    rows = point_rows(points, objective, keys)
    write_table_to(rows, _join(directory, PARETO_FILE))
    for row, trial in zip(rows, points):
        write_text_to(_point_yaml(row, trial, objective, directory, plan, len(rows)), _join(directory, row["file"]))
    write_bytes_to(plot_front(objective, trials, rows, title), _join(directory, PARETO_PLOT))
    return rows


def plot_front(objective: Objective, trials: list[dict[str, Any]], rows: list[dict[str, Any]], title: str) -> bytes:
    """pareto.png: every scored trial, the front's points numbered as their files are."""
    labels = {row["trial_id"]: _label(row) for row in rows}
    plotted = [{"values": values, "label": labels.get(trial["trial_id"]), "eligible": trial.get("status") in ELIGIBLE}
               for trial in trials if trial.get("status") != "error" for values in [objective.values(trial, "best/")] if values is not None]
    return pareto_plot(plotted, list(objective.metrics), list(objective.modes), title)


def _point_yaml(row: dict[str, Any], trial: dict[str, Any], objective: Objective, directory: str, plan: TrialPlan, count: int) -> str:
    """The trial's run config, rerunnable by `ltsearch train`, selecting its epoch on the first objective as the sweep did."""
    config = trial_run_config(plan, trial_point(trial))
    note = ""
    if config.train.select_metric != objective.metric:
        config.train.select_metric = objective.metric
        note = f"# train.select_metric is set to {objective.metric}, the first objective, so the rerun selects the same epoch\n"
    if objective.mode == "min":
        note += f"# note: train selects the epoch with the highest {objective.metric}; the sweep minimised it, so the rerun may select another\n"
    values = ", ".join(f"{m} = {row[f'best/{m}']:.4g}" for m in objective.metrics)
    tests = ", ".join(f"{t} = {row[f'best/{t}']:.4g}" for t in dict.fromkeys([test_key(m) for m in objective.metrics] + ["test/top1"])
                      if row.get(f"best/{t}") is not None)
    header = (f"# Pareto point {row['point']} of {count} of sweep {directory}: trial {trial['trial_id']}\n"
              f"# {values} at epoch {trial['best_epoch'] + 1}/{trial['planned_epochs']} ({EPOCH_RULE_TEXT})\n"
              + (f"# test at that epoch: {tests}\n" if tests else "") + note +
              f"# rerun: ltsearch train {_join(directory, row['file'])}\n")
    return header + dump_yaml(config)


def front_table(objective: Objective, rows: list[dict[str, Any]], keys: list[str], trials: list[dict[str, Any]]) -> str:
    """The front as Markdown: a line saying what it is taken over, then one row per point."""
    completed = sum(t.get("status") in ELIGIBLE for t in trials)
    stopped = sum(t.get("status") == "stopped" for t in trials)
    head = (f"**Pareto front: {len(rows)} of {completed} completed trials** ({objective.describe()}; each trial at {EPOCH_RULE_TEXT}"
            + (f"; {stopped} trials stopped early are not eligible: their values are at fewer epochs" if stopped else "") + ")\n\n")
    tests = list(dict.fromkeys([test_key(m) for m in objective.metrics] + ["test/top1"]))
    columns = ["#", "trial", *objective.metrics, *tests, "epoch", *keys]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_label(row), row["trial_id"], *[_cell(row.get(f"best/{m}")) for m in objective.metrics],
                 *[_cell(row.get(f"best/{t}")) for t in tests], str(row["best_epoch"] + 1), *[_cell(row.get(k)) for k in keys]]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["-"] * len(columns)) + " |")
    return head + "\n".join(lines) + "\n"


def front_so_far(objective: Objective, logged: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """An unfinished sweep's trials (epoch rows by trial, epochs.jsonl): each one's objectives at the epoch selected so
    far, and `front so far` = non-dominated among them (any status: whether a trial completes is not known yet)."""
    table = []
    for trial, epochs in logged.items():
        chosen = select_epoch(epochs, objective, SELECTABLE) or {}
        table.append({"trial": trial, "status": "running or stopped", "epochs": len(epochs), **{m: chosen.get(m) for m in objective.metrics}})
    scored = [row for row in table if objective.values(row) is not None]
    on_front = {id(scored[i]) for i in non_dominated([objective.values(row) for row in scored], objective.signs())}
    for row in table:
        row["front so far"] = "yes" if id(row) in on_front else ""
    return table


def trial_point(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled config: a dict in a sweep's outcome, JSON text once read back from trials.parquet."""
    config = trial["config"]
    return json.loads(config) if isinstance(config, str) else dict(config)


def _label(row: dict[str, Any]) -> str:
    """The point's number as its file is named (`pareto/03.yaml` -> `03`)."""
    return row["file"].rsplit("/", 1)[-1].removesuffix(".yaml")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
