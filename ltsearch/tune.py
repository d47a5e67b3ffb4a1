"""The Ray Tune layer: a search file -> Optuna sampler + Tune scheduler -> trials of `engine.Trainer`.

A search file is a run config (or `base: config.yaml`) plus the keys below, split by concern the way
Ray splits TuneConfig from RunConfig:

    what to search   space:, search: {sampler, num_samples, seed, max_concurrent}, metric:, mode:,
                     scheduler: {name, ...its parameters}
    how to run it    name:, storage:, resources: {cpu, gpu}, checkpoint: {every, keep}, max_failures:

The trainable (`train_trial`) is a thin wrapper over the engine: it builds the trial's run config
(base + sampled point), restores from `ray.tune.get_checkpoint()` when Tune hands it one (a failed
trial retried by FailureConfig, a resumed sweep, a PBT exploit), and reports every epoch through
`ray.tune.report`, with a checkpoint every `checkpoint.every` epochs and after the last one.

Per-trial overhead is kept small by construction: the dataset is built once on the driver and put
in the object store once (`tune.with_parameters`), trials reuse their worker processes
(`reuse_actors`, so torch is imported once per worker, not per trial), and trial directories get
short names. What remains is measured by benchmarks/platform.py.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import math
import re
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import optuna
import pandas
import ray
import yaml
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                 PopulationBasedTraining)
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from ltsearch import _checks as check
from ltsearch.config import RUN_SECTIONS, apply_overrides, build, build_run_config, dump_yaml, read_yaml
from ltsearch.errors import ConfigError
from ltsearch.registry import Registry
from ltsearch.results import location_exists, read_text_from, write_table_to, write_text_to
from ltsearch.space import (Choice, Distribution, Grid, IntRange, LogUniform, Point, SearchSpace, Uniform, apply_point,
                            parse_space, validate_space)

#: the result key schedulers count in: epochs completed (1-based), robust to restores, unlike Ray's iteration counter
EPOCHS = "epochs"
SWEEP_FILE = "sweep.yaml"
BEST_FILE = "best.yaml"
TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"


# =========================================================================================== the file
@dataclass
class SearchConfig:
    """`search:` — which Optuna sampler proposes points and how many trials it gets.

    `num_samples` is the number of trials, or with `grid` keys the number per grid cell (Ray's
    grid_search semantics). `max_concurrent` caps running trials (None: as many as resources allow).
    """

    sampler: str = "tpe"
    num_samples: int = 10
    seed: int = 0
    max_concurrent: int | None = None

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


@dataclass
class Objective:
    """`metric:` / `mode:` — what the searcher and scheduler optimise; always a validation metric (honest protocol)."""

    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"

    def validate(self, where: str) -> None:
        if not self.metric.startswith("val/"):
            raise ConfigError("metric", self.metric, "a validation metric such as 'val/top1' or 'val/bacc'",
                              hint="Searching on test leaks the test set into the choice of hyperparameters.")

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether `a` beats `b` (None never wins)."""
        if a is None or (isinstance(a, float) and math.isnan(a)):
            return False
        if b is None:
            return True
        return a > b if self.mode == "max" else a < b


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

    def validate(self, where: str) -> None:
        check.number("max_failures", self.max_failures, low=0)
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError("name", self.name, "a non-empty directory name without '/'")


EXECUTION_KEYS = ("name", "storage", "resources", "checkpoint", "max_failures")
OBJECTIVE_KEYS = ("metric", "mode")
SWEEP_KEYS = ("space", "search", "scheduler", *OBJECTIVE_KEYS, *EXECUTION_KEYS)


# ---------------------------------------------------------------------------------------- samplers
SAMPLERS: Registry[Callable[[int], Any]] = Registry("sampler", config_key="search.sampler")


