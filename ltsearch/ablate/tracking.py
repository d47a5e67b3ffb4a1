"""An ablation in MLflow, from the driver: one parent run (kind `ablation`, named after the ablation) with one child
run (kind `cell`) per cell × seed pair, named "row | column | seeds", tagged with its row, column and seeds, and a
saved view of the runs table (tracking/views.py) that groups the cells by row and column, as the matrix does.

As for sweeps (tune/tracking.py), a Ray Tune callback streams epochs and closes each run when it ends,
and `record_ablation` then writes what only the end knows, from the runs' own files: runs finished by an
earlier attempt, the matrix files and the aggregated matrix as an MLflow table (`matrix_cells.json`).
"""

from __future__ import annotations

from typing import Any

import pandas
from ray import tune

from ltsearch.ablate.cells import RUN_KEY, CellPlan, read_result, run_dir
from ltsearch.ablate.settings import Ablation, Run
from ltsearch.config import to_dict
from ltsearch.tracking import record
from ltsearch.tracking import settings as contract
from ltsearch.tracking.record import PARENT, RunRecorder
from ltsearch.tracking.views import ablation_view
from ltsearch.tune.epochlog import RAY_KEYS
from ltsearch.tune.outputs import error_reason

PARENT_KIND = "ablation"
CELL_KIND = "cell"
SELECT = ("val/top1", "max")  # children are summarised at their best-val epoch, as the matrix reads them


class AblationTracking(tune.Callback):
    """Ray Tune callback on the driver (picklable; the writer is rebuilt in `setup`)."""

    def __init__(self, ablation: Ablation, directory: str):
        self.settings, self.experiment, self.directory = ablation.tracking, ablation.name, directory
        self.plan = CellPlan.of(ablation, directory)
        self.parent_params, self.parent_tags = parent_params(ablation), ablation_tags(ablation)
        self.recorder: RunRecorder | None = None
        self.opened: set[str] = set()
        self.summarized: dict[str, str] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "recorder": None, "opened": set(), "summarized": {}}

    def setup(self, **info: Any) -> None:
        tracker = record.start(self.settings, self.experiment)
        if tracker is not None:
            self.recorder = RunRecorder(tracker, self.directory, *SELECT)
            self.recorder.open_parent(PARENT_KIND, parent_name(self.experiment, self.directory), self.parent_params, self.parent_tags)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.recorder is not None:
            self._open(trial)
            self.recorder.epoch(trial.config[RUN_KEY], {k: v for k, v in result.items() if k not in RAY_KEYS})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.recorder is not None:
            self._open(trial)
            run = self.plan.runs[trial.config[RUN_KEY]]
            self.summarized[run.run_id] = summarize_run(self.recorder, self.plan, run)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.recorder is not None:
            self._open(trial)
            self.recorder.failed(trial.config[RUN_KEY], error_reason(trial.get_error()))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.recorder is not None:
            self.recorder.tracker.flush(timeout_s=30.0)

    def _open(self, trial: Any) -> None:
        run_id = trial.config[RUN_KEY]
        if self.recorder is not None and run_id not in self.opened:
            open_run(self.recorder, self.plan, self.plan.runs[run_id], reopen=True)
            self.opened.add(run_id)


def open_run(recorder: RunRecorder, plan: CellPlan, run: Run, *, reopen: bool) -> None:
    tags = {"ltsearch.row": run.row, "ltsearch.column": run.column, "ltsearch.train_seed": str(run.train_seed),
            "ltsearch.data_seed": str(run.data_seed)}
    recorder.open_child(run.run_id, CELL_KIND, to_dict(plan.run_config(run), active_only=True), run.point, tags, reopen=reopen,
                        name=f"{run.row} | {run.column} | seed {run.train_seed}/{run.data_seed}")


