"""The registries a search file names: Optuna samplers (`search.sampler`) and Ray Tune schedulers
(`scheduler.name`, each with its typed parameters, and `scheduler.metric`: the one objective it judges),
and what PBT needs (Tune domains, clipping).

Every sampler but CMA-ES also searches several objectives (Optuna's TPE, NSGA-II, GP and random handle a
list of directions); a scheduler always judges one number, so with several objectives it is told which.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from ray import tune
from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                 PopulationBasedTraining)

from ltsearch import _checks as check
from ltsearch.config import build
from ltsearch.errors import ConfigError
from ltsearch.registry import Registry
from ltsearch.space import Choice, Distribution, Grid, IntRange, LogUniform, SearchSpace, Uniform
from ltsearch.tune._names import ACTIVE_EPOCHS


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


@SAMPLERS.register("cmaes", requires="cmaes", single_objective=True)
def _cmaes(seed: int) -> Any:
    """Optuna's CMA-ES adapts one Gaussian towards one objective: it refuses multi-objective studies."""
    return optuna.samplers.CmaEsSampler(seed=seed)


#: Optuna's default NSGA-II generation size (`search.population_size` changes it)
NSGA_POPULATION = 50


@SAMPLERS.register("nsgaii", population=True)
def _nsgaii(seed: int, population_size: int = NSGA_POPULATION) -> Any:
    """NSGA-II (Deb et al. 2002): generations of `search.population_size` trials, bred from the non-dominated ones.

    Before its first generation is complete it samples at random, so a sweep of fewer trials than two
    populations is mostly a random search (`ltsearch check` says so)."""
    return PicklableNSGAII(seed=seed, population_size=population_size)


