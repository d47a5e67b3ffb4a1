"""The Ray Tune layer: a search file -> Optuna sampler + Tune scheduler -> trials of `engine.Trainer`.

A search file is a run config (or `base: config.yaml`) plus the keys below, split by concern the way
Ray splits TuneConfig from RunConfig:

    what to search   space:, search: {sampler, num_samples, seed, max_concurrent, population_size}, metric:, mode:
                     (one objective or several), scheduler: {name, metric, ...its parameters}
    how to run it    name:, storage:, resources: {cpu, gpu}, checkpoint: {every, keep}, max_failures:

The trainable (`train_trial`) is a thin wrapper over the engine: it builds the trial's run config
(base + sampled point), restores from `ray.tune.get_checkpoint()` when Tune hands it one (a failed
trial retried by FailureConfig, a resumed sweep, a PBT exploit), and reports every epoch through
`ray.tune.report`, with a checkpoint every `checkpoint.every` epochs and after the last one.

Per-trial overhead is kept small by construction: the dataset is built once on the driver and put
in the object store once (`tune.with_parameters`), trials reuse their worker processes
(`reuse_actors`, so torch is imported once per worker, not per trial), and trial directories get
short names. What remains is measured by benchmarks/platform.py.

The package, by concern (this module re-exports the public names):

    settings.py     the search file's sections, `Sweep`, `load_sweep` / `parse_sweep`
    objectives.py   `Objective` (metric:/mode:, one or several), the epoch rule, Pareto dominance
    algorithms.py   the sampler and scheduler registries (SAMPLERS, SCHEDULERS), PBT's domains and clipping
    trainable.py    `TrialPlan`, `trial_run_config`, `train_trial` (the Ray trainable), `trial_dirname`
    progress.py     the live progress table (`ProgressTable`, a Tune callback)
    session.py      the Ray runtime (`ray_session`) and the shared-storage warning
    outputs.py      `finish`: trials.parquet, history.parquet, best.yaml, the summary; `SweepOutcome`
    pareto.py       a multi-objective sweep's front: pareto.parquet, pareto/NN.yaml, pareto.png, its table
    importance.py   each searched key's importance per objective (fANOVA, PED-ANOVA) from trials.parquet
    runner.py       `run_sweep` and `resume_sweep`
    _names.py       the epoch key, the sweep directory's file names, location helpers
"""

from __future__ import annotations

from ltsearch.tune._names import ACTIVE_EPOCHS, BEST_FILE, EPOCHS, HISTORY_FILE, SWEEP_FILE, TRIALS_FILE
from ltsearch.tune.algorithms import (SAMPLERS, SCHEDULERS, TUNE_DOMAINS, AshaConfig, ClipToSpace, HyperbandConfig, MedianConfig,
                                      PbtConfig, SchedulerContext, SchedulerSpec, parse_scheduler, pbt_keys)
from ltsearch.tune.settings import (EXECUTION_KEYS, OBJECTIVE_KEYS, SWEEP_KEYS, CheckpointSettings, ExecutionConfig, Objective,
                                    ResourcesConfig, SearchConfig, Sweep, load_sweep, parse_sweep)
from ltsearch.tune.trainable import TrialPlan, train_trial, trial_dirname, trial_run_config
from ltsearch.tune.progress import ProgressTable, progress_table
from ltsearch.tune.session import NETWORK_FILESYSTEMS, RAY_ENV, ray_session, storage_warning
from ltsearch.tune.outputs import RAY_KEYS, SweepOutcome, error_reason, finish
from ltsearch.tune.runner import resume_sweep, run_sweep

__all__ = [
    "ACTIVE_EPOCHS", "BEST_FILE", "EPOCHS", "HISTORY_FILE", "SWEEP_FILE", "TRIALS_FILE",
    "SAMPLERS", "SCHEDULERS", "TUNE_DOMAINS", "AshaConfig", "ClipToSpace", "HyperbandConfig", "MedianConfig", "PbtConfig",
    "SchedulerContext", "SchedulerSpec", "parse_scheduler", "pbt_keys",
    "EXECUTION_KEYS", "OBJECTIVE_KEYS", "SWEEP_KEYS", "CheckpointSettings", "ExecutionConfig", "Objective", "ResourcesConfig",
    "SearchConfig", "Sweep", "load_sweep", "parse_sweep",
    "TrialPlan", "train_trial", "trial_dirname", "trial_run_config",
    "ProgressTable", "progress_table",
    "NETWORK_FILESYSTEMS", "RAY_ENV", "ray_session", "storage_warning",
    "RAY_KEYS", "SweepOutcome", "error_reason", "finish",
    "resume_sweep", "run_sweep",
]