@SAMPLERS.register("tpe")
def _tpe(seed: int) -> Any:
    """Multivariate, grouped TPE: models parameters jointly, and per method when the space is conditional;
    the constant liar keeps concurrent trials from proposing the same point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is marked experimental
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


@SAMPLERS.register("random")
def _random(seed: int) -> Any:
    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("gp")
def _gp(seed: int) -> Any:
    return optuna.samplers.GPSampler(seed=seed)


@SAMPLERS.register("cmaes", requires="cmaes")
def _cmaes(seed: int) -> Any:
    return optuna.samplers.CmaEsSampler(seed=seed)


@SAMPLERS.register("grid", exhaustive=True)
def _grid(seed: int) -> Any:
    """Every point is enqueued (see space.grid_cells), so the sampler underneath never draws."""
    return optuna.samplers.RandomSampler(seed=seed)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -------------------------------------------------------------------------------------- schedulers
@dataclass(frozen=True)
class SchedulerContext:
    """What a scheduler factory may need beyond its own parameters."""

    max_epochs: int
    space: SearchSpace


@dataclass
class AshaConfig:
    """Asynchronous successive halving (Li et al. 2020): at rungs grace·η^k epochs only the top 1/η continue."""

    grace_period: int = 1
    reduction_factor: float = 3.0
    max_t: int | None = None
    brackets: int = 1

    def validate(self, where: str) -> None:
        check.number(f"{where}.grace_period", self.grace_period, low=1)
        check.number(f"{where}.reduction_factor", self.reduction_factor, low=1.0, low_open=True)
        check.number(f"{where}.brackets", self.brackets, low=1)
        if self.max_t is not None:
            check.number(f"{where}.max_t", self.max_t, low=1, what="epochs; null = train.epochs")


@dataclass
class HyperbandConfig:
    """Synchronous HyperBand (Li et al. 2018); Ray pauses trials at rungs, so it needs checkpoints (we always save one)."""

    reduction_factor: float = 3.0
    max_t: int | None = None

    def validate(self, where: str) -> None:
        check.number(f"{where}.reduction_factor", self.reduction_factor, low=1.0, low_open=True)
        if self.max_t is not None:
            check.number(f"{where}.max_t", self.max_t, low=1, what="epochs; null = train.epochs")


@dataclass
class MedianConfig:
    """Median stopping rule (Golovin et al. 2017): stop a trial below the median of others at the same epoch."""

    grace_period: int = 1
    min_samples_required: int = 3

    def validate(self, where: str) -> None:
        check.number(f"{where}.grace_period", self.grace_period, low=0)
        check.number(f"{where}.min_samples_required", self.min_samples_required, low=1)


@dataclass
class PbtConfig:
    """Population-based training (Jaderberg et al. 2017): every `perturbation_interval` epochs the bottom
    quantile copies a top trial's checkpoint and perturbs the `mutate` keys (default: the float keys).

    Mutate only what may change mid-run (rates, loss weights): a copied checkpoint cannot take a new
    width or insertion point. Every checkpoint is kept, since any may be copied.
    """

    perturbation_interval: int = 2
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    mutate: list[str] | None = None

    def validate(self, where: str) -> None:
        check.number(f"{where}.perturbation_interval", self.perturbation_interval, low=1)
        check.number(f"{where}.quantile_fraction", self.quantile_fraction, low=0.0, high=0.5)
        check.number(f"{where}.resample_probability", self.resample_probability, low=0.0, high=1.0)


SCHEDULERS: Registry[Callable[[Any, SchedulerContext], Any]] = Registry("scheduler", config_key="scheduler.name")


@SCHEDULERS.register("fifo")
def _fifo(params: None, context: SchedulerContext) -> Any:
    return FIFOScheduler()


@SCHEDULERS.register("asha", config=AshaConfig)
def _asha(params: AshaConfig, context: SchedulerContext) -> Any:
    return ASHAScheduler(time_attr=EPOCHS, max_t=params.max_t or context.max_epochs, grace_period=params.grace_period,
                         reduction_factor=params.reduction_factor, brackets=params.brackets)


@SCHEDULERS.register("hyperband", config=HyperbandConfig)
def _hyperband(params: HyperbandConfig, context: SchedulerContext) -> Any:
    return HyperBandScheduler(time_attr=EPOCHS, max_t=params.max_t or context.max_epochs, reduction_factor=params.reduction_factor)


@SCHEDULERS.register("median", config=MedianConfig)
def _median(params: MedianConfig, context: SchedulerContext) -> Any:
    return MedianStoppingRule(time_attr=EPOCHS, grace_period=params.grace_period, min_samples_required=params.min_samples_required)


@SCHEDULERS.register("pbt", config=PbtConfig, population_based=True)
def _pbt(params: PbtConfig, context: SchedulerContext) -> Any:
    mutated = {p.key: p.dist for p in context.space.params if p.key in pbt_keys(params, context.space)}
    return PopulationBasedTraining(time_attr=EPOCHS, perturbation_interval=params.perturbation_interval,
                                   quantile_fraction=params.quantile_fraction, resample_probability=params.resample_probability,
                                   hyperparam_mutations={k: _pbt_domain(d) for k, d in mutated.items()},
                                   custom_explore_fn=ClipToSpace(mutated))


def pbt_keys(params: PbtConfig, space: SearchSpace) -> list[str]:
    """Keys PBT perturbs: the listed ones, or every float key; each must be sampled in every trial."""
    always = [p for p in space.params if p.condition is None or p.condition.key in dict(space.fixed)]
    keys = params.mutate if params.mutate is not None else [p.key for p in always if isinstance(p.dist, (Uniform, LogUniform))]
    allowed = [p.key for p in always if not p.dist.enumerated]
    for key in keys:
        if key not in allowed:
            raise ConfigError("scheduler.mutate", params.mutate, f"space keys that every trial samples (no grid keys): {allowed}")
    if not keys:
        raise ConfigError("scheduler.mutate", params.mutate, "at least one key to perturb; the space has no float key",
                          hint="List the keys, e.g. scheduler: {name: pbt, mutate: [optim.lr]}.")
    return keys


#: a distribution as a Ray Tune domain, for PBT (its random first population and its resampling); lattices
#: become choices because Ray's q-domains round to multiples of q from 0, not from `low`
TUNE_DOMAINS: dict[type, Callable[[Any], Any]] = {
    Uniform: lambda d: tune.uniform(d.low, d.high) if d.step is None else tune.choice(d.values()),
    LogUniform: lambda d: tune.loguniform(d.low, d.high),
    IntRange: lambda d: tune.choice(d.values()),
    Choice: lambda d: tune.choice(list(d.options)),
    Grid: lambda d: tune.grid_search(list(d.options)),
}


def _pbt_domain(dist: Distribution) -> Any:
    """PBT shifts a list value to a neighbour; numbers it multiplies by 0.8/1.2 (then ClipToSpace)."""
    return list(dist.options) if type(dist) is Choice else TUNE_DOMAINS[type(dist)](dist)


class ClipToSpace:
    """PBT's explore multiplies by 0.8/1.2; this keeps every perturbed value inside the validated box."""

    def __init__(self, dists: dict[str, Distribution]):
        self.dists = dists

    def __call__(self, config: dict) -> dict:
        return {k: (self.dists[k].clip(v) if k in self.dists else v) for k, v in config.items()}


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    params: Any

    def describe(self, max_epochs: int) -> str:
        """e.g. `asha (grace_period 1, reduction_factor 3.0, max_t 15, brackets 1)`, with max_t resolved."""
        params = vars(self.params) if self.params is not None else {}
        shown = {k: (max_epochs if k == "max_t" and v is None else v) for k, v in params.items()}
        return self.name + (" (" + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")" if shown else "")


