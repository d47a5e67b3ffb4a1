"""Names every module of the package shares: the epoch result key, the files a sweep directory holds,
and sweep locations (local paths or URIs such as s3://).
"""

from __future__ import annotations

from pathlib import Path


#: the result key schedulers count in: epochs completed (1-based), robust to restores, unlike Ray's iteration counter
EPOCHS = "epochs"
#: the result key schedulers count in: epochs after the method's start epoch T (= EPOCHS for runs without one),
#: so a grace period starts at T and runs forked from a shared prefix count the same as runs trained from scratch
ACTIVE_EPOCHS = "active_epochs"
SWEEP_FILE = "sweep.yaml"
BEST_FILE = "best.yaml"
TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"
#: trials.parquet column of a multi-objective sweep: whether the trial is a point of the Pareto front
PARETO_COLUMN = "pareto"


def _absolute(location: str) -> str:
    """URIs stay as they are; local paths become absolute (Ray needs absolute storage paths)."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def _split(location: str) -> tuple[str, str]:
    parent, _, name = location.rstrip("/").rpartition("/")
    return parent or "/", name
