"""Running sweeps: `run_sweep` (a new sweep directory) and `resume_sweep` (Tuner.restore of an interrupted one).
"""

from __future__ import annotations

import sys
from typing import Any

import optuna
import yaml
from ray import tune
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from ltsearch.config import build_run_config
from ltsearch.errors import ConfigError
from ltsearch.prefix.fork import open_sharing, report_sharing
from ltsearch.prefix.keys import baselines_share
from ltsearch.prefix.plan import sweep_methods
from ltsearch.results import location_exists, read_text_from, write_text_to
from ltsearch.tracking.record import data_tags
from ltsearch.tracking.warmup import prewarm
from ltsearch.tracking.settings import SECTION as TRACKING_SECTION
from ltsearch.tune._names import SWEEP_FILE, TRIALS_FILE, _absolute, _join, _split
from ltsearch.tune.algorithms import SCHEDULERS, TUNE_DOMAINS, SchedulerContext, make_sampler
from ltsearch.tune.epochlog import EpochLog
from ltsearch.tune.outputs import SweepOutcome, finish
from ltsearch.tune.progress import ProgressTable
from ltsearch.tune.session import _warn_if_storage_is_local, ray_session, result_loggers
from ltsearch.tune.settings import Sweep, parse_sweep
from ltsearch.tune.trainable import _plan, train_trial, trial_dirname
from ltsearch.tune.tracking import SweepTracking, pinned_tracking, record_sweep


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
    prewarm(sweep.tracking)
    with ray_session(address):
        _warn_if_storage_is_local(directory, stream)
        saved = {**sweep.raw, TRACKING_SECTION: pinned_tracking(sweep)} if sweep.tracking.enabled else sweep.raw
        write_text_to(yaml.safe_dump(saved, sort_keys=False), _join(directory, SWEEP_FILE))
        parent, name = _split(directory)
        scheduler = SCHEDULERS.get(sweep.scheduler.name)
        population_based = bool(scheduler.meta.get("population_based"))  # PBT: random population, exploits others' checkpoints
        search_alg, param_space, num_samples = _search(sweep, random_population=population_based)
        trainable, data_tags, sharing = _trainable(sweep, directory, stream)
        progress = ProgressTable(sweep.space.keys, sweep.objective, sweep.max_epochs, progress_interval_s, stream,
                                 board=sharing.board if sharing is not None else None)
        live = SweepTracking(sweep, directory, data_tags, population_based) if sweep.tracking.enabled else None
        ours = [EpochLog(directory)] + ([live] if live is not None else [])
        judged, judged_mode = sweep.judged
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(  # no metric here: the searcher and the scheduler are each given theirs (a list and one)
                search_alg=search_alg,
                scheduler=scheduler.obj(sweep.scheduler.params, SchedulerContext(sweep.max_active_epochs, sweep.space, judged, judged_mode)),
                num_samples=num_samples, max_concurrent_trials=sweep.search.max_concurrent,
                reuse_actors=True, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=parent, callbacks=[progress, *result_loggers(), *ours, *(callbacks or [])], verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.execution.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if population_based else sweep.execution.checkpoint.keep)),
        )
        judging = f" judging {judged}" if sweep.scheduler.judges and sweep.objective.multi else ""
        print(f"ltsearch tune: {sweep.source}: {sweep.num_trials} trials of at most {sweep.max_epochs} epochs, sampler "
              f"{sweep.search.sampler}, scheduler {sweep.scheduler.name}{judging}, "
              f"{'objectives' if sweep.objective.multi else 'metric'} {sweep.objective.describe()}; writing {directory}", file=stream, flush=True)
        grid = tuner.fit()
        report_sharing(sharing, stream)
    return _finish(sweep, directory, grid, data_tags, stream, live)