def parse_scheduler(raw: Any) -> SchedulerSpec:
    """`scheduler: {name: asha, grace_period: 1, ...}`: the name, then that scheduler's own typed parameters."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("scheduler", raw, f"a mapping such as {{name: asha, grace_period: 1}}; names: {SCHEDULERS.names()}")
    name = raw.get("name", "asha")
    entry = SCHEDULERS.get(name)
    params = {k: v for k, v in raw.items() if k != "name"}
    if entry.config is None:
        if params:
            raise ConfigError(f"scheduler.{next(iter(params))}", next(iter(params.values())), f"nothing: scheduler '{name}' takes no parameters")
        return SchedulerSpec(name, None)
    return SchedulerSpec(name, build(entry.config, params, "scheduler"))


# ------------------------------------------------------------------------------------------ a sweep
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
    corners_checked: int
    max_epochs: int

    @property
    def num_trials(self) -> int:
        return self.search.num_samples * max(1, len(self.cells))

    @property
    def shares_data(self) -> bool:
        """Whether one dataset serves every trial (not when the space changes `data.*`)."""
        return not any(key.startswith("data.") for key in self.space.keys)

    def default_dir(self, now: float | None = None) -> str:
        stem = self.execution.name or Path(self.source).stem
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
        raise ConfigError(unknown[0], raw[unknown[0]], f"a run-config section {list(RUN_SECTIONS)} or a search key {list(SWEEP_KEYS)}")
    if not raw.get("space"):
        raise ConfigError("space", raw.get("space"), "a non-empty mapping of config keys to distributions",
                          hint="A file without a space is a run config: use `ltsearch train`.")
    base = {key: copy.deepcopy(raw[key]) for key in RUN_SECTIONS if key in raw}
    space = parse_space(raw["space"], base)
    search = build(SearchConfig, raw.get("search"), "search")
    objective = build(Objective, {k: raw[k] for k in OBJECTIVE_KEYS if k in raw}, "")
    scheduler = parse_scheduler(raw.get("scheduler"))
    execution = build(ExecutionConfig, {k: raw[k] for k in EXECUTION_KEYS if k in raw}, "")
    cells = space.grid_cells(exhaustive=bool(SAMPLERS.get(search.sampler).meta.get("exhaustive")))
    checked = validate_space(space, base)
    if SCHEDULERS.get(scheduler.name).meta.get("population_based"):
        _check_population(scheduler, search, space)
    return Sweep(source=source, raw=raw, base=base, space=space, cells=tuple(cells), search=search, objective=objective,
                 scheduler=scheduler, execution=execution, corners_checked=checked.corners, max_epochs=checked.max_epochs)


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


# ===================================================================================== the trainable
@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares (put in the object store once): the base run config and reporting rules."""

    base: dict
    objective: Objective
    checkpoint_every: int
    threads: int


