"""A sweep in MLflow, from the driver: one parent run, one child run per trial.

Two writers, one vocabulary (tracking/record.py):
- `SweepTracking`, a Ray Tune callback, streams each trial's epochs to its child run as results arrive
  and marks a trial FINISHED or FAILED when Tune says it ended. Nothing is logged from inside trials,
  so workers never need MLflow, credentials or network access to the store.
- `record_sweep`, run after `finish()` has collected the sweep's own files, writes what only the end
  knows (best-val summaries, the selected epoch, `stopped_early`, per-class plots, the parent's files
  and search plot) and anything the stream missed: a store that was away, a driver that was killed.
  Runs are found by their tags and steps are never written twice, so this is safe to repeat, and a
  resumed sweep continues its parent and child runs instead of duplicating them.

`record_sweep` also saves the runs-table view the UI opens on (tracking/views.py: the trials best first, with
the objectives and searched keys as columns), and with several objectives tags the front's trials.

PBT changes a trial's hyperparameters mid-run; MLflow params cannot change, so the values a trial
runs with are also logged per epoch as `hp/<key>` metrics under population-based schedulers.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ltsearch.config import to_dict
from ltsearch.tracking import record
from ltsearch.tracking import settings as contract
from ltsearch.tracking.record import PARENT, RunRecorder
from ltsearch.tracking.settings import TrackingConfig
from ltsearch.tracking.views import sweep_view
from ltsearch.results import location_exists, read_bytes_from
from ltsearch.tune._names import BEST_FILE, EPOCHS, SWEEP_FILE, TRIALS_FILE, _join
from ltsearch.tune.epochlog import RAY_KEYS
from ltsearch.tune.importance import IMPORTANCE_FILE, IMPORTANCE_PLOT, IMPORTANCE_TABLE, wide_rows
from ltsearch.tune.objectives import EPOCH_RULE_TEXT
from ltsearch.tune.outputs import SweepOutcome, error_reason
from ltsearch.tune.pareto import PARETO_FILE, PARETO_PLOT, front, point_rows
from ltsearch.tune.settings import Sweep
from ltsearch.tune.trainable import TrialPlan, _plan, trial_run_config

TRIAL_KIND = "trial"
SWEEP_KIND = "sweep"


class SweepTracking(tune.Callback):
    """Ray Tune callback on the driver; picklable (Tune saves it with the experiment that `--resume` restores)."""

    def __init__(self, sweep: Sweep, directory: str, data_tags: dict[str, str], population_based: bool):
        self.settings, self.experiment, self.directory = sweep.tracking, sweep.name, directory
        self.metric, self.mode, self.keys = sweep.objective.metric, sweep.objective.mode, list(sweep.space.keys)
        self.parent_params, self.parent_tags = parent_params(sweep), {**sweep_tags(sweep), **data_tags}
        self.plan, self.population_based = _plan(sweep), population_based
        self.recorder: RunRecorder | None = None
        self.opened: set[str] = set()
        self.rows: dict[str, list[dict[str, Any]]] = {}  # what each trial reported, for its summary when it ends
        self.summarized: dict[str, str] = {}  # trial id -> the status its run was closed with here

    def __getstate__(self) -> dict:  # the writer thread and what it knows belong to one driver process
        return {**self.__dict__, "recorder": None, "opened": set(), "rows": {}, "summarized": {}}

    def setup(self, **info: Any) -> None:
        tracker = record.start(self.settings, self.experiment)
        if tracker is not None:
            self.recorder = RunRecorder(tracker, self.directory, self.metric, self.mode)
            self.recorder.open_parent(SWEEP_KIND, self.directory.rstrip("/").rsplit("/", 1)[-1], self.parent_params, self.parent_tags)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.recorder is None:
            return
        self._open(trial)
        extra = {f"hp/{k}": v for k, v in trial.config.items() if k in self.keys} if self.population_based else None
        self.recorder.epoch(trial.trial_id, result, extra)
        self.rows.setdefault(trial.trial_id, []).append({k: v for k, v in result.items() if k not in RAY_KEYS})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Summarise the trial now, while the others train, so the end of the sweep has little left to do."""
        if self.recorder is None:
            return
        self._open(trial)
        config = trial_run_config(self.plan, trial.config)
        rows = _by_epoch(self.rows.get(trial.trial_id, []))
        status = "completed" if rows and rows[-1].get(EPOCHS, 0) >= config.train.epochs else "stopped"
        _summarize_trial(self.recorder, trial.trial_id, status, rows, config, _point(trial.config, self.keys), None)
        self.summarized[trial.trial_id] = status

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.recorder is not None:
            self._open(trial)
            self.recorder.failed(trial.trial_id, error_reason(trial.get_error()))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Send what is queued; `record_sweep` goes on with this writer when it runs in the same process."""
        if self.recorder is not None:
            self.recorder.tracker.flush(timeout_s=30.0)

    def _open(self, trial: Any) -> None:
        if self.recorder is not None and trial.trial_id not in self.opened:
            config = to_dict(trial_run_config(self.plan, trial.config), active_only=True)
            self.recorder.open_child(trial.trial_id, TRIAL_KIND, config, _point(trial.config, self.keys))
            self.opened.add(trial.trial_id)


def record_sweep(sweep: Sweep, directory: str, outcome: SweepOutcome, data_tags: dict[str, str], stream: Any,
                 live: SweepTracking | None = None) -> str | None:
    """Write the sweep's final state to MLflow from its own files; returns how to open it (None if not tracked).

    `live` is the callback that streamed this sweep in this process: its writer (runs already bound) is
    reused, and trials it already closed with the status the files agree on are left alone. Anything
    else (a resumed sweep, a store that was away) is written from the files, which is safe to repeat.
    """
    if not sweep.tracking.enabled:
        return None
    recorder = live.recorder if live is not None and live.recorder is not None else None
    summarized = live.summarized if recorder is not None else {}
    if recorder is None:
        recorder = RunRecorder(record.start(sweep.tracking, sweep.name, stream=stream), directory, sweep.objective.metric, sweep.objective.mode)
    tracker = recorder.tracker
    recorder.open_parent(SWEEP_KIND, directory.rstrip("/").rsplit("/", 1)[-1], parent_params(sweep), {**sweep_tags(sweep), **data_tags})
    plan, keys = _plan(sweep), list(sweep.space.keys)
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for row in outcome.history:
        by_trial.setdefault(row["trial_id"], []).append(row)
    for trial in outcome.trials:
        rows = by_trial.get(trial["trial_id"], [])
        if summarized.get(trial["trial_id"]) == trial["status"]:
            recorder.epochs(trial["trial_id"], rows)  # only steps the store lacks are written: normally none
        else:
            _record_trial(recorder, plan, keys, trial, rows)
    if outcome.finished and sweep.objective.multi:
        _record_front(recorder, sweep, outcome.trials)
    if outcome.importance is not None:
        recorder.tracker.log_table(PARENT, "importance.json", wide_rows(outcome.importance))
    status = "FINISHED" if outcome.finished else "KILLED"
    recorder.summarize_parent(status, outcome.trials, keys, _parent_files(sweep, directory) if outcome.finished else {})
    parent_id = tracker.run_id(PARENT)
    if parent_id is not None:
        objectives = list(zip(sweep.objective.metrics, sweep.objective.modes))
        record.save_view(tracker, parent_id, f"{directory.rstrip('/').rsplit('/', 1)[-1]}: trials",
                         sweep_view(parent_id, objectives, list(sweep.space.keys)))
    unwritten = record.finish(tracker, stream=stream)
    if unwritten or parent_id is None:
        return None
    return f"tracked in MLflow ({tracker.uri}, experiment '{tracker.experiment_name}', parent run {parent_id}); browse with: ltsearch ui"


def _record_front(recorder: RunRecorder, sweep: Sweep, trials: list[dict[str, Any]]) -> None:
    """Tag every finished trial `ltsearch.pareto` true or false (a resumed sweep's front may differ from an earlier
    record), and put the front on the parent as an MLflow table beside pareto.png and pareto.parquet."""
    points = front(trials, sweep.objective)
    on_front = {row["trial_id"] for row in points}
    for trial in trials:
        if trial["status"] != "unfinished":
            recorder.tracker.set_tags(trial["trial_id"], {contract.TAG_PARETO: str(trial["trial_id"] in on_front).lower()})
    recorder.tracker.log_table(PARENT, "pareto.json", point_rows(points, sweep.objective, list(sweep.space.keys)))


def _record_trial(recorder: RunRecorder, plan: TrialPlan, keys: list[str], trial: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    config = trial_run_config(plan, trial["config"])
    point = _point(trial["config"], keys)
    recorder.open_child(trial["trial_id"], TRIAL_KIND, to_dict(config, active_only=True), point, reopen=False)
    recorder.epochs(trial["trial_id"], rows)
    _summarize_trial(recorder, trial["trial_id"], trial["status"], rows, config, point, trial.get("error"))


def _summarize_trial(recorder: RunRecorder, trial_id: str, status: str, rows: list[dict[str, Any]], config: Any,
                     point: dict[str, Any], error: str | None) -> None:
    plain = to_dict(config)
    recorder.summarize(trial_id, status, rows, planned_epochs=config.train.epochs, error=error,
                       title=record.run_name(plain, point), files={"config.yaml": record.yaml_bytes(plain)})


def _by_epoch(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch, the last report winning (as epochs.jsonl is read)."""
    by_epoch = {row[EPOCHS]: row for row in rows if isinstance(row.get(EPOCHS), int)}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _parent_files(sweep: Sweep, directory: str) -> dict[str, bytes]:
    """The launching YAML as given and as resolved, the trials table, best.yaml, and the front and importances when the
    sweep has them, read back from the sweep directory."""
    files: dict[str, bytes] = {}
    for name in (SWEEP_FILE, TRIALS_FILE, BEST_FILE, PARETO_FILE, PARETO_PLOT, IMPORTANCE_TABLE, IMPORTANCE_FILE, IMPORTANCE_PLOT):
        location = _join(directory, name)
        if location_exists(location):
            files[name] = read_bytes_from(location)
    return files


