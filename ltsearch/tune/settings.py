"""The search file: its typed sections (search:, metric:/mode:, resources:, checkpoint:, ...) and `Sweep`,
a parsed search file validated end to end (`load_sweep`, `parse_sweep`). `metric:`/`mode:` (one objective or
several) live in objectives.py.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from ltsearch import _checks as check
from ltsearch.config import RUN_SECTIONS, apply_overrides, build, read_yaml
from ltsearch.errors import ConfigError
from ltsearch.space import Point, SearchSpace, parse_space, validate_space
from ltsearch.tracking.settings import SECTION as TRACKING_SECTION, TrackingConfig, parse_tracking
from ltsearch.tune._names import _absolute, _join
from ltsearch.tune.algorithms import SAMPLERS, SCHEDULERS, SchedulerSpec, _importable, parse_scheduler, pbt_keys
from ltsearch.tune.objectives import Objective, parse_objective


@dataclass
class SearchConfig:
    """`search:` — which Optuna sampler proposes points and how many trials it gets.

    `num_samples` is the number of trials, or with `grid` keys the number per grid cell (Ray's
    grid_search semantics). `max_concurrent` caps running trials (None: as many as resources allow).
    `population_size` is NSGA-II's generation size (None: Optuna's, NSGA_POPULATION).
    """

    sampler: str = "tpe"
    num_samples: int = 10
    seed: int = 0
    max_concurrent: int | None = None
    population_size: int | None = None

    def validate(self, where: str) -> None:
        entry = SAMPLERS.get(self.sampler)
        missing = entry.meta.get("requires")
        if missing and not _importable(missing):
            raise ConfigError(f"{where}.sampler", self.sampler, f"a sampler whose package is installed ('{missing}' is not)",
                              hint=f"pip install {missing}, or choose another of {SAMPLERS.names()}.")
        check.integer(f"{where}.num_samples", self.num_samples)
        check.number(f"{where}.num_samples", self.num_samples, low=1)
        check.number(f"{where}.seed", self.seed, low=0)
        if self.max_concurrent is not None:
            check.number(f"{where}.max_concurrent", self.max_concurrent, low=1)
        if self.population_size is not None:
            population = [name for name in SAMPLERS.names() if SAMPLERS.get(name).meta.get("population")]
            if self.sampler not in population:
                raise ConfigError(f"{where}.population_size", self.population_size,
                                  f"nothing with sampler '{self.sampler}': only {population} breed generations",
                                  hint="Drop search.population_size, or use search.sampler: nsgaii.")
            check.integer(f"{where}.population_size", self.population_size)
            check.number(f"{where}.population_size", self.population_size, low=2)


@dataclass
class ResourcesConfig:
    """`resources:` per trial. A GPU fraction below 1 packs several trials on one GPU (no memory isolation)."""

    cpu: float = 1.0
    gpu: float = 0.0

    def validate(self, where: str) -> None:
        check.number(f"{where}.cpu", self.cpu, low=0.0, low_open=True)
        check.number(f"{where}.gpu", self.gpu, low=0.0)
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ConfigError(f"{where}.gpu", self.gpu, "a fraction below 1 (trials share a GPU) or a whole number of GPUs")


@dataclass
class CheckpointSettings:
    """`checkpoint:` — a checkpoint every `every` epochs and after the last; `keep` newest ones kept per trial."""

    every: int = 1
    keep: int | None = 2

    def validate(self, where: str) -> None:
        check.number(f"{where}.every", self.every, low=1)
        if self.keep is not None:
            check.number(f"{where}.keep", self.keep, low=1)


@dataclass
class ExecutionConfig:
    """How a sweep runs: where it writes, what each trial gets, how failures are retried."""

    name: str | None = None
    storage: str | None = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    max_failures: int = 1
    share_prefix: bool = True  # runs that agree until their method's start epoch train that prefix once (ltsearch.prefix)

    def validate(self, where: str) -> None:
        check.number("max_failures", self.max_failures, low=0)
        if self.name is not None:
            check_name("name", self.name)
        if self.storage is not None:
            check_storage("storage", self.storage)


#: the sweep directory is `<name>-YYYYmmdd-HHMMSS`: 16 characters on top of the name, within a file name's 255
MAX_NAME_LENGTH = 200
#: storage URI schemes Ray Tune's pyarrow filesystems reach (a local path needs none)
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_name(key: str, name: str) -> None:
    """A sweep name becomes one directory below the storage root: no separators, no '..', no hidden or control characters."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(key, name, "a non-empty directory name")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ConfigError(key, name, "a single directory name without '/', '\\' or a leading '.', so the sweep stays inside its storage root",
                          hint="Use storage: to choose where sweeps go.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(key, name, "a name of printable characters")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(key, f"{name[:40]}... ({len(name)} characters)", f"at most {MAX_NAME_LENGTH} characters "
                          "(the sweep directory adds '-<date>-<time>' and a file name holds 255 bytes)")
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise ConfigError(key, name[:40] + "...", f"at most {MAX_NAME_LENGTH} bytes in UTF-8")


