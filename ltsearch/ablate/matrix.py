"""An ablation matrix: variants (rows) × factor combinations (columns), each cell a set of seeded runs.

Every run selected its epoch on validation and reports test metrics at that epoch; this module only
aggregates them, so the matrix never sees test-based selection.

- Replicates: each expected (train_seed, data_seed) pair is one replicate. A cell's mean and sample
  std (ddof=1, None below two values) are over the pairs that completed, whatever mix of training and
  data seeds that is, so a partial cell is comparable only with its n shown.
- Orientation: `fmt="accuracy"` shows the metric as is; `fmt="error"` shows 100 − value (the metric is a
  percentage). `higher_is_better` defaults to True for accuracy, False for error and for any metric
  whose name contains "loss"; pass it to override.
- Paired difference: a non-baseline cell is compared with the baseline row in the same column on the
  same seed pairs (only pairs where both runs completed), in the displayed orientation (for error, a
  negative difference is an improvement). Seeds shared across rows make the runs correlated, so the
  paired t interval is much tighter and more honest than comparing two means.
- Best: per column, the row(s) whose mean is best *at the displayed precision* (`decimals`), so two
  means that print alike are both bold, never one of them by float noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats

STATUSES = ("completed", "error", "pending")
FORMATS = ("accuracy", "error")
CONFIDENCE = 0.95

SeedPair = tuple[int, int]


@dataclass(frozen=True)
class RunResult:
    """One run of one cell: its status and, when completed, its test/val metrics at the best-val epoch."""

    row: str
    column: str
    train_seed: int
    data_seed: int
    status: str
    metrics: dict[str, float]
    before_method: bool = field(default=False, kw_only=True)  # its best-val epoch precedes its method's start epoch

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"run {self.describe()}: status {self.status!r} is not one of {', '.join(STATUSES)}")

    @property
    def seeds(self) -> SeedPair:
        return (self.train_seed, self.data_seed)

    def describe(self) -> str:
        """How error messages name the run, so a user can find it in the run list."""
        return f"{self.row!r} × {self.column!r} (train_seed={self.train_seed}, data_seed={self.data_seed})"


@dataclass(frozen=True)
class PairedDiff:
    """Cell − baseline over paired seeds, displayed orientation; `low`/`high` bound the 95 % interval."""

    mean: float
    low: float
    high: float
    pairs: int
    method: str
    significant: bool


@dataclass(frozen=True)
class Cell:
    """The completed values of one (row, column), in the displayed orientation, in `seeds` order.

    `seeds` (added) holds the (train_seed, data_seed) pair of each value, so a reader can pair them.
    Runs neither completed nor failed are pending: `expected - n - failed`. `before_method` counts the values
    whose best-val epoch lies before the row's method started (possible only with `train.select_epochs: all`):
    there the cell shows the trunk the method shares with its baseline, not the method.
    """

    row: str
    column: str
    values: tuple[float, ...]
    expected: int
    mean: float | None
    std: float | None
    diff: PairedDiff | None
    best: bool
    failed: int
    seeds: tuple[SeedPair, ...] = field(kw_only=True)
    before_method: int = field(default=0, kw_only=True)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def pending(self) -> int:
        return self.expected - self.n - self.failed

    @property
    def partial(self) -> bool:
        """Some but not all expected runs completed: the mean rests on fewer seeds than its neighbours'."""
        return 0 < self.n < self.expected


@dataclass(frozen=True)
class Matrix:
    """Cells keyed by (row, column); `higher_is_better` and `decimals` (added) say how to read and print them."""

    metric: str
    fmt: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    baseline: str | None
    cells: dict[tuple[str, str], Cell]
    higher_is_better: bool = field(kw_only=True)
    decimals: int = field(kw_only=True)

    def cell(self, row: str, column: str) -> Cell:
        if (row, column) not in self.cells:
            raise KeyError(f"no cell ({row!r}, {column!r}); rows are {list(self.rows)}, columns {list(self.columns)}")
        return self.cells[(row, column)]


def default_higher_is_better(metric: str, fmt: str) -> bool:
    """Accuracy-like metrics go up; errors (100 − value) and losses go down."""
    return fmt == "accuracy" and "loss" not in metric.lower()