def parent_params(sweep: Sweep) -> dict[str, Any]:
    """The launching YAML (its run-config part and search keys), flattened; `tracking:` says where, not what."""
    return {key: value for key, value in sweep.raw.items() if key != contract.SECTION}


def sweep_tags(sweep: Sweep) -> dict[str, str]:
    tags = {"ltsearch.source": sweep.source, "ltsearch.sampler": sweep.search.sampler, "ltsearch.scheduler": sweep.scheduler.name,
            "ltsearch.num_trials": str(sweep.num_trials), "ltsearch.max_epochs": str(sweep.max_epochs),
            "ltsearch.space": ", ".join(sweep.space.keys), contract.TAG_OBJECTIVES: sweep.objective.describe()}
    if sweep.objective.multi:
        tags["ltsearch.epoch_rule"] = EPOCH_RULE_TEXT
    if sweep.scheduler.judges:
        tags["ltsearch.scheduler_metric"] = sweep.judged[0]
    return tags


def _point(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {key: config[key] for key in keys if key in config}


def pinned_tracking(sweep: Sweep) -> dict[str, Any]:
    """The `tracking:` section saved in sweep.yaml: the resolved store and experiment, so `--resume` logs to the same runs."""
    settings: TrackingConfig = sweep.tracking
    return {"enabled": settings.enabled, "uri": settings.resolved_uri(), "experiment": settings.experiment or sweep.name,
            "artifacts": settings.artifacts}
