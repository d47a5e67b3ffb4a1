"""The driver's own record of every epoch every trial reported: `<sweep>/epochs.jsonl`.

Why not Ray's per-trial result.json: under PBT, a trial that exploits another trial's checkpoint restarts,
and its result.json (and progress.csv) can lose the reports made after the restart, or the Result can
carry the donor's metrics. A trial that trained 4 epochs then looked like one stopped after 1. Every
report passes through the driver, so the driver writes it down itself, keyed by the trial Tune says it
came from. Ray's files remain the fallback for a trial this log has nothing for (a sweep started before
this log existed).

One JSON line per report, appended and flushed as it arrives (a local sweep directory); for a sweep on
object storage (s3://, gs://), which has no append, the whole file is rewritten every `rewrite_s` seconds
and at the end. A line cut short by a killed driver is skipped when read.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from ltsearch.results import location_exists, read_text_from, write_text_to
from ltsearch.tune._names import _join

EPOCH_LOG = "epochs.jsonl"
TRIAL_KEY = "trial_id"
#: keys Ray adds to every result; the rest is what train_trial reported
RAY_KEYS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint", "config"}


class EpochLog(tune.Callback):
    """Appends each trial result (our keys only) to epochs.jsonl, from the driver."""

    def __init__(self, directory: str, rewrite_s: float = 30.0):
        self.location = _join(directory, EPOCH_LOG)
        self.rewrite_s = rewrite_s
        self.lines: list[str] = []
        self.last_rewrite = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "lines": [], "last_rewrite": 0.0}

    def setup(self, **info: Any) -> None:
        remote = "://" in self.location
        self.lines = read_text_from(self.location).splitlines() if remote and location_exists(self.location) else []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        line = json.dumps({TRIAL_KEY: trial.trial_id, **{k: _jsonable(v) for k, v in result.items() if k not in RAY_KEYS}})
        if "://" not in self.location:
            path = Path(self.location)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as stream:
                stream.write(line + "\n")
            return
        self.lines.append(line)
        if time.monotonic() - self.last_rewrite >= self.rewrite_s:
            self._rewrite()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if "://" in self.location:
            self._rewrite()

    def _rewrite(self) -> None:
        write_text_to("".join(line + "\n" for line in self.lines), self.location)
        self.last_rewrite = time.monotonic()


def read_epoch_log(directory: str, epochs_key: str) -> dict[str, list[dict[str, Any]]]:
    """trial id -> one row per epoch, in order (the last report of an epoch wins: a restored trial re-ran it)."""
    location = _join(directory, EPOCH_LOG)
    if not location_exists(location):
        return {}
    by_trial: dict[str, dict[int, dict[str, Any]]] = {}
    for line in read_text_from(location).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        trial_id = row.pop(TRIAL_KEY, None)
        if trial_id is not None and isinstance(row.get(epochs_key), int):
            by_trial.setdefault(trial_id, {})[row[epochs_key]] = row
    return {trial: [rows[e] for e in sorted(rows)] for trial, rows in by_trial.items()}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
