"""Saved views of MLflow's runs table: the first view of a sweep or an ablation shows what it is about.

Why: MLflow's runs table opens with every metric and param column hidden behind "Columns", and keeps what a user
picks in the browser only. MLflow 3 has one place a view can live on the server: an experiment tag
`mlflow.sharedViewState.<id>`, which its UI writes from "Save & share view", lists among the experiment's saved
views, and opens from `#/experiments/<eid>/runs?viewStateShareKey=<id>`. ltsearch writes one per sweep and per
ablation, so the link `ltsearch ui` and `ltsearch runs` print opens on:

- a sweep: its trials only, best first on the first objective, with the objectives at the selected epoch, their
  test counterparts, the searched keys and (several objectives) the `ltsearch.pareto` tag as columns;
- an ablation: its cells grouped by row and column (MLflow's group-by on the `ltsearch.row`/`ltsearch.column`
  tags), so each group shows the mean over its seeds (the matrix's cell), sorted by the matrix metric; the
  shared-prefix runs, which hold a trunk's epochs and no cell, are filtered out (the parent's page lists them).

The tag's value is the envelope MLflow's UI writes (`savedViewEnvelope.ts`: name, createdAt, updatedAt, and the
state as JSON text); the state holds the table's search facets (filter, sort) and UI state (columns, group-by),
which the UI merges over its defaults. Column keys are MLflow's canonical sort keys, `metrics.`best/val/top1``;
`columnOrder` puts the objectives first (the table otherwise sorts metric columns by name).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ltsearch.tracking.names import mlflow_key
from ltsearch.tracking.settings import TAG_KIND, TAG_PARETO

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_PARAM = "viewStateShareKey"
PARENT_TAG = "mlflow.parentRunId"


def view_id(parent_run_id: str) -> str:
    """The saved view's id for a parent run (one view per sweep or ablation, rewritten when it is recorded again)."""
    return f"ltsearch-{parent_run_id}"


def view_tag(parent_run_id: str) -> str:
    return VIEW_TAG_PREFIX + view_id(parent_run_id)


def column(kind: str, name: str) -> str:
    """MLflow's canonical column key: `metrics.`best/val/top1``, `params.`optim.lr``, `tags.`ltsearch.row``."""
    return f"{kind}.`{mlflow_key(name)}`"


def children_filter(parent_run_id: str, kind: str) -> str:
    return f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TAG_KIND}` = '{kind}'"


def sweep_view(parent_run_id: str, objectives: Sequence[tuple[str, str]], keys: Sequence[str]) -> dict[str, Any]:
    """A sweep's trials, best first on the first objective; objectives, test counterparts and searched keys as columns."""
    metrics = [name for name, _ in objectives]
    tests = list(dict.fromkeys(["test/" + name.split("/", 1)[1] for name in metrics] + ["test/top1"]))
    columns = [column("metrics", f"best/{name}") for name in [*metrics, *tests]] + [column("params", key) for key in keys]
    if len(objectives) > 1:
        columns.append(column("tags", TAG_PARETO))
    return {"searchFilter": children_filter(parent_run_id, "trial"), "orderByKey": column("metrics", f"best/{metrics[0]}"),
            "orderByAsc": objectives[0][1] == "min", "selectedColumns": columns, "columnOrder": columns}


def ablation_view(parent_run_id: str, metric: str, select_metric: str) -> dict[str, Any]:
    """An ablation's cells grouped by row and column (each group's mean over its seeds), sorted by the matrix metric."""
    columns = [column("metrics", f"best/{name}") for name in dict.fromkeys([metric, select_metric, "test/few"])]
    columns += [column("tags", name) for name in ("ltsearch.row", "ltsearch.column", "ltsearch.train_seed", "ltsearch.data_seed")]
    group_by = {"aggregateFunction": "average",
                "groupByKeys": [{"mode": "tag", "groupByData": "ltsearch.row"}, {"mode": "tag", "groupByData": "ltsearch.column"}]}
    return {"searchFilter": children_filter(parent_run_id, "cell"), "orderByKey": column("metrics", f"best/{metric}"), "orderByAsc": False,
            "selectedColumns": columns, "columnOrder": columns, "groupBy": group_by}


def envelope(name: str, state: dict[str, Any], now_ms: int) -> str:
    """The experiment tag's value, as MLflow's "Save & share view" writes it."""
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})