def summarize_run(recorder: RunRecorder, plan: CellPlan, run: Run) -> str:
    """Close a run's MLflow run from its own directory (result.json, history.parquet); returns the status written."""
    result = read_result(plan.directory, run.run_id) or {"status": "unfinished"}
    where = run_dir(plan.directory, run.run_id)
    rows = pandas.read_parquet(where / "history.parquet").to_dict("records") if (where / "history.parquet").is_file() else []
    config = plan.run_config(run)
    counts = result.get(record.CLASS_COUNTS)
    rows = [{**row, record.CLASS_COUNTS: counts} for row in rows] if counts else rows
    files = {"config.yaml": (where / "config.yaml").read_bytes()} if (where / "config.yaml").is_file() else {}
    recorder.summarize(run.run_id, result["status"], rows, planned_epochs=config.train.epochs, error=result.get("error"),
                       title=f"{run.row} | {run.column} | seed {run.train_seed}/{run.data_seed}", files=files)
    return result["status"]


def record_ablation(ablation: Ablation, directory: str, outcome: Any, records: list[dict[str, Any]], files: dict[str, bytes], stream: Any,
                    live: AblationTracking | None = None) -> str | None:
    """The ablation's final state in MLflow, from its files; reuses the live writer when there is one."""
    if not ablation.tracking.enabled:
        return None
    recorder = live.recorder if live is not None and live.recorder is not None else None
    summarized = live.summarized if recorder is not None else {}
    opened = live.opened if recorder is not None else set()
    if recorder is None:
        recorder = RunRecorder(record.start(ablation.tracking, ablation.name, stream=stream), directory, *SELECT)
    plan = CellPlan.of(ablation, directory)
    recorder.open_parent(PARENT_KIND, parent_name(ablation.name, directory), parent_params(ablation), ablation_tags(ablation))
    for run in ablation.runs:
        status = next(r["status"] for r in records if r["run_id"] == run.run_id)
        if status == "pending":
            if run.run_id in opened:
                recorder.tracker.close_run(run.run_id, "KILLED")
            continue
        if summarized.get(run.run_id) != status:
            open_run(recorder, plan, run, reopen=False)
            summarize_run(recorder, plan, run)
    tracker = recorder.tracker
    counts = {f"ltsearch.runs.{s}": sum(r["status"] == s for r in records) for s in ("completed", "error", "pending")}
    tracker.set_tags(PARENT, counts)
    tracker.log_table(PARENT, "matrix_cells.json", _cell_rows(outcome))
    for name, content in {**files, "ablation.yaml": _saved(directory)}.items():
        if content:
            tracker.log_artifact(PARENT, name, content)
    recorder.close_prefix_runs()
    tracker.close_run(PARENT, "FINISHED" if outcome.finished else "KILLED")
    parent_id = tracker.run_id(PARENT)
    if parent_id is not None:
        record.save_view(tracker, parent_id, f"{parent_name(ablation.name, directory)}: cells by row and column",
                         ablation_view(parent_id, ablation.metric, SELECT[0]))
    if record.finish(tracker, stream=stream) or parent_id is None:
        return None
    return f"tracked in MLflow ({tracker.uri}, experiment '{tracker.experiment_name}', parent run {parent_id}); browse with: ltsearch ui"


def _cell_rows(outcome: Any) -> list[dict[str, Any]]:
    from ltsearch.ablate.render import aggregated_rows

    return [row for matrix in outcome.matrices.values() for row in aggregated_rows(matrix)]


def _saved(directory: str) -> bytes | None:
    from pathlib import Path

    path = Path(directory) / "ablation.yaml"
    return path.read_bytes() if path.is_file() else None


def parent_name(name: str, directory: str) -> str:
    """The ablation's name, as a sweep's parent is named after its sweep: the folder's name when it is already
    `<name>-<time>`, else the ablation's name with the folder after it (`--out out` gives "safa_table6 (out)")."""
    folder = directory.rstrip("/").rsplit("/", 1)[-1]
    return folder if folder.startswith(name) else f"{name} ({folder})"


def parent_params(ablation: Ablation) -> dict[str, Any]:
    return {key: value for key, value in ablation.raw.items() if key != contract.SECTION}


def ablation_tags(ablation: Ablation) -> dict[str, str]:
    return {"ltsearch.source": ablation.source, "ltsearch.rows": " | ".join(ablation.rows), "ltsearch.columns": " | ".join(ablation.column_labels),
            "ltsearch.matrix_metric": ablation.metric, "ltsearch.baseline": str(ablation.baseline), "ltsearch.num_runs": str(len(ablation.runs))}
