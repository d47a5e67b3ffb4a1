"""What each row's method did while it was on: the diagnostics behind an ablation matrix.

The matrix says whether a method beat its baseline; its runs' histories say why. For every row this
averages, over the epochs where the row's method was active (epoch >= its start epoch T; every epoch for a
run without a method), each method diagnostic the engine stored (`aug/*`: samples generated, ω, spread,
acceptances...), each auxiliary loss term (`train/aux/*`), and the classification loss and train accuracy,
then reports the mean over the row's runs with the per-run values. Those are what the papers' claims are
about (e.g. SMART's ω > 1 on tail samples, Sec. 3.5; M2m's accepted translations, Alg. 1), so a negative
paired Δ can be traced to a method that did nothing, or did too much, without opening a notebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ltsearch.ablate.cells import read_result, run_dir
from ltsearch.ablate.settings import Ablation
from ltsearch.epochs import SELECTABLE
from ltsearch.results import read_table

#: always shown next to the method's own quantities: what the classifier saw during the active epochs
TRAINING = ("train/cls_loss", "train/top1")
PREFIXES = ("aug/", "train/aux/")


@dataclass(frozen=True)
class RowDiagnostic:
    """One quantity of one row: its mean over the row's runs and each run's value (active epochs averaged)."""

    row: str
    column: str
    name: str
    mean: float
    per_run: tuple[float, ...]
    active_epochs: int


def row_diagnostics(ablation: Ablation, directory: str) -> list[RowDiagnostic]:
    """Per row and column, every diagnostic its runs stored, averaged over each run's active epochs (a run still
    going counts with the epochs it has, so a partial ablation can be read while it trains)."""
    found: dict[tuple[str, str, str], list[float]] = {}
    epochs: dict[tuple[str, str], int] = {}
    for run in ablation.runs:
        history = _history(directory, run.run_id)
        if not history:
            continue
        active = _active(history, read_result(directory, run.run_id))
        epochs[(run.row, run.column)] = len(active)
        for name in _names(active):
            values = [row[name] for row in active if _finite(row.get(name))]
            if values:
                found.setdefault((run.row, run.column, name), []).append(sum(values) / len(values))
    return [RowDiagnostic(row, column, name, sum(values) / len(values), tuple(values), epochs[(row, column)])
            for (row, column, name), values in found.items()]


def diagnostics_markdown(diagnostics: list[RowDiagnostic], rows: list[str]) -> str:
    """A table per row (in the ablation's row order): quantity, mean over runs, the runs' values."""
    lines = ["**What each method did while it was on** (means over the epochs where it was active, then over runs)", ""]
    for row in rows:
        own = [d for d in diagnostics if d.row == row]
        if not own:
            continue
        columns = sorted({d.column for d in own})
        for column in columns:
            cell = sorted((d for d in own if d.column == column), key=lambda d: (not d.name.startswith(PREFIXES), d.name))
            where = f" × {column}" if len(columns) > 1 or column != "all" else ""
            lines += [f"*{row}{where}* ({cell[0].active_epochs} active epochs per run)", "", "| quantity | mean | per run |", "|---|---|---|"]
            lines += [f"| {d.name} | {_fmt(d.mean)} | {', '.join(_fmt(v) for v in d.per_run)} |" for d in cell]
            lines.append("")
    return "\n".join(lines)


def _history(directory: str, run_id: str) -> list[dict]:
    path = run_dir(directory, run_id) / "history.parquet"
    return read_table(path) if Path(path).is_file() else []


def _active(history: list[dict], result: dict | None) -> list[dict]:
    """The epochs where the run's method acted: from its start epoch (result.json), else those marked selectable."""
    start = (result or {}).get("method_start")
    if start is not None:
        return [row for row in history if row.get("epoch", 0) >= start]
    return [row for row in history if row.get(SELECTABLE, 1)]


def _names(rows: list[dict]) -> list[str]:
    names = {key for row in rows for key in row if key.startswith(PREFIXES)}
    return sorted(names) + [name for name in TRAINING if any(name in row for row in rows)]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}".rstrip("0").rstrip(".")