class PicklableNSGAII(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II as Ray Tune can save it: Tune pickles the searcher with the experiment (tuner.pkl, and each
    experiment checkpoint `--resume` restores), and Optuna's GA samplers hold a `threading.Lock` (around a cache of
    the study's generations), which does not pickle. The lock is left out and made anew when unpickled; the cache
    it guards is rebuilt from the study."""

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


@SAMPLERS.register("grid", exhaustive=True)
def _grid(seed: int) -> Any:
    """Every point is enqueued (see space.grid_cells), so the sampler underneath never draws."""
    return optuna.samplers.RandomSampler(seed=seed)


def make_sampler(name: str, seed: int, population_size: int | None) -> Any:
    """The sampler `search.sampler` names; a population-based one gets `search.population_size` when it is set."""
    entry = SAMPLERS.get(name)
    return entry.obj(seed, population_size) if entry.meta.get("population") and population_size else entry.obj(seed)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class SchedulerContext:
    """What a scheduler factory may need beyond its own parameters.

    `max_epochs` is in the schedulers' unit: the most epochs a trial trains after its method's start epoch.
    `metric`/`mode`: the objective it judges (given to the scheduler itself, since Tune's own metric cannot
    be a list when the searcher optimises several)."""

    max_epochs: int
    space: SearchSpace
    metric: str
    mode: str


@dataclass
class AshaConfig:
    """Asynchronous successive halving (Li et al. 2020): at rungs grace·η^k epochs only the top 1/η continue.

    Epochs count from the method's start epoch T (augmenter.start_epoch; 0 without a method): a trial's first
    rung is grace epochs after its method switched on, whether it trained [0, T) itself or forked a shared prefix."""

    grace_period: int = 1
    reduction_factor: float = 3.0
    max_t: int | None = None
    brackets: int = 1

    def validate(self, where: str) -> None:
        check.number(f"{where}.grace_period", self.grace_period, low=1)
        check.number(f"{where}.reduction_factor", self.reduction_factor, low=1.0, low_open=True)
        check.number(f"{where}.brackets", self.brackets, low=1)
        if self.max_t is not None:
            check.number(f"{where}.max_t", self.max_t, low=1, what="epochs after the start epoch; null = all of them")


@dataclass
class HyperbandConfig:
    """Synchronous HyperBand (Li et al. 2018); Ray pauses trials at rungs, so it needs checkpoints (we always save one)."""

    reduction_factor: float = 3.0
    max_t: int | None = None

    def validate(self, where: str) -> None:
        check.number(f"{where}.reduction_factor", self.reduction_factor, low=1.0, low_open=True)
        if self.max_t is not None:
            check.number(f"{where}.max_t", self.max_t, low=1, what="epochs after the start epoch; null = all of them")


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


@SCHEDULERS.register("asha", config=AshaConfig, judges=True)
def _asha(params: AshaConfig, context: SchedulerContext) -> Any:
    return ASHAScheduler(time_attr=ACTIVE_EPOCHS, metric=context.metric, mode=context.mode, max_t=params.max_t or context.max_epochs,
                         grace_period=params.grace_period, reduction_factor=params.reduction_factor, brackets=params.brackets)


@SCHEDULERS.register("hyperband", config=HyperbandConfig, judges=True)
def _hyperband(params: HyperbandConfig, context: SchedulerContext) -> Any:
    return HyperBandScheduler(time_attr=ACTIVE_EPOCHS, metric=context.metric, mode=context.mode, max_t=params.max_t or context.max_epochs,
                              reduction_factor=params.reduction_factor)


@SCHEDULERS.register("median", config=MedianConfig, judges=True)
def _median(params: MedianConfig, context: SchedulerContext) -> Any:
    return MedianStoppingRule(time_attr=ACTIVE_EPOCHS, metric=context.metric, mode=context.mode, grace_period=params.grace_period,
                              min_samples_required=params.min_samples_required)


@SCHEDULERS.register("pbt", config=PbtConfig, population_based=True, judges=True)
def _pbt(params: PbtConfig, context: SchedulerContext) -> Any:
    mutated = {p.key: p.dist for p in context.space.params if p.key in pbt_keys(params, context.space)}
    return PopulationBasedTraining(time_attr=ACTIVE_EPOCHS, metric=context.metric, mode=context.mode,
                                   perturbation_interval=params.perturbation_interval,
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
    """`scheduler:`: its name, its typed parameters, and `metric`, the objective it judges (None: the first one)."""

    name: str
    params: Any
    metric: str | None = None

    @property
    def judges(self) -> bool:
        """Whether it stops or copies trials by a metric (FIFO runs every trial to the end)."""
        return bool(SCHEDULERS.get(self.name).meta.get("judges"))

    def describe(self, max_epochs: int) -> str:
        """e.g. `asha (grace_period 1, reduction_factor 3.0, max_t 15, brackets 1)`, with max_t resolved."""
        params = vars(self.params) if self.params is not None else {}
        shown = {k: (max_epochs if k == "max_t" and v is None else v) for k, v in params.items()}
        return self.name + (" (" + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")" if shown else "")


def parse_scheduler(raw: Any) -> SchedulerSpec:
    """`scheduler: {name: asha, metric: val/few, grace_period: 1, ...}`: the name, the judged objective, then that
    scheduler's own typed parameters. Whether `metric` is one of the objectives is checked with the objectives."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("scheduler", raw, f"a mapping such as {{name: asha, grace_period: 1}}; names: {SCHEDULERS.names()}")
    name = raw.get("name", "asha")
    entry = SCHEDULERS.get(name)
    metric = raw.get("metric")
    if metric is not None and not entry.meta.get("judges"):
        raise ConfigError("scheduler.metric", metric, f"nothing: scheduler '{name}' judges no metric (it stops no trial)",
                          hint="Drop scheduler.metric, or choose asha, hyperband or median.")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError("scheduler.metric", metric, "one metric name, e.g. val/few (a scheduler judges one number)")
    params = {k: v for k, v in raw.items() if k not in ("name", "metric")}
    if entry.config is None:
        if params:
            raise ConfigError(f"scheduler.{next(iter(params))}", next(iter(params.values())), f"nothing: scheduler '{name}' takes no parameters")
        return SchedulerSpec(name, None)
    return SchedulerSpec(name, build(entry.config, params, "scheduler"), metric)