def trial_run_config(plan: TrialPlan, point: Point) -> Any:
    """The run config of one trial: base + sampled point, with torch threads = the trial's CPUs unless set.

    Pinning the thread count keeps concurrent trials from oversubscribing the cores, and makes the
    trial's arithmetic (and so `best.yaml`'s rerun) identical to what ran under Tune.
    """
    raw = apply_point(plan.base, point)
    raw.setdefault("train", {})
    if raw["train"].get("threads") is None:
        raw["train"]["threads"] = plan.threads
    return build_run_config(raw)


def train_trial(config: dict, plan: TrialPlan, data: Any = None) -> None:
    """Ray Tune function trainable: one engine run, reported per epoch, checkpointed, resumable."""
    from ltsearch.engine import Trainer  # torch: imported once per worker process, which reuse_actors keeps

    run_config = trial_run_config(plan, config)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer = Trainer.restore(directory, data=data, config=run_config)
    else:
        trainer = Trainer(run_config, data=data)
    objective = plan.objective
    best = None
    for row in trainer.history:  # a restored run already has its earlier epochs
        best = row.get(objective.metric) if objective.better(row.get(objective.metric), best) else best
    node = ray.get_runtime_context().get_node_id()
    epochs = run_config.train.epochs
    for result in trainer.run():
        metrics = result.scalars()
        value = metrics.get(objective.metric)
        best = value if objective.better(value, best) else best
        metrics.update({EPOCHS: result.epoch + 1, f"best/{objective.metric}": best, "node_id": node})
        if (result.epoch + 1) % plan.checkpoint_every == 0 or result.epoch + 1 == epochs:
            with tempfile.TemporaryDirectory(prefix="ltsearch-ckpt-") as directory:
                result.save_checkpoint(directory)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(metrics)


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (Ray's default embeds every parameter and hits path limits)."""
    return f"trial_{trial.trial_id}"


# ====================================================================================== the progress
def progress_table(rows: list[dict[str, Any]], keys: list[str], objective: Objective, elapsed: float, limit: int = 12) -> str:
    """The live table: counts by status, then running trials and the best finished ones with key hyperparameters."""
    metric = objective.metric
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    rank = {"RUNNING": 0, "PAUSED": 1, "PENDING": 3}
    sign = -1.0 if objective.mode == "max" else 1.0
    shown = sorted(rows, key=lambda r: (rank.get(r["status"], 2), sign * r["best"] if isinstance(r["best"], (int, float)) else math.inf))[:limit]
    short = {key: ".".join(key.split(".")[-2:]) for key in keys}
    header = ["trial", "status", "epochs", metric, "best"] + [short[k] for k in keys]
    lines = [[r["trial"], r["status"].lower(), r["epochs"], _fmt(r["value"]), _fmt(r["best"])] + [_fmt(r["config"].get(k)) for k in keys]
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

    def __init__(self, keys: list[str], objective: Objective, max_epochs: int, interval_s: float = 10.0, stream: Any = None):
        self.keys, self.objective, self.max_epochs, self.interval_s = keys, objective, max_epochs, interval_s
        self.stream = stream
        self.start = time.monotonic()
        self.last = -math.inf
        self.dirty = True

    def __getstate__(self) -> dict:
        return {**self.__dict__, "stream": None}  # a stream does not pickle; the restoring process supplies its own

    def setup(self, **info: Any) -> None:
        self.start, self.last, self.dirty = time.monotonic(), -math.inf, True

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.dirty = True

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.dirty = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.dirty and time.monotonic() - self.last >= self.interval_s:
            self.print(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.print(trials)

    def print(self, trials: list) -> None:
        rows = []
        for trial in trials:
            last = trial.last_result or {}
            rows.append({"trial": trial.trial_id, "status": trial.status, "config": trial.config,
                         "epochs": f"{last.get(EPOCHS, 0)}/{self.max_epochs}", "value": last.get(self.objective.metric),
                         "best": last.get(f"best/{self.objective.metric}")})
        print(progress_table(rows, self.keys, self.objective, time.monotonic() - self.start), file=self.stream or sys.stdout, flush=True)
        self.last, self.dirty = time.monotonic(), False


# ===================================================================================== running sweeps
@dataclass
class SweepOutcome:
    """What a finished sweep leaves: its directory, one row per trial, one row per trial-epoch, the best trial."""

    directory: str
    trials: list[dict[str, Any]]
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    finished: bool


def run_sweep(sweep: Sweep, *, directory: str | None = None, address: str | None = None, callbacks: list[Any] | None = None,
              stream: Any = None, progress_interval_s: float = 10.0) -> SweepOutcome:
    """Run a validated sweep into `directory` (default: `<storage or runs>/<name>-<time>`); never overwrites one.

    `callbacks` are extra Ray Tune callbacks (the seam for tracking, e.g. MLflow, which runs on the driver).
    """
    directory = _absolute(directory) if directory else sweep.default_dir()
    if location_exists(directory):
        raise ConfigError("--out", directory, "a sweep directory that does not exist yet (nothing already run is ever overwritten)",
                          hint=f"Continue it with `ltsearch tune --resume {directory}`, or choose another --out.")
    stream = stream or sys.stdout
    with ray_session(address):
        _warn_if_storage_is_local(directory, stream)
        write_text_to(yaml.safe_dump(sweep.raw, sort_keys=False), _join(directory, SWEEP_FILE))
        parent, name = _split(directory)
        progress = ProgressTable(sweep.space.keys, sweep.objective, sweep.max_epochs, progress_interval_s, stream)
        scheduler = SCHEDULERS.get(sweep.scheduler.name)
        population_based = bool(scheduler.meta.get("population_based"))  # PBT: random population, exploits others' checkpoints
        search_alg, param_space, num_samples = _search(sweep, random_population=population_based)
        tuner = tune.Tuner(
            _trainable(sweep, stream),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.objective.metric, mode=sweep.objective.mode, search_alg=search_alg,
                scheduler=scheduler.obj(sweep.scheduler.params, SchedulerContext(sweep.max_epochs, sweep.space)),
                num_samples=num_samples, max_concurrent_trials=sweep.search.max_concurrent,
                reuse_actors=True, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=parent, callbacks=[progress, *(callbacks or [])], verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.execution.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if population_based else sweep.execution.checkpoint.keep)),
        )
        print(f"ltsearch tune: {sweep.source}: {sweep.num_trials} trials of at most {sweep.max_epochs} epochs, sampler "
              f"{sweep.search.sampler}, scheduler {sweep.scheduler.name}, metric {sweep.objective.metric} ({sweep.objective.mode}); "
              f"writing {directory}", file=stream, flush=True)
        grid = tuner.fit()
    return finish(sweep, directory, grid, stream)


def resume_sweep(directory: str, *, address: str | None = None, stream: Any = None) -> SweepOutcome:
    """Continue an interrupted sweep (Tuner.restore): finished trials are kept, unfinished ones resume from checkpoints."""
    directory = _absolute(directory)
    sweep_file = _join(directory, SWEEP_FILE)
    if not location_exists(sweep_file):
        raise ConfigError("--resume", directory, f"a sweep directory written by `ltsearch tune` (holding {SWEEP_FILE})")
    sweep = parse_sweep(yaml.safe_load(read_text_from(sweep_file)), source=sweep_file)
    if location_exists(_join(directory, TRIALS_FILE)):
        raise ConfigError("--resume", directory, "an unfinished sweep; this one already finished and wrote its results")
    stream = stream or sys.stdout
    with ray_session(address):
        if not tune.Tuner.can_restore(directory):
            raise ConfigError("--resume", directory, "a sweep whose experiment state Ray Tune saved (it stopped before its first trial started)",
                              hint="Start it again instead: `ltsearch tune FILE`.")
        tuner = tune.Tuner.restore(directory, trainable=_trainable(sweep, stream), resume_unfinished=True, resume_errored=True)
        print(f"ltsearch tune: resuming {directory}", file=stream, flush=True)
        grid = tuner.fit()
    return finish(sweep, directory, grid, stream)


def _plan(sweep: Sweep) -> TrialPlan:
    return TrialPlan(base=sweep.base, objective=sweep.objective, checkpoint_every=sweep.execution.checkpoint.every,
                     threads=max(1, int(sweep.execution.resources.cpu)))


def _trainable(sweep: Sweep, stream: Any) -> Any:
    """train_trial bound to the plan and the dataset, each put in the object store once for all trials."""
    from ltsearch.data import build_dataset

    data = None
    if sweep.shares_data:
        data = build_dataset(build_run_config(sweep.base).data)
    else:
        print("note: the space changes data.* keys, so every trial builds its own dataset", file=stream)
    resources = sweep.execution.resources
    return tune.with_resources(tune.with_parameters(train_trial, plan=_plan(sweep), data=data),
                               {"cpu": resources.cpu, "gpu": resources.gpu})


def _search(sweep: Sweep, *, random_population: bool) -> tuple[Any, dict | None, int]:
    """(search algorithm, Tune param_space, Tune num_samples).

    Normally Optuna proposes every point through the define-by-run space, with grid cells enqueued
    `num_samples` times each. A scheduler that needs its own random population (PBT) gets Ray's
    random generator over Tune domains instead (grid keys as grid_search, repeated `num_samples` times).
    """
    if random_population:
        domains = {p.key: TUNE_DOMAINS[type(p.dist)](p.dist) for p in sweep.space.params}
        return BasicVariantGenerator(random_state=sweep.search.seed), domains, sweep.search.num_samples
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat the progress table
    points = [dict(cell) for cell in sweep.cells for _ in range(sweep.search.num_samples)]
    searcher = OptunaSearch(space=sweep.space.sample, metric=sweep.objective.metric, mode=sweep.objective.mode,
                            sampler=SAMPLERS.get(sweep.search.sampler).obj(sweep.search.seed), points_to_evaluate=points or None)
    return searcher, None, sweep.num_trials


# -------------------------------------------------------------------------------------- the cluster
#: driver-side Ray settings (a user's own environment wins): our ProgressTable replaces Ray's console output, and the
#: experiment-state snapshot that `checkpoint.keep` forces is cheap on these small states, so its warning is noise
RAY_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the caller's Ray runtime if there is one; else start Ray in-process (address None) or join `address`.

    Only what this function started is shut down. `address=None` means "local": Ray's own default
    would join whatever cluster `ray start` left on this machine, which a laptop user did not ask for.
    Joining a token-authenticated cluster by IP:PORT needs RAY_AUTH_MODE=token before Ray is imported
    (the CLI sets it; see cli/tune.py).
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "fuse.glusterfs",
                       "fuse.gcsfuse", "fuse.s3fs", "fuse.sshfs", "fuse.juicefs", "fuse.ceph", "fuse.mountpoint-s3")


