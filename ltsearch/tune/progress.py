"""The live progress table the driver prints while a sweep runs (`ProgressTable`, a Ray Tune callback).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray import tune

from ltsearch.tune._names import EPOCHS
from ltsearch.tune.objectives import Objective


def progress_table(rows: list[dict[str, Any]], keys: list[str], objective: Objective, elapsed: float, limit: int = 12) -> str:
    """The live table: counts by status, then running trials and the best finished ones with key hyperparameters.

    `value` and `best` are the first objective's latest value and its value at the epoch selected so far; with
    several objectives, `others` holds the other objectives at that epoch (the trial's point so far)."""
    metric = objective.metric
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    rank = {"RUNNING": 0, "PAUSED": 1, "PENDING": 3}
    sign = -1.0 if objective.mode == "max" else 1.0
    shown = sorted(rows, key=lambda r: (rank.get(r["status"], 2), sign * r["best"] if isinstance(r["best"], (int, float)) else math.inf))[:limit]
    short = {key: ".".join(key.split(".")[-2:]) for key in keys}
    others = list(objective.metrics[1:])
    header = ["trial", "status", "epochs", metric, "best"] + [f"{m} there" for m in others] + [short[k] for k in keys]
    lines = [[r["trial"], r["status"].lower(), r["epochs"], _fmt(r["value"]), _fmt(r["best"])]
             + [_fmt(r.get("others", {}).get(m)) for m in others] + [_fmt(r["config"].get(k)) for k in keys]
             for r in shown]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    summary = ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items()))
    out = [f"[{elapsed:5.0f}s] {len(rows)} trials: {summary}"]
    out += ["  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header] + lines]
    if len(rows) > len(shown):
        out.append(f"  ... {len(rows) - len(shown)} more")
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


class ProgressTable(tune.Callback):
    """Ray Tune callback on the driver: prints the table every `interval_s` seconds while something changed, and at the end.

    Module-level (picklable), because Tune stores the callbacks with the experiment that `--resume` restores.
    """

    def __init__(self, keys: list[str], objective: Objective, max_epochs: int, interval_s: float = 10.0, stream: Any = None,
                 board: Any = None):
        self.keys, self.objective, self.max_epochs, self.interval_s = keys, objective, max_epochs, interval_s
        self.stream = stream
        self.board = board  # the prefix board: a run training a shared trunk shows "trunk <key> k/T" until it reports
        self.trunks: dict[str, str] = {}
        self.start = time.monotonic()
        self.last = self.polled = -math.inf
        self.dirty = True

    def __getstate__(self) -> dict:
        # a stream does not pickle and a board dies with its session: the restoring process supplies its own
        return {**self.__dict__, "stream": None, "board": None}

    def setup(self, **info: Any) -> None:
        self.start, self.last, self.polled, self.dirty = time.monotonic(), -math.inf, -math.inf, True

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.dirty = True

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.dirty = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last < self.interval_s:
            return
        self._poll_trunks()
        if self.dirty:
            self.print(trials)

    def _poll_trunks(self) -> None:
        """Ask the board, at most once an interval, which runs train a trunk and how far (a change is news to print)."""
        if self.board is None or time.monotonic() - self.polled < self.interval_s:
            return
        import ray

        self.polled = time.monotonic()
        try:
            trunks = ray.get(self.board.training.remote(), timeout=5.0)
        except Exception:  # noqa: BLE001 - the board is busy or gone: the table goes on without trunk lines
            return
        self.dirty = self.dirty or trunks != self.trunks
        self.trunks = trunks

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.print(trials)

    def print(self, trials: list) -> None:
        rows = []
        for trial in trials:
            last = trial.last_result or {}
            epochs = self.trunks.get(trial.trial_id) if EPOCHS not in last else None  # Tune fills some keys before any report
            rows.append({"trial": trial.trial_id, "status": trial.status, "config": trial.config,
                         "epochs": epochs or f"{last.get(EPOCHS, 0)}/{self.max_epochs}", "value": last.get(self.objective.metric),
                         "best": last.get(f"best/{self.objective.metric}"),
                         "others": {m: last.get(f"best/{m}") for m in self.objective.metrics[1:]}})
        print(progress_table(rows, self.keys, self.objective, time.monotonic() - self.start), file=self.stream or sys.stdout, flush=True)
        self.last, self.dirty = time.monotonic(), False
