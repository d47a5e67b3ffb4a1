"""Where runs are tracked: the `tracking:` section of run and search files (no MLflow import here).

    tracking:
      enabled: true                 # false: nothing is logged anywhere
      uri: null                     # any MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
      experiment: null              # default: the sweep's name (tune), the config's stem (train)
      artifacts: null               # artifact root of experiments this creates; default: beside a local store

The section sits beside the run config, not inside it: where a run is logged never changes what it
trains, so it is not part of `config.yaml`, of a trial's config or of any cache key. `--set tracking.uri=...`
works on every command because overrides are applied to the raw file before this section is split off.

The store keeps the contract below; `ltsearch ui` and `ltsearch runs` rely on it, so it is spelled out
in one place (TAG_*).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltsearch.errors import ConfigError

SECTION = "tracking"
DEFAULT_URI = "sqlite:///mlruns.db"
URI_ENV = "MLFLOW_TRACKING_URI"

#: what kind of thing a run is: "sweep" (parent of trials), "trial", "train" (one `ltsearch train` run),
#: "ablation" (parent of cells), "cell" (one cell x seed of an ablation)
TAG_KIND = "ltsearch.kind"
TAG_DIR = "ltsearch.dir"  # the sweep / run directory on disk (absolute path or URI)
TAG_TRIAL = "ltsearch.trial_id"  # a trial's id in its sweep (children only)
TAG_METRIC = "ltsearch.metric"  # the objective key (parents and children)
TAG_MODE = "ltsearch.mode"  # max | min
TAG_SELECTED_EPOCH = "ltsearch.selected_epoch"  # 0-indexed, the same numbering as metric steps
TAG_STOPPED_EARLY = "ltsearch.stopped_early"  # "true" with the epoch count in ltsearch.epochs
TAG_EPOCHS = "ltsearch.epochs"  # epochs trained
TAG_PREFIX = "ltsearch.prefix_key"  # a forked run and the prefix run it forked from share this tag
TAG_PREFIX_RUN = "ltsearch.prefix_run"  # on a forked run: the MLflow run id holding its shared epochs
TAG_ERROR = "ltsearch.error"  # the error's one line, on FAILED runs
TAG_COMMAND = "ltsearch.command"  # the command line that launched it
TAG_VERSION = "ltsearch.version"
TAG_GIT = "ltsearch.git_commit"
TAG_NAMES = "ltsearch.names"  # JSON {name: MLflow key} of the names this run holds under other keys (names.py)
TAG_OBJECTIVES = "ltsearch.objectives"  # a sweep's objectives, "val/top1 (max), val/few (max)"; TAG_METRIC is the first
TAG_PARETO = "ltsearch.pareto"  # on a multi-objective sweep's finished trials: "true" for the Pareto front's points

KINDS = ("sweep", "trial", "train", "ablation", "cell")
PARENT_KINDS = ("sweep", "ablation")

_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
_EXPERIMENT_NAME = re.compile(r"^[^\x00-\x1f]{1,200}$")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    artifacts: str | None = None

    def validate(self, where: str = SECTION) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{where}.enabled", self.enabled, "true or false")
        if self.uri is not None and (not isinstance(self.uri, str) or not self.uri.strip()):
            raise ConfigError(f"{where}.uri", self.uri, f"an MLflow tracking URI such as {DEFAULT_URI} or http://127.0.0.1:5000")
        uri = self.effective_uri()
        scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else None
        if scheme is not None and scheme not in _SCHEMES:
            key = f"{where}.uri" if self.uri is not None else f"{where}.uri (from ${URI_ENV})"
            raise ConfigError(key, uri, f"a URI with one of the schemes {list(_SCHEMES)}, or a local path",
                              hint=f"For a local store use {DEFAULT_URI}.")
        if self.experiment is not None and (not isinstance(self.experiment, str) or not _EXPERIMENT_NAME.match(self.experiment)):
            raise ConfigError(f"{where}.experiment", self.experiment, "an experiment name of 1 to 200 printable characters")
        if self.artifacts is not None and (not isinstance(self.artifacts, str) or not self.artifacts.strip()):
            raise ConfigError(f"{where}.artifacts", self.artifacts, "a directory or URI for artifacts")

    def effective_uri(self) -> str:
        """`uri`, else $MLFLOW_TRACKING_URI (as every MLflow user expects), else the local sqlite store."""
        return self.uri or os.environ.get(URI_ENV) or DEFAULT_URI

    def resolved_uri(self, cwd: Path | None = None) -> str:
        """The URI with a relative local store made absolute, so trials, the UI and later commands agree."""
        return resolve_uri(self.effective_uri(), cwd)

    def artifact_root(self, cwd: Path | None = None) -> str | None:
        """Where experiments created here keep artifacts: `artifacts`, else `mlartifacts/` beside a local store."""
        if self.artifacts is not None:
            return self.artifacts if "://" in self.artifacts else (cwd or Path.cwd()).joinpath(self.artifacts).resolve().as_uri()
        store = local_store_path(self.resolved_uri(cwd))
        return (store.parent / "mlartifacts").as_uri() if store is not None else None


def resolve_uri(uri: str, cwd: Path | None = None) -> str:
    base = cwd or Path.cwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{(base / path).resolve()}"
    if uri.startswith("file://"):
        return Path(uri[len("file://"):]).resolve().as_uri() if uri[len("file://"):].startswith("/") else (base / uri[len("file://"):]).resolve().as_uri()
    if "://" not in uri:
        return (base / uri).resolve().as_uri()
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file behind a sqlite URI (or the directory behind a file URI); None for servers and databases."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return None if path == ":memory:" else Path(path if path.startswith("/") else Path.cwd() / path)
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None


def split_tracking(raw: dict, *, source: str | None = None) -> tuple[dict, TrackingConfig]:
    """(the file without its `tracking:` section, that section validated). Errors name `source`."""
    rest = copy.deepcopy(raw)
    section = rest.pop(SECTION, None)
    return rest, parse_tracking(section, source=source)


def parse_tracking(section: Any, *, source: str | None = None) -> TrackingConfig:
    try:
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(SECTION, section, "a mapping such as {uri: sqlite:///mlruns.db, experiment: NAME}")
        allowed = ("enabled", "uri", "experiment", "artifacts")
        unknown = [key for key in section if key not in allowed]
        if unknown:
            raise ConfigError(f"{SECTION}.{unknown[0]}", section[unknown[0]], f"a known key here; allowed keys: {list(allowed)}")
        config = TrackingConfig(**section)
        config.validate()
        return config
    except ConfigError as error:
        raise error.with_source(source) if source and not error.source else error