def resume_sweep(directory: str, *, address: str | None = None, stream: Any = None) -> SweepOutcome:
    """Continue an interrupted sweep (Tuner.restore): finished trials are kept, unfinished ones resume from checkpoints."""
    directory = _absolute(directory)
    sweep_file = _join(directory, SWEEP_FILE)
    if not location_exists(sweep_file):
        raise ConfigError("--resume", directory, f"a sweep directory written by `ltsearch tune` (holding {SWEEP_FILE})")
    sweep = parse_sweep(yaml.safe_load(read_text_from(sweep_file)), source=sweep_file)
    if location_exists(_join(directory, TRIALS_FILE)):
        raise ConfigError("--resume", directory, "an unfinished sweep; this one already finished and wrote its results")
    check_restorable(directory)
    stream = stream or sys.stdout
    with ray_session(address):
        trainable, data_tags, sharing = _trainable(sweep, directory, stream)
        tuner = tune.Tuner.restore(directory, trainable=trainable, resume_unfinished=True, resume_errored=True)
        print(f"ltsearch tune: resuming {directory}", file=stream, flush=True)
        grid = tuner.fit()
        report_sharing(sharing, stream)
    return _finish(sweep, directory, grid, data_tags, stream)


def check_restorable(directory: str) -> None:
    """Refuse, before Ray starts, a sweep directory without the experiment state Tune restores from (reading it needs no Ray)."""
    directory = _absolute(directory)
    if not tune.Tuner.can_restore(directory):
        raise ConfigError("--resume", directory, "a sweep whose experiment state Ray Tune saved (it stopped before its first trial started)",
                          hint="Start it again instead: `ltsearch tune FILE`.")


def _finish(sweep: Sweep, directory: str, grid: Any, data_tags: dict[str, str], stream: Any,
            live: SweepTracking | None = None) -> SweepOutcome:
    """The sweep's files first (they are the record), then MLflow from them, then how to browse it.

    A resumed sweep's callback was restored by Tune from its saved state, so no `live` writer is at hand
    there and the store is reconciled from the files alone.
    """
    outcome = finish(sweep, directory, grid, stream)
    browse = record_sweep(sweep, directory, outcome, data_tags, stream, live)
    if browse:
        print(browse, file=stream, flush=True)
    return outcome


def _trainable(sweep: Sweep, directory: str, stream: Any) -> tuple[Any, dict[str, str], Any]:
    """(train_trial bound to the plan and the dataset, each put in the object store once for all trials; the data's tags).

    The plan carries the sweep's prefix sharing (its board lives as long as this Ray session)."""
    from ltsearch.data import build_dataset

    data = None
    if sweep.shares_data:
        data = build_dataset(build_run_config(sweep.base).data)
    else:
        print("note: the space changes data.* keys, so every trial builds its own dataset", file=stream)
    resources = sweep.execution.resources
    baseline_keys = None if baselines_share(sweep_methods(sweep)) else frozenset()  # trials are drawn as it runs: any trunk
    sharing = open_sharing(directory, sweep.execution.share_prefix, sweep.execution.checkpoint.every, baseline_keys)
    trainable = tune.with_resources(tune.with_parameters(train_trial, plan=_plan(sweep, sharing), data=data),
                                    {"cpu": resources.cpu, "gpu": resources.gpu})
    return trainable, data_tags(data.construction if data is not None else None), sharing


def _search(sweep: Sweep, *, random_population: bool) -> tuple[Any, dict | None, int]:
    """(search algorithm, Tune param_space, Tune num_samples).

    Normally Optuna proposes every point through the define-by-run space, with grid cells enqueued
    `num_samples` times each. A scheduler that needs its own random population (PBT) gets Ray's
    random generator over Tune domains instead (grid keys as grid_search, repeated `num_samples` times).

    With several objectives the searcher is told each trial's values at its selected epoch (`best/<metric>`,
    one model: objectives.py), which is what its Pareto front is made of; with one, the metric as before.
    """
    if random_population:
        domains = {p.key: TUNE_DOMAINS[type(p.dist)](p.dist) for p in sweep.space.params}
        return BasicVariantGenerator(random_state=sweep.search.seed), domains, sweep.search.num_samples
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat the progress table
    points = [dict(cell) for cell in sweep.cells for _ in range(sweep.search.num_samples)]
    objective = sweep.objective
    metric, mode = ([f"best/{m}" for m in objective.metrics], list(objective.modes)) if objective.multi else (objective.metric, objective.mode)
    sampler = make_sampler(sweep.search.sampler, sweep.search.seed, sweep.search.population_size)
    searcher = OptunaSearch(space=sweep.space.sample, metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None)
    return searcher, None, sweep.num_trials
