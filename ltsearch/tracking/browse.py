"""Read-only queries over the store for `ltsearch runs` and `ltsearch ui`, built on the tag contract in settings.py.

Top-level runs (sweeps, ablations, train runs) are found by their `ltsearch.kind` tag and their children by
`mlflow.parentRunId`, each with one paged `search_runs` over the experiments involved: a store with hundreds
of trials is listed with a handful of requests, never one request per run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ltsearch.errors import ConfigError
from ltsearch.tracking.names import mlflow_key
from ltsearch.tracking.settings import (KINDS, PARENT_KINDS, SECTION, TAG_DIR, TAG_EPOCHS, TAG_ERROR, TAG_KIND, TAG_METRIC,
                                        TAG_MODE, TAG_OBJECTIVES, TAG_PARETO, TAG_SELECTED_EPOCH, TAG_STOPPED_EARLY, TrackingConfig,
                                        local_store_path, split_tracking)
from ltsearch.tracking.views import VIEW_TAG_PREFIX, view_id, view_tag

PARENT_TAG = "mlflow.parentRunId"
DEFAULT_METRIC = "val/top1"
TEST_METRIC = "test/top1"
#: kinds `ltsearch runs` lists at the top level: everything that is not a child
TOP_KINDS = (*PARENT_KINDS, "train")
PAGE_SIZE = 1000
#: how many trials the compare link shows (MLflow's compare page draws one line or point per run)
COMPARE_TOP = 10
_OBJECTIVE = re.compile(r"(\S+) \((max|min)\)")
CREATE_HINT = "Create runs with `ltsearch tune search_spaces/quickstart.yaml`."


@dataclass(frozen=True)
class Child:
    """One trial (or ablation cell) as `ltsearch runs NAME` shows it."""

    run_id: str
    name: str
    status: str
    start_time: int
    objective: float | None  # best/<metric> at the selected epoch
    test_top1: float | None
    epochs: int | None
    selected_epoch: int | None  # 0-indexed, as stored
    stopped_early: bool
    error: str | None
    params: dict[str, str]
    scores: dict[str, float | None] = field(default_factory=dict)  # best/<objective> of every objective of its parent
    pareto: bool | None = None  # a multi-objective sweep's front point (tag ltsearch.pareto); None when not tagged


@dataclass(frozen=True)
class TopRun:
    """A sweep, an ablation or a train run, with its children sorted best first (none for a train run)."""

    run_id: str
    experiment_id: str
    experiment: str
    name: str
    kind: str
    status: str
    start_time: int
    dir: str | None
    metric: str
    mode: str
    objective: float | None  # a train run's own best/<metric>; a parent's is its best child's
    test_top1: float | None
    children: tuple[Child, ...]
    objectives: tuple[tuple[str, str], ...] = ()  # (metric, mode) of a sweep's objectives, the first = `metric`
    view: str | None = None  # the id of its saved runs-table view (views.py), when the store holds one

    @property
    def best(self) -> Child | None:
        return self.children[0] if self.children and self.children[0].objective is not None else None

    @property
    def started(self) -> datetime:
        return datetime.fromtimestamp(self.start_time / 1000)

    def compared(self, limit: int = COMPARE_TOP) -> list[Child]:
        """The children worth comparing side by side, at most `limit`: a multi-objective sweep's front first, then the
        best others by the (first) objective, so the front is seen against what it beats."""
        scored = [child for child in self.children if child.objective is not None]
        return sorted(scored, key=lambda child: not child.pareto)[:limit]  # stable: best first within each part

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for child in self.children:
            counts[child.status] = counts.get(child.status, 0) + 1
        return counts


def load_settings(path: str | None, overrides: list[str]) -> TrackingConfig:
    """The `tracking:` section of FILE (optional) with `--set` applied first, as every command reads it.

    Only `tracking.*` keys may be set here: these commands read the store, so any other key would be
    silently ignored, which hides a typo such as `--set tracker.uri=...`.
    """
    from ltsearch.config import apply_overrides, parse_override, read_yaml

    for text in overrides:
        key, _ = parse_override(text)
        if key.split(".", 1)[0] != SECTION:
            raise ConfigError("--set", text, f"a {SECTION}.* key, e.g. --set {SECTION}.uri=sqlite:///mlruns.db",
                              hint="Only the tracking: section is read here.")
    raw = apply_overrides(read_yaml(path) if path else {}, overrides)
    return split_tracking(raw, source=path or "--set")[1]


def open_client(settings: TrackingConfig, cwd: Path | None = None) -> Any:
    """An MlflowClient on an existing store: a missing local store is an error, never silently created empty."""
    uri = settings.resolved_uri(cwd)
    store = local_store_path(uri)
    if store is not None and not store.exists():
        raise ConfigError("tracking.uri", uri, f"an existing MLflow store; there is none at {store}",
                          hint=f"{CREATE_HINT} Or name the store a sweep used: --set tracking.uri=sqlite:////path/to/mlruns.db")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # reaches the store now: a broken one is one clear line, not a traceback later
    except Exception as error:  # noqa: BLE001 - sqlite, SQLAlchemy and MLflow each raise their own; the fix is the URI either way
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ConfigError("tracking.uri", uri, f"an MLflow store that can be opened ({type(error).__name__}: {first})") from None
    return client


def latest(client: Any, *, limit: int, kinds: tuple[str, ...] = TOP_KINDS) -> list[TopRun]:
    """The newest top-level runs of these kinds, newest first, each with its children (three paged searches in all)."""
    names = _experiment_names(client)
    runs = _search(client, list(names), _kind_filter(kinds), limit=limit)
    return _with_children(client, runs, names)


def find(client: Any, target: str, cwd: Path | None = None) -> tuple[TopRun, int]:
    """The top-level run `target` names: a directory (its `ltsearch.dir` tag), an experiment or a run name.

    An experiment holds one sweep per launch; its newest is taken, and the count of top-level runs in it
    is returned with it so the caller can say that an older one is named by its run name or directory.
    """
    names = _experiment_names(client)
    where = _kind_filter(TOP_KINDS)
    candidates = []
    for directory in _directory_forms(target, cwd or Path.cwd()):
        candidates = candidates or _search(client, list(names), f"{where} and tags.`{TAG_DIR}` = {_literal(directory)}", limit=1)
    if not candidates:
        experiment = next((eid for eid, name in names.items() if name == target), None)
        if experiment is not None:
            candidates = _search(client, [experiment], where, limit=None)
    if not candidates:
        candidates = _search(client, list(names), f"{where} and attributes.run_name = {_literal(target)}", limit=None)
    if not candidates:
        raise ConfigError("NAME|DIR", target, "a sweep directory, an experiment name or a sweep/ablation/train run name in the store",
                          hint="`ltsearch runs` lists them.")
    return _with_children(client, candidates[:1], names)[0], len(candidates)


def varying_params(children: tuple[Child, ...]) -> list[str]:
    """The params that differ between children: the searched ones (the rest is the shared base config)."""
    keys = sorted({key for child in children for key in child.params})
    return [key for key in keys if len({child.params.get(key) for child in children}) > 1]


def _directory_forms(target: str, cwd: Path) -> list[str]:
    """How a sweep directory may be recorded: a URI as given; a path absolute, symlinks resolved or not."""
    if "://" in target:
        return [target]
    path = cwd / target
    return list(dict.fromkeys([str(path.resolve()), str(path.absolute())]))


def _experiment_names(client: Any) -> dict[str, str]:
    from mlflow.entities import ViewType

    names: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token)
        names.update({experiment.experiment_id: experiment.name for experiment in page})
        token = page.token
        if not token:
            return names


def _search(client: Any, experiment_ids: list[str], where: str, *, limit: int | None) -> list[Any]:
    """All runs matching `where`, newest first, following page tokens (up to `limit` runs)."""
    if not experiment_ids:
        return []
    runs: list[Any] = []
    token = None
    while limit is None or len(runs) < limit:
        size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(runs))
        page = client.search_runs(experiment_ids, filter_string=where, max_results=size, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _kind_filter(kinds: tuple[str, ...]) -> str:
    """MLflow filters have neither OR nor IN on tags: exclude the other kinds instead (a tag's absence never matches)."""
    excluded = [kind for kind in KINDS if kind not in kinds]
    return " and ".join([f"tags.`{TAG_KIND}` != {_literal(kind)}" for kind in excluded] + [f"tags.`{PARENT_TAG}` IS NULL"])


def _with_children(client: Any, runs: list[Any], names: dict[str, str]) -> list[TopRun]:
    """Attach children to each run: one search over the experiments of the parents, grouped by parent id."""
    parents = {run.info.run_id for run in runs if run.data.tags.get(TAG_KIND) in PARENT_KINDS}
    grouped: dict[str, list[Any]] = {run_id: [] for run_id in parents}
    experiments = sorted({run.info.experiment_id for run in runs if run.info.run_id in parents})
    # one parent (`ui`, `runs NAME`): only its children; several: every child in their experiments, in one search
    where = f"tags.`{PARENT_TAG}` = {_literal(next(iter(parents)))}" if len(parents) == 1 else f"tags.`{PARENT_TAG}` IS NOT NULL"
    for child in _search(client, experiments, where, limit=None) if parents else []:
        parent = child.data.tags.get(PARENT_TAG)
        if parent in grouped:
            grouped[parent].append(child)
    views = _saved_views(client, sorted({run.info.experiment_id for run in runs if run.info.run_id in parents}))
    return [_top_run(run, names, grouped.get(run.info.run_id, []), views) for run in runs]


def _saved_views(client: Any, experiment_ids: list[str]) -> set[str]:
    """The saved-view tags of these experiments (one request each; a `ui` or `runs` call involves one or a few)."""
    return {key for eid in experiment_ids for key in client.get_experiment(eid).tags if key.startswith(VIEW_TAG_PREFIX)}


def _top_run(run: Any, names: dict[str, str], children: list[Any], views: set[str]) -> TopRun:
    tags, metrics = run.data.tags, run.data.metrics
    metric = tags.get(TAG_METRIC, DEFAULT_METRIC)
    mode = tags.get(TAG_MODE, "max")
    objectives = tuple(_OBJECTIVE.findall(tags.get(TAG_OBJECTIVES, ""))) or ((metric, mode),)
    ranked = tuple(_ranked([_child(child, metric, [m for m, _ in objectives]) for child in children], mode))
    if tags.get(TAG_KIND) in PARENT_KINDS:
        best = ranked[0] if ranked and ranked[0].objective is not None else None
        objective, test_top1 = (best.objective, best.test_top1) if best else (None, None)
    else:
        objective, test_top1 = metrics.get(mlflow_key(f"best/{metric}")), metrics.get(f"best/{TEST_METRIC}")
    return TopRun(run_id=run.info.run_id, experiment_id=run.info.experiment_id, experiment=names.get(run.info.experiment_id, "?"),
                  name=run.info.run_name or run.info.run_id, kind=tags.get(TAG_KIND, "?"), status=run.info.status,
                  start_time=run.info.start_time or 0, dir=tags.get(TAG_DIR), metric=metric, mode=mode,
                  objective=objective, test_top1=test_top1, children=ranked, objectives=objectives,
                  view=view_id(run.info.run_id) if view_tag(run.info.run_id) in views else None)


def _child(run: Any, metric: str, objectives: list[str]) -> Child:
    tags, metrics = run.data.tags, run.data.metrics
    pareto = tags.get(TAG_PARETO)
    return Child(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, status=run.info.status,
                 start_time=run.info.start_time or 0, objective=metrics.get(mlflow_key(f"best/{metric}")), test_top1=metrics.get(f"best/{TEST_METRIC}"),
                 epochs=_int(tags.get(TAG_EPOCHS)), selected_epoch=_int(tags.get(TAG_SELECTED_EPOCH)),
                 stopped_early=tags.get(TAG_STOPPED_EARLY) == "true", error=tags.get(TAG_ERROR), params=dict(run.data.params),
                 scores={name: metrics.get(mlflow_key(f"best/{name}")) for name in objectives},
                 pareto=None if pareto is None else pareto == "true")


def _ranked(children: list[Child], mode: str) -> list[Child]:
    """Best first by the objective in the parent's mode; children without it (failed, still running) last, oldest first."""
    scored = sorted((c for c in children if c.objective is not None), key=lambda c: c.objective, reverse=mode != "min")
    return scored + sorted((c for c in children if c.objective is None), key=lambda c: c.start_time)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _literal(value: str) -> str:
    """A quoted string for an MLflow filter (its parser takes backslash escapes inside quotes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