def storage_warning(directory: str, node_addresses: list[str], driver_address: str, mounts: str) -> str | None:
    """A warning when trials on other machines would write checkpoints to a path only this machine has.

    Since Ray 2.7 nothing syncs trial directories to the head node, so the storage must be a URI
    (s3://, gs://) or a network filesystem that every node mounts.
    """
    if "://" in directory:
        return None
    others = sorted({a for a in node_addresses if a != driver_address})
    if not others:
        return None
    fstype = _filesystem_type(directory, mounts)
    if fstype in NETWORK_FILESYSTEMS:
        return None
    return (f"warning: the sweep directory {directory} is on a local filesystem ({fstype or 'unknown'}), but the cluster has nodes on "
            f"{', '.join(others)} that cannot see it: their checkpoints and results would stay on their own disks. "
            "Use an NFS path mounted on every node, or storage: s3://bucket/path (or gs://...).")


def _filesystem_type(path: str, mounts: str) -> str | None:
    best, fstype = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def _warn_if_storage_is_local(directory: str, stream: Any) -> None:
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").is_file() else ""
    message = storage_warning(directory, nodes, ray.util.get_node_ip_address(), mounts)
    if message:
        print(message, file=stream, flush=True)


# ===================================================================================== the results
#: keys Ray adds to every result; the rest is what train_trial reported
RAY_KEYS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}