def check_storage(key: str, storage: str) -> None:
    """`storage:` is a local directory (created if missing) or a URI whose scheme Ray Tune's filesystems know."""
    if not isinstance(storage, str) or not storage.strip() or "\x00" in storage:
        raise ConfigError(key, storage, "a directory or a URI such as s3://bucket/sweeps")
    if "://" in storage:
        scheme, _, rest = storage.partition("://")
        if scheme.lower() not in STORAGE_SCHEMES:
            raise ConfigError(key, storage, f"a local directory or a URI with one of the schemes {list(STORAGE_SCHEMES)}",
                              hint="For a filesystem every node mounts, give its local path (e.g. /shared/sweeps).")
        if not rest.strip("/") and scheme.lower() != "file":
            raise ConfigError(key, storage, f"a {scheme}:// URI with a bucket or host, e.g. {scheme}://bucket/sweeps")
        return
    path = Path(storage).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, storage, "a directory (or a path to create one), but it is a file")


EXECUTION_KEYS = ("name", "storage", "resources", "checkpoint", "max_failures", "share_prefix")
OBJECTIVE_KEYS = ("metric", "mode")
SWEEP_KEYS = ("space", "search", "scheduler", *OBJECTIVE_KEYS, *EXECUTION_KEYS, TRACKING_SECTION)


