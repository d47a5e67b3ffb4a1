"""What a sweep, a trial and a train run look like in MLflow (the store contract of settings.py, filled in).

`RunRecorder` turns our own records (a run config, an epoch row of history.parquet, a row of
trials.parquet) into Tracker writes. It serves three callers with one vocabulary: the Ray Tune callback
streaming epochs as trials report them, the end-of-sweep reconciliation that writes statuses, summaries
and artifacts from the sweep's own files (and anything the stream could not write), and `ltsearch train`.

Naming: metrics keep the engine's keys (`train/loss`, `val/top1`, `aug/omega`, `lr`, `images_per_s`) at
`step = epoch` (0-indexed, as in history.parquet); summary metrics are `best/<key>`, the values at the
epoch selected on validation (tag `ltsearch.selected_epoch`, same numbering). Ray's bookkeeping
(`time_this_iter_s`, `training_iteration`, ...) never reaches MLflow.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

from ltsearch.plots import per_class_plot, search_plot
from ltsearch.prefix import PREFIX_KEY, SHARED_PREFIX
from ltsearch.tracking import settings as contract
from ltsearch.tracking.store import Tracker

#: per-epoch metric families logged to MLflow; everything else in a report stays in our own files
EPOCH_PREFIXES = ("train/", "val/", "test/", "aug/", "legacy/")
EPOCH_KEYS = ("lr", "images_per_s", "epoch_seconds")
SUMMARY_PREFIXES = ("val/", "test/", "legacy/")
PER_CLASS = "test/per_class"
CLASS_COUNTS = "class_counts"
#: MLflow statuses of our trial statuses (trials.parquet)
STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "error": "FAILED", "unfinished": "KILLED"}
PARENT = "parent"
PREFIX_KIND = "prefix"


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested mappings (`optim.schedule.name`); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The loggable scalars of one epoch row: losses, aux terms, diagnostics, val/test, lr, throughput."""
    return {key: float(value) for key, value in row.items()
            if (key.startswith(EPOCH_PREFIXES) or key in EPOCH_KEYS) and "/num_" not in key and _finite_number(value)}


def summary_metrics(best: dict[str, Any]) -> dict[str, float]:
    return {f"best/{key}": float(value) for key, value in best.items()
            if key.startswith(SUMMARY_PREFIXES) and "/num_" not in key and _finite_number(value)}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_name(config: dict[str, Any], point: dict[str, Any]) -> str:
    """Method and sampled values: "smart+ldam tau=0.31 lr=0.05" (method keys themselves are in the method part)."""
    augmenter, loss = config.get("augmenter", {}).get("name", "none"), config.get("loss", {}).get("name", "ce")
    method = loss if augmenter == "none" else f"{augmenter}+{loss}"
    shown = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in point.items()
             if key not in ("augmenter.name", "loss.name")]
    return " ".join([method, *shown])


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def provenance_tags() -> dict[str, str]:
    """Version, git commit (when the package runs from a checkout) and the command line."""
    from ltsearch import __version__

    tags = {contract.TAG_VERSION: __version__, contract.TAG_COMMAND: shlex.join(["ltsearch", *sys.argv[1:]])}
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if done.returncode == 0:
            tags[contract.TAG_GIT] = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def data_tags(construction: dict[str, Any] | None) -> dict[str, str]:
    """The long-tail construction and the train/val/test fingerprints: equal tags, the very same images."""
    if not construction:
        return {"ltsearch.data": "built per trial (the space changes data.*)"}
    return {f"ltsearch.data.{key}": str(value) for key, value in construction.items() if not isinstance(value, (list, dict))}