def finish(sweep: Sweep, directory: str, grid: Any, stream: Any) -> SweepOutcome:
    """Collect every trial from storage; if all finished, write trials.parquet, history.parquet and best.yaml."""
    plan = _plan(sweep)
    trials, history = [], []
    for result in grid:
        trial_rows = _epoch_rows(result)
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        history.extend({"trial_id": trial_id, **row} for row in trial_rows)
        trials.append(_trial_row(trial_id, result, trial_rows, plan, sweep))
    finished = len(trials) == sweep.num_trials and all(t["status"] != "unfinished" for t in trials)
    best = None
    for row in trials:
        if sweep.objective.better(row.get(f"best/{sweep.objective.metric}"), (best or {}).get(f"best/{sweep.objective.metric}")):
            best = row
    outcome = SweepOutcome(directory, trials, history, best, finished)
    if not finished:
        print(f"the sweep stopped before every trial finished; continue it with: ltsearch tune --resume {directory}", file=stream)
        return outcome
    write_table_to(trials, _join(directory, TRIALS_FILE))
    write_table_to(history, _join(directory, HISTORY_FILE))
    if best is not None:
        config = trial_run_config(plan, best["config"])
        header = (f"# best trial {best['trial_id']} of sweep {directory}\n# {sweep.objective.metric} = {best[f'best/{sweep.objective.metric}']} "
                  f"at epoch {best['best_epoch'] + 1}/{best['planned_epochs']} ({best['epochs']} epochs run)\n# rerun: ltsearch train {_join(directory, BEST_FILE)}\n")
        write_text_to(header + dump_yaml(config), _join(directory, BEST_FILE))
    _print_summary(sweep, outcome, stream)
    return outcome