@dataclass(frozen=True)
class Sweep:
    """A parsed search file, validated end to end: nothing launches unless every corner of the space is valid."""

    source: str
    raw: dict
    base: dict
    space: SearchSpace
    cells: tuple[Point, ...]
    search: SearchConfig
    objective: Objective
    scheduler: SchedulerSpec
    execution: ExecutionConfig
    tracking: TrackingConfig
    corners_checked: int
    max_epochs: int
    max_active_epochs: int  # the most epochs a trial trains after its method's start epoch: the schedulers' unit

    @property
    def num_trials(self) -> int:
        return self.search.num_samples * max(1, len(self.cells))

    @property
    def judged(self) -> tuple[str, str]:
        """(metric, mode) the scheduler stops or copies trials by: `scheduler.metric`, else the first objective."""
        metric = self.scheduler.metric or self.objective.metric
        return metric, self.objective.mode_of(metric)

    @property
    def shares_data(self) -> bool:
        """Whether one dataset serves every trial (not when the space changes `data.*`)."""
        return not any(key.startswith("data.") for key in self.space.keys)

    @property
    def name(self) -> str:
        """`name:`, else the search file's stem: the sweep directory's prefix and the MLflow experiment."""
        return self.execution.name or Path(self.source).stem

    def default_dir(self, now: float | None = None) -> str:
        stem = self.name
        root = self.execution.storage or "runs"
        return _join(_absolute(root), f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a search file (following `base:`), apply `--set` overrides, validate everything."""
    raw = apply_overrides(read_yaml(path), overrides)
    return parse_sweep(raw, source=str(path))


def parse_sweep(raw: dict, *, source: str) -> Sweep:
    try:
        return _parse_sweep(raw, source)
    except ConfigError as error:
        raise error if error.source else error.with_source(source)


def _parse_sweep(raw: dict, source: str) -> Sweep:
    unknown = [key for key in raw if key not in RUN_SECTIONS and key not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(str(unknown[0]), raw[unknown[0]], f"a run-config section {list(RUN_SECTIONS)} or a search key {list(SWEEP_KEYS)}",
                          choices=[*RUN_SECTIONS, *SWEEP_KEYS])
    if not raw.get("space"):
        raise ConfigError("space", raw.get("space"), "a non-empty mapping of config keys to distributions",
                          hint="A file without a space is a run config: use `ltsearch train`.")
    base = {key: copy.deepcopy(raw[key]) for key in RUN_SECTIONS if key in raw}
    space = parse_space(raw["space"], base)
    search = build(SearchConfig, raw.get("search"), "search")
    objective = parse_objective(raw)
    scheduler = parse_scheduler(raw.get("scheduler"))
    check_objectives(objective, search, scheduler)
    execution = build(ExecutionConfig, {k: raw[k] for k in EXECUTION_KEYS if k in raw}, "")
    tracking = parse_tracking(raw.get(TRACKING_SECTION))
    cells = space.grid_cells(exhaustive=bool(SAMPLERS.get(search.sampler).meta.get("exhaustive")))
    checked = validate_space(space, base)
    check_scheduler_epochs(scheduler, checked.max_active_epochs, checked.max_epochs)
    if execution.name is None:
        check_name("name (the search file's name, used when name: is not set)", Path(source).stem)
    if SCHEDULERS.get(scheduler.name).meta.get("population_based"):
        _check_population(scheduler, search, space)
    return Sweep(source=source, raw=raw, base=base, space=space, cells=tuple(cells), search=search, objective=objective,
                 scheduler=scheduler, execution=execution, tracking=tracking, corners_checked=checked.corners, max_epochs=checked.max_epochs,
                 max_active_epochs=checked.max_active_epochs)


def check_objectives(objective: Objective, search: SearchConfig, scheduler: SchedulerSpec) -> None:
    """The sampler can search that many objectives, and the scheduler judges one of them (PBT none of several)."""
    if objective.multi and SAMPLERS.get(search.sampler).meta.get("single_objective"):
        several = [name for name in SAMPLERS.names() if not SAMPLERS.get(name).meta.get("single_objective")]
        raise ConfigError("search.sampler", search.sampler, f"a sampler that searches several objectives ({len(objective.metrics)} in "
                          f"metric: {list(objective.metrics)}): one of {several}", hint="nsgaii and tpe are Optuna's multi-objective samplers.")
    if objective.multi and SCHEDULERS.get(scheduler.name).meta.get("population_based"):
        raise ConfigError("scheduler.name", scheduler.name, f"a scheduler that judges one objective at a time (asha, hyperband, median) "
                          f"or fifo, since metric: has {len(objective.metrics)} objectives {list(objective.metrics)}",
                          hint="PBT copies the checkpoints of the trials that are best by one number, and with several objectives "
                               "no trial is best; use asha with scheduler.metric, or search one metric with pbt.")
    if scheduler.metric is not None and scheduler.metric not in objective.metrics:
        raise ConfigError("scheduler.metric", scheduler.metric, f"one of the objectives {list(objective.metrics)} (what the search optimises)",
                          hint="A scheduler stops trials by one of the numbers the search optimises: add it to metric:, or name one "
                               "of them.", choices=list(objective.metrics))


def check_scheduler_epochs(scheduler: SchedulerSpec, max_epochs: int, train_epochs: int | None = None) -> None:
    """A scheduler's epoch counts must fit the trials' epochs (Ray only asserts some of this, after it started).

    Schedulers count epochs after the method's start epoch T (`ACTIVE_EPOCHS`); `max_epochs` is the most
    of those any trial trains (every corner of the space is checked), `train_epochs` its train.epochs.
    """
    params = scheduler.params
    shifted = train_epochs is not None and train_epochs != max_epochs
    limit = (f"{max_epochs} (schedulers count epochs after augmenter.start_epoch; the longest trial trains {max_epochs} of "
             f"its {train_epochs} after it)") if shifted else f"train.epochs={max_epochs}"
    fix = (f"Lower it, or raise train.epochs (the longest trial runs {max_epochs} epochs)." if not shifted
           else "Lower it, or start the method earlier (augmenter.start_epoch), or raise train.epochs.")
    if scheduler.name == "asha":
        max_t = params.max_t or max_epochs
        if params.grace_period > max_t:
            bound = f"scheduler.max_t={params.max_t}" if params.max_t else f"{limit} (ASHA's max_t)"
            raise ConfigError("scheduler.grace_period", params.grace_period, f"at most {bound}: no trial reaches the first rung",
                              hint=f"Set scheduler.grace_period={min(max_t, 1) if max_t < 2 else max(1, max_t // 3)}, or raise train.epochs.")
        if params.max_t is not None and params.max_t > max_epochs:
            raise ConfigError("scheduler.max_t", params.max_t, f"at most {limit}, the longest trial", hint=fix)
    elif scheduler.name == "hyperband":
        if params.max_t is not None and params.max_t > max_epochs:
            raise ConfigError("scheduler.max_t", params.max_t, f"at most {limit}, the longest trial", hint=fix)
    elif scheduler.name == "median":
        if params.grace_period >= max_epochs:
            raise ConfigError("scheduler.grace_period", params.grace_period,
                              f"fewer than {limit}: the rule only judges trials past their grace period", hint=fix)
    elif scheduler.name == "pbt":
        if params.perturbation_interval >= max_epochs:
            raise ConfigError("scheduler.perturbation_interval", params.perturbation_interval,
                              f"fewer than {limit}: a population is only perturbed between epochs", hint=fix)


def _check_population(scheduler: SchedulerSpec, search: SearchConfig, space: SearchSpace) -> None:
    """PBT runs without a search algorithm in Ray Tune: its first population is drawn at random from Tune domains."""
    if search.sampler != "random":
        raise ConfigError("search.sampler", search.sampler, f"'random' with scheduler {scheduler.name}: Ray Tune runs it without a "
                          "search algorithm, so the first population is drawn at random")
    conditional = [p.key for p in space.params if p.condition is not None and p.condition.key not in dict(space.fixed)]
    if conditional:
        raise ConfigError(f"space.{conditional[0]}", space.params[space.keys.index(conditional[0])].dist.spec(),
                          f"no conditional keys with scheduler {scheduler.name} (a random population cannot express them)",
                          hint="Fix the method in the base config (augmenter.name / loss.name) instead of searching it.")
    pbt_keys(scheduler.params, space)