def build_matrix(results: Sequence[RunResult], *, rows: Sequence[str], columns: Sequence[str], metric: str,
                 baseline: str | None, seeds: Sequence[SeedPair], fmt: str = "accuracy",
                 higher_is_better: bool | None = None, decimals: int = 2) -> Matrix:
    """Aggregate `results` into the rows × columns matrix of `metric`; every run must belong to the layout."""
    rows, columns, seeds = tuple(rows), tuple(columns), tuple((int(t), int(d)) for t, d in seeds)
    _check_layout(rows, columns, seeds, metric, baseline, fmt, decimals)
    runs = _index(results, rows, columns, seeds, metric)
    better = default_higher_is_better(metric, fmt) if higher_is_better is None else higher_is_better
    shown = {key: _displayed(run.metrics[metric], fmt) for key, run in runs.items() if run.status == "completed"}
    cells: dict[tuple[str, str], Cell] = {}
    for column in columns:
        values = {row: {s: shown[(row, column, s)] for s in seeds if (row, column, s) in shown} for row in rows}
        best = _best_rows({row: v for row, v in values.items() if v}, better, decimals)
        base = values[baseline] if baseline is not None else None
        for row in rows:
            own = [runs[key] for key in ((row, column, s) for s in seeds) if key in runs]
            failed = sum(run.status == "error" for run in own)
            early = sum(run.status == "completed" and run.before_method for run in own)
            diff = _paired_diff(values[row], base, seeds) if base is not None and row != baseline else None
            cells[(row, column)] = _cell(row, column, values[row], len(seeds), diff, row in best, failed, early)
    return Matrix(metric, fmt, rows, columns, baseline, cells, higher_is_better=better, decimals=decimals)


def _check_layout(rows: tuple[str, ...], columns: tuple[str, ...], seeds: tuple[SeedPair, ...], metric: str,
                  baseline: str | None, fmt: str, decimals: int) -> None:
    for name, items in (("rows", rows), ("columns", columns), ("seeds", seeds)):
        if not items:
            raise ValueError(f"{name} must not be empty")
        if len(set(items)) != len(items):
            raise ValueError(f"{name} has duplicates: {[i for i in items if items.count(i) > 1]}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "error" and "loss" in metric.lower():
        raise ValueError(f"fmt='error' shows 100 − value, a percentage; {metric!r} is a loss: use fmt='accuracy'")
    if baseline is not None and baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not among rows {list(rows)}")
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals}")


def _index(results: Sequence[RunResult], rows: tuple[str, ...], columns: tuple[str, ...],
           seeds: tuple[SeedPair, ...], metric: str) -> dict[tuple[str, str, SeedPair], RunResult]:
    """Runs by (row, column, seed pair); a run outside the layout or a repeated run is a caller bug, not noise."""
    runs: dict[tuple[str, str, SeedPair], RunResult] = {}
    for run in results:
        if run.row not in rows or run.column not in columns or run.seeds not in seeds:
            raise ValueError(f"run {run.describe()} is outside the matrix: rows {list(rows)}, "
                             f"columns {list(columns)}, seed pairs {list(seeds)}")
        key = (run.row, run.column, run.seeds)
        if key in runs:
            raise ValueError(f"run {run.describe()} appears twice; keep one result per seed pair")
        if run.status == "completed":
            _check_metric(run, metric)
        runs[key] = run
    return runs


def _check_metric(run: RunResult, metric: str) -> None:
    if metric not in run.metrics:
        raise ValueError(f"completed run {run.describe()} has no metric {metric!r}; it has {sorted(run.metrics)}")
    if not math.isfinite(run.metrics[metric]):
        raise ValueError(f"completed run {run.describe()} has {metric} = {run.metrics[metric]}; "
                         "a diverged run should have status 'error'")


def _displayed(value: float, fmt: str) -> float:
    return 100.0 - value if fmt == "error" else float(value)


def _best_rows(means_by_row: dict[str, dict[SeedPair, float]], higher_is_better: bool, decimals: int) -> set[str]:
    """Rows whose mean, rounded as printed, equals the best rounded mean of the column."""
    rounded = {row: round(float(np.mean(list(v.values()))), decimals) for row, v in means_by_row.items()}
    if not rounded:
        return set()
    top = max(rounded.values()) if higher_is_better else min(rounded.values())
    return {row for row, mean in rounded.items() if mean == top}


def _cell(row: str, column: str, values: dict[SeedPair, float], expected: int, diff: PairedDiff | None,
          best: bool, failed: int, before_method: int) -> Cell:
    array = np.array(list(values.values()), dtype=float)
    mean = float(array.mean()) if array.size else None
    std = float(array.std(ddof=1)) if array.size >= 2 else None
    return Cell(row, column, tuple(array.tolist()), expected, mean, std, diff, best, failed, seeds=tuple(values),
                before_method=before_method)


def _paired_diff(cell: dict[SeedPair, float], base: dict[SeedPair, float], seeds: tuple[SeedPair, ...]) -> PairedDiff | None:
    """Mean of per-seed differences with a paired t interval; one pair has no spread, so no interval."""
    common = [s for s in seeds if s in cell and s in base]
    if not common:
        return None
    d = np.array([cell[s] - base[s] for s in common])
    mean = float(d.mean())
    if d.size == 1:
        return PairedDiff(mean, mean, mean, 1, "single pair", False)
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    low, high = mean - half, mean + half
    return PairedDiff(mean, low, high, int(d.size), f"paired t, {CONFIDENCE:.0%}", low > 0 or high < 0)