def _epoch_rows(result: Any) -> list[dict[str, Any]]:
    """One row per epoch (the last report wins when a restored trial re-ran an epoch).

    Ray reads a trial's reports from its result.json; when that file is missing (seen under PBT, whose
    exploits restart trials) the same reports are in progress.csv, so a finished trial is never lost.
    """
    frame = result.metrics_dataframe
    if frame is None or EPOCHS not in frame:
        frame = _progress_csv(result.path)
    if frame is None or EPOCHS not in frame:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in frame.to_dict("records"):
        row = {k: _plain(v) for k, v in record.items() if k not in RAY_KEYS and not k.startswith("config/")}
        by_epoch[int(record[EPOCHS])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def error_reason(error: BaseException | None) -> str | None:
    """The exception's own line ("TrainingDiverged: training diverged in epoch 3/10, ..."), not Ray's task header."""
    if error is None:
        return None
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _progress_csv(trial_path: str) -> Any:
    """The trial's progress.csv as a DataFrame, or None when it is absent or unreadable."""
    location = _join(trial_path, "progress.csv")
    if not location_exists(location):
        return None
    try:
        return pandas.read_csv(io.StringIO(read_text_from(location)))
    except (ValueError, OSError):
        return None


def _trial_row(trial_id: str, result: Any, rows: list[dict[str, Any]], plan: TrialPlan, sweep: Sweep) -> dict[str, Any]:
    config = {k: v for k, v in (result.config or {}).items()}
    epochs = rows[-1][EPOCHS] if rows else 0
    planned = trial_run_config(plan, config).train.epochs
    status = "error" if result.error else "completed" if epochs >= planned else "stopped" if (result.metrics or {}).get("done") else "unfinished"
    best = None
    for row in rows:
        if best is None or sweep.objective.better(row.get(sweep.objective.metric), best.get(sweep.objective.metric)):
            best = row
    metric_keys = [k for k in (rows[-1] if rows else {}) if k not in (EPOCHS, "node_id", "epoch") and not k.startswith("best/")]
    out: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": epochs, "planned_epochs": planned,
                           "best_epoch": best.get("epoch") if best else None, "node_id": rows[-1].get("node_id") if rows else None,
                           "error": error_reason(result.error), "config": config}
    out.update({key: config.get(key) for key in sweep.space.keys})
    out.update({f"final/{k}": rows[-1].get(k) for k in metric_keys})
    out.update({f"best/{k}": (best or {}).get(k) for k in metric_keys})
    return out


