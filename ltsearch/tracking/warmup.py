"""Opening an MLflow store: early, in the background, and quietly.

A new sqlite store migrates its schema on first open (~10 s on 2 cores, with MLflow's import), so a command
opens it on a thread while the data are built and Ray starts (`prewarm`), and the first `Tracker` on that
store waits for that thread instead of migrating the same store twice at once (`open_client`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ltsearch.tracking.settings import TrackingConfig

#: HTTP retries inside one request stay short: the writer's queue does the waiting, without blocking anything
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # (and no progress bars from a background thread)
#: stores being opened in the background (`prewarm`), by URI
_PREWARM: dict[str, threading.Thread] = {}


def open_client(uri: str) -> Any:
    """An MlflowClient on `uri`, after the background opening of the same store (if any) has finished."""
    warming = _PREWARM.pop(uri, None)
    if warming is not None:  # the store is being opened already: never migrate a new store twice at once
        warming.join(timeout=120)
    _quiet_store()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prewarm(settings: TrackingConfig) -> None:
    """Open the store on a background thread now, so MLflow's import and a new store's schema migrations
    (~10 s on 2 cores) overlap the dataset build and Ray's start instead of the first trials. The first
    Tracker on that store waits for it; errors are left to that Tracker, which reports them."""
    uri = settings.resolved_uri()

    def touch() -> None:
        try:
            _quiet_store()
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - a warm-up only
            pass

    if settings.enabled and uri not in _PREWARM:
        _PREWARM[uri] = threading.Thread(target=touch, name="ltsearch-tracking-prewarm", daemon=True)
        _PREWARM[uri].start()


def _quiet_store() -> None:
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
