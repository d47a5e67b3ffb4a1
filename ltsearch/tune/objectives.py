"""What a search optimises: `metric:` / `mode:` as one `Objective` of one or several validation metrics, the rule
that picks a trial's epoch, and Pareto dominance between trials.

    metric: val/top1                 # one objective, as before
    mode: max
    metric: [val/top1, val/few]      # several: head against tail; Optuna's multi-objective samplers search the front
    mode: [max, max]

The epoch rule (one model per trial): a trial's result is the epoch best on the *first* objective among the
epochs it may select from (`train.select_epochs`), the earliest on ties, as the engine selects; every other
objective is read at that same epoch. This is the single-objective rule unchanged, and the protocol papers
report many/medium/few with (select on overall accuracy, read the groups there). The alternatives lose
something: each objective at its own best epoch mixes several models into one point, and a "knee" of the
trial's own epochs cannot be reproduced by `ltsearch train`, whose `train.select_metric` picks one metric.
So a Pareto point's YAML reruns to the same epoch when its `train.select_metric` is the first objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from ltsearch.errors import ConfigError

#: what `classification_metrics` computes on the validation split, i.e. what an objective can be
SCORES = ("val/top1", "val/bacc", "val/gm", "val/many", "val/medium", "val/few")
#: the shot group a score needs classes in (by training count, `metrics.py`); None: every class counts
SCORE_GROUP = {"val/many": "many", "val/medium": "medium", "val/few": "few"}
MODES = ("max", "min")
EPOCH_RULE = "first"
EPOCH_RULE_TEXT = "the epoch best on the first objective (earliest on ties); the other objectives are read there"


@dataclass(frozen=True, init=False)
class Objective:
    """`metric:` / `mode:` — one validation metric or several (a multi-objective search), each with its direction.

    `metric` and `mode` are the first objective: the one a trial's epoch is selected on, and what schedulers judge
    unless `scheduler.metric` names another. Always validation metrics: selecting on test leaks it into the choice.
    """

    metrics: tuple[str, ...]
    modes: tuple[str, ...]

    def __init__(self, metric: str | Sequence[str] = "val/top1", mode: str | Sequence[str] = "max"):
        object.__setattr__(self, "metrics", (metric,) if isinstance(metric, str) else tuple(metric))
        object.__setattr__(self, "modes", (mode,) if isinstance(mode, str) else tuple(mode))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A sweep saved before several objectives existed pickled `metric`/`mode` strings (Tune restores its callbacks)."""
        if "metric" in state:
            state = {"metrics": (state["metric"],), "modes": (state["mode"],)}
        self.__dict__.update(state)

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    def mode_of(self, metric: str) -> str:
        return self.modes[self.metrics.index(metric)]

    def describe(self) -> str:
        """`val/top1 (max)` or `val/top1 (max), val/few (max)`."""
        return ", ".join(f"{m} ({d})" for m, d in zip(self.metrics, self.modes))

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether `a` beats `b` on the first objective (None and nan never win)."""
        return _better(a, b, self.mode)

    def signs(self) -> tuple[float, ...]:
        """+1 for max, -1 for min: multiplied in, every objective is maximised."""
        return tuple(1.0 if m == "max" else -1.0 for m in self.modes)

    def values(self, row: dict[str, Any], prefix: str = "") -> tuple[float, ...] | None:
        """The objectives' values in `row` (under `prefix`, e.g. `best/`), or None when one is missing or not finite."""
        out = []
        for metric in self.metrics:
            value = row.get(prefix + metric)
            if not _finite(value):
                return None
            out.append(float(value))
        return tuple(out)


def parse_objective(raw: dict) -> Objective:
    """`metric:` and `mode:` of a search file: a string each, or two lists of one length; every metric a known `val/` score."""
    metric, mode = raw.get("metric", "val/top1"), raw.get("mode", "max")
    metrics = [metric] if isinstance(metric, str) else metric
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError("metric", metric, f"a validation metric or a non-empty list of them, from {list(SCORES)}",
                          hint="e.g. metric: val/top1, or metric: [val/top1, val/few] with mode: [max, max].")
    for name in metrics:
        if name.startswith("test/"):
            raise ConfigError("metric", metric, f"validation metrics only, such as {list(SCORES)}; '{name}' is a test metric",
                              hint="Searching on test leaks the test set into the choice of hyperparameters; "
                                   "test is reported at each trial's selected epoch anyway.")
        if name not in SCORES:
            raise ConfigError("metric", name, f"one of {list(SCORES)} (the validation metrics every epoch reports)",
                              choices=list(SCORES))
    if len(set(metrics)) != len(metrics):
        raise ConfigError("metric", metric, "distinct metrics (each objective once)")
    if isinstance(metric, str) or len(metrics) == 1:
        single = mode[0] if isinstance(mode, list) and len(mode) == 1 else mode
        if single not in MODES:
            raise ConfigError("mode", mode, f"one of {list(MODES)}")
        return Objective(metrics[0], single)
    if not isinstance(mode, list) or len(mode) != len(metrics):
        example = "[" + ", ".join("max" for _ in metrics) + "]"
        raise ConfigError("mode", mode, f"a list of {len(metrics)} modes, one per metric of {metrics}",
                          hint=f"e.g. mode: {example}.")
    for each in mode:
        if each not in MODES:
            raise ConfigError("mode", mode, f"a list of modes, each one of {list(MODES)}; got '{each}'")
    return Objective(tuple(metrics), tuple(mode))


def select_epoch(rows: Iterable[dict[str, Any]], objective: Objective, selectable: str) -> dict[str, Any] | None:
    """The row the epoch rule picks among rows marked `selectable` (the module docstring); None when none has a value."""
    best = None
    for row in rows:
        if not row.get(selectable, 1):
            continue
        if best is None or objective.better(row.get(objective.metric), best.get(objective.metric)):
            best = row
    return best if best is not None and _finite(best.get(objective.metric)) else None


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    """`a` is at least as good as `b` on every objective and better on one (Pareto dominance)."""
    at_least = all(s * x >= s * y for x, y, s in zip(a, b, signs))
    return at_least and any(s * x > s * y for x, y, s in zip(a, b, signs))


def non_dominated(points: Sequence[Sequence[float]], signs: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (equal points keep each other); O(n²), n = trials."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, signs) for j, q in enumerate(points) if j != i)]


def _better(a: float | None, b: float | None, mode: Literal["max", "min"] | str) -> bool:
    if not _finite(a):
        return False
    if b is None:
        return True
    return a > b if mode == "max" else a < b


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