class RunRecorder:
    """Writes parents, children and single runs through one Tracker, under the tag contract."""

    def __init__(self, tracker: Tracker, directory: str, metric: str, mode: str):
        self.tracker, self.directory, self.metric, self.mode = tracker, directory, metric, mode
        self.linked: dict[str, str] = {}  # forked run -> its prefix run
        self.prefix_runs: set[str] = set()

    # ------------------------------------------------------------------------------- parents / runs
    def open_parent(self, kind: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        find = {contract.TAG_KIND: kind, contract.TAG_DIR: self.directory}
        self.tracker.open_run(PARENT, name=name, find=find, params=flatten(params), reopen=True,
                              tags={contract.TAG_METRIC: self.metric, contract.TAG_MODE: self.mode, **provenance_tags(), **tags})

    def open_child(self, key: str, kind: str, config: dict[str, Any], point: dict[str, Any], tags: dict[str, str] | None = None,
                   reopen: bool = True, name: str | None = None) -> None:
        self.tracker.open_run(key, name=name or run_name(config, point), parent=PARENT, reopen=reopen,
                              find={contract.TAG_KIND: kind, contract.TAG_TRIAL: key}, params=flatten(config),
                              tags={contract.TAG_METRIC: self.metric, contract.TAG_MODE: self.mode, **(tags or {})})

    def epoch(self, key: str, row: dict[str, Any], extra: dict[str, float] | None = None) -> None:
        """One epoch row of run `key`; an epoch it took from a shared prefix goes to that prefix's run instead, once."""
        if "epoch" not in row:
            return
        if row.get(SHARED_PREFIX) and isinstance(row.get(PREFIX_KEY), str):
            key = self._prefix_run(key, row[PREFIX_KEY])
        self.tracker.log_metrics(key, int(row["epoch"]), {**epoch_metrics(row), **(extra or {})})

    def _prefix_run(self, forked: str, prefix_key: str) -> str:
        """The run holding a shared prefix's epochs (a child of the parent, found again by its key), linked from `forked`."""
        run = f"{PREFIX_KIND}:{prefix_key}"
        if run not in self.prefix_runs:
            self.prefix_runs.add(run)
            self.tracker.open_run(run, name=f"shared prefix {prefix_key[:8]}", parent=PARENT, reopen=True,
                                  find={contract.TAG_KIND: PREFIX_KIND, contract.TAG_PREFIX: prefix_key},
                                  tags={contract.TAG_METRIC: self.metric, contract.TAG_MODE: self.mode})
        if forked not in self.linked:
            self.linked[forked] = run
            self.tracker.set_tags(forked, {contract.TAG_PREFIX: prefix_key})
        return run

    def epochs(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.epoch(key, row)

    def failed(self, key: str, error: str | None) -> None:
        self.tracker.set_tags(key, {contract.TAG_ERROR: error or "unknown error"})
        self.tracker.close_run(key, "FAILED")

    # ------------------------------------------------------------------------------------ summaries
    def summarize(self, key: str, status: str, rows: list[dict[str, Any]], *, planned_epochs: int, error: str | None = None,
                  title: str = "", files: dict[str, bytes] | None = None) -> None:
        """Close a trial or train run from its epoch rows: best-val summary, tags, per-class plot, files, status."""
        best = _best_row(rows, self.metric, self.mode)
        tags: dict[str, Any] = {contract.TAG_EPOCHS: len(rows)}
        if best is not None:
            tags[contract.TAG_SELECTED_EPOCH] = int(best["epoch"])
        if status == "stopped":
            tags[contract.TAG_STOPPED_EARLY] = "true"
            tags["ltsearch.planned_epochs"] = planned_epochs
        if error:
            tags[contract.TAG_ERROR] = error
        prefix_run = self.tracker.run_ids.get(self.linked[key]) if key in self.linked else None  # known by now; never waited for
        if prefix_run is not None:
            tags[contract.TAG_PREFIX_RUN] = prefix_run
        self.tracker.set_tags(key, tags)
        if best is not None:
            self.tracker.log_summary(key, int(best["epoch"]), summary_metrics(best))
            heading = (f"{title}\n{self.metric} {best.get(self.metric, float('nan')):.2f} at epoch {int(best['epoch']) + 1} "
                       f"(selected on validation); test/top1 {best.get('test/top1', float('nan')):.2f}")
            self.tracker.log_artifact(key, "per_class_accuracy.png", lambda: _class_plot(best, heading))
        for name, content in (files or {}).items():
            self.tracker.log_artifact(key, name, content)
        self.tracker.close_run(key, STATUS[status])

    def summarize_parent(self, status: str, trials: list[dict[str, Any]], keys: list[str], files: dict[str, bytes]) -> None:
        """Close the parent: counts by status, the best trial, the search plot and the sweep's files."""
        counts: dict[str, int] = {}
        for row in trials:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        tags: dict[str, Any] = {f"ltsearch.trials.{name}": n for name, n in counts.items()}
        scored = [row for row in trials if _finite_number(row.get(f"best/{self.metric}"))]
        if scored:
            sign = 1.0 if self.mode == "max" else -1.0
            best = max(scored, key=lambda row: sign * row[f"best/{self.metric}"])
            tags["ltsearch.best_trial"] = best["trial_id"]
            self.tracker.log_summary(PARENT, 0, {k: float(v) for k, v in best.items() if k.startswith("best/") and _finite_number(v)})
            self.tracker.log_artifact(PARENT, "search_plot.png", lambda: search_plot(trials, keys, self.metric))
        self.tracker.set_tags(PARENT, tags)
        for name, content in files.items():
            self.tracker.log_artifact(PARENT, name, content)
        self.close_prefix_runs()
        self.tracker.close_run(PARENT, status)

    def close_prefix_runs(self) -> None:
        """Shared prefixes end when their sweep or ablation does (their epochs are all logged by then)."""
        for run in sorted(self.prefix_runs):
            self.tracker.close_run(run, "FINISHED")


def _best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [row for row in rows if _finite_number(row.get(metric)) and "epoch" in row]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda row: (sign * row[metric], -row["epoch"]))  # ties: the earliest epoch, as the engine selects


def _class_plot(row: dict[str, Any], title: str) -> bytes | None:
    per_class, counts = row.get(PER_CLASS), row.get(CLASS_COUNTS)
    if per_class is None or counts is None or len(per_class) != len(counts) or not len(counts):
        return None
    return per_class_plot([None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in per_class],
                          [int(c) for c in counts], title)


def save_view(tracker: Tracker, parent_id: str, name: str, state: dict[str, Any]) -> None:
    """The parent's saved view of the runs table (views.py), named `name`, rewritten each time the run is recorded."""
    import time

    from ltsearch.tracking.views import envelope, view_tag

    tracker.set_experiment_tag(view_tag(parent_id), envelope(name, state, int(time.time() * 1000)))


def attach_to_parent(settings: contract.TrackingConfig, experiment: str, kind: str, directory: str, files: dict[str, bytes],
                     tables: dict[str, list[dict[str, Any]]]) -> str:
    """Add files and MLflow tables to the parent run recorded for `directory` (what `ltsearch report` computes after
    the run ended); its status and everything else stay. Never creates a run: returns one line saying where the
    files went, or why they did not (tracking off, no such run in the store, the store unreachable)."""
    import tempfile

    import pandas

    from ltsearch.tracking.warmup import open_client

    if not settings.enabled:
        return "tracking is off for it (tracking.enabled: false): nothing logged"
    uri = settings.resolved_uri()
    store = contract.local_store_path(uri)
    if store is not None and not store.exists():
        return f"no MLflow store at {store}: nothing logged"
    try:
        client = open_client(uri)
        found = client.get_experiment_by_name(settings.experiment or experiment)
        runs = [] if found is None else client.search_runs(
            [found.experiment_id], filter_string=f"tags.`{contract.TAG_KIND}` = '{kind}' and tags.`{contract.TAG_DIR}` = '{_quoted(directory)}'",
            max_results=1)
        if not runs:
            return f"no {kind} run for {directory} in {uri}: nothing logged (replay it with ltsearch runs --sync {directory})"
        run_id = runs[0].info.run_id
        with tempfile.TemporaryDirectory(prefix="ltsearch-attach-") as folder:
            for name, content in files.items():
                path = Path(folder) / name
                path.write_bytes(content)
                client.log_artifact(run_id, str(path))
        for name, rows in tables.items():
            if any(item.path == name for item in client.list_artifacts(run_id)):
                with tempfile.TemporaryDirectory(prefix="ltsearch-attach-") as folder:  # log_table would append the rows again
                    path = Path(folder) / name
                    path.write_text(json.dumps(pandas.DataFrame(rows).to_dict(orient="split") | {"index": None}, default=str))
                    client.log_artifact(run_id, str(path))
            else:
                client.log_table(run_id, data=pandas.DataFrame(rows), artifact_file=name)
    except Exception as error:  # noqa: BLE001 - sqlite, HTTP and MLflow each raise their own; the files are on disk either way
        return f"could not log to {uri} ({type(error).__name__}: {' '.join(str(error).split())[:200]}); the files are on disk"
    return f"logged {', '.join([*files, *tables])} to the {kind} run {run_id} in {uri} (experiment '{found.name}')"


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def yaml_bytes(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


def start(settings: contract.TrackingConfig, experiment: str, *, stream: Any = None) -> Tracker | None:
    """A Tracker for one command, or None when `tracking.enabled` is false."""
    return Tracker(settings, experiment, stream=stream) if settings.enabled else None


def finish(tracker: Tracker | None, *, stream: Any = None, timeout_s: float = 30.0) -> list[str]:
    """Close the tracker; when the store stayed unreachable, list what was not written (nothing is silent)."""
    if tracker is None:
        return []
    unwritten = tracker.close(timeout_s)
    if unwritten:
        shown = "; ".join(unwritten[:8]) + (f"; ... {len(unwritten) - 8} more" if len(unwritten) > 8 else "")
        print(f"tracking: {len(unwritten)} write(s) did not reach {tracker.uri}: {shown}", file=stream or sys.stderr, flush=True)
    return unwritten