def _print_summary(sweep: Sweep, outcome: SweepOutcome, stream: Any) -> None:
    statuses: dict[str, int] = {}
    for row in outcome.trials:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    metric = sweep.objective.metric
    print(f"done: {len(outcome.trials)} trials (" + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ")", file=stream)
    for row in outcome.trials:
        if row["status"] == "error":
            print(f"  trial {row['trial_id']} failed: {row['error']}", file=stream)
    best = outcome.best
    if best is None:
        print("no trial reported the metric; see the error.txt files under " + outcome.directory, file=stream)
        return
    params = ", ".join(f"{k}={_fmt(best['config'].get(k))}" for k in sweep.space.keys if k in best["config"])
    test = best.get("best/test/top1")
    print(f"best trial {best['trial_id']}: {metric} {_fmt(best[f'best/{metric}'])} at epoch {best['best_epoch'] + 1}/{best['planned_epochs']}"
          f"{f' (test/top1 {_fmt(test)} there)' if test is not None else ''}; {params}", file=stream)
    print(f"wrote {_join(outcome.directory, BEST_FILE)} (rerun: ltsearch train {_join(outcome.directory, BEST_FILE)}), "
          f"{TRIALS_FILE}, {HISTORY_FILE}", file=stream, flush=True)


# ------------------------------------------------------------------------------------- locations
def _absolute(location: str) -> str:
    """URIs stay as they are; local paths become absolute (Ray needs absolute storage paths)."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def _split(location: str) -> tuple[str, str]:
    parent, _, name = location.rstrip("/").rpartition("/")
    return parent or "/", name
