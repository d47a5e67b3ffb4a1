"""Running an ablation through the same Ray layer as `ltsearch tune`: every pending run is a Tune trial.

Shared with sweeps: `ray_session` (local Ray, or `--address` for a cluster), per-trial resources (GPU
fractions pack runs on one GPU), reused worker processes, the progress table, the driver's epoch log.
Ablation-specific: the trials are a fixed list (a grid over run ids, no sampler, no scheduler: every
cell must finish), each distinct data config is built once on the driver and put in the object store,
and completion is recorded per run (cells.py), so `--resume` and reruns train only what is missing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ltsearch.ablate.cells import RUN_KEY, CellPlan, read_result, train_cell
from ltsearch.ablate.outputs import AblationOutcome, finish_ablation
from ltsearch.ablate.settings import Ablation, parse_ablation
from ltsearch.ablate.tracking import AblationTracking
from ltsearch.config import read_saved
from ltsearch.errors import ConfigError
from ltsearch.prefix.fork import open_sharing, report_sharing
from ltsearch.prefix.keys import method_prefix_keys
from ltsearch.tracking.warmup import prewarm
from ltsearch.tracking.settings import SECTION as TRACKING_SECTION
from ltsearch.tune._names import _absolute
from ltsearch.tune.epochlog import EpochLog
from ltsearch.tune.progress import ProgressTable
from ltsearch.tune.session import check_machine, ray_session, result_loggers
from ltsearch.tune.settings import Objective
from ltsearch.tune.trainable import trial_dirname

ABLATION_FILE = "ablation.yaml"


@dataclass(frozen=True)
class Launch:
    directory: str
    pending: list[str]
    attempt: int


def run_ablation(ablation: Ablation, *, directory: str | None = None, address: str | None = None, stream: Any = None,
                 progress_interval_s: float = 10.0) -> AblationOutcome:
    """Run every run of `ablation` that has not ended yet into `directory` (new, or an earlier run of this ablation)."""
    stream = stream or sys.stdout
    directory = _absolute(directory) if directory else ablation.default_dir()
    _check_directory(directory)
    plan = CellPlan.of(ablation, directory)
    pending = [run.run_id for run in ablation.runs if read_result(directory, run.run_id) is None]
    if pending:
        check_machine(ablation.execution.resources.cpu, ablation.execution.resources.gpu, address)
    data = _datasets(plan, pending)  # a missing or corrupt dataset fails here, before anything is written or started
    if pending:
        prewarm(ablation.tracking)  # (opening the store creates it: not for an ablation refused above)
    launch = _prepare(ablation, directory, pending)
    print(f"ltsearch ablate: {ablation.source}: {len(ablation.rows)} rows x {len(ablation.column_labels)} columns x {len(ablation.seeds)} seeds "
          f"= {len(ablation.runs)} runs ({len(ablation.runs) - len(pending)} already done, {len(pending)} to run); writing {directory}",
          file=stream, flush=True)
    live = None
    if pending:
        with ray_session(address):
            live = _fit(ablation, plan, launch, data, stream, progress_interval_s)
    return finish_ablation(ablation, directory, stream, live)


def resume_ablation(directory: str, *, address: str | None = None, stream: Any = None) -> AblationOutcome:
    """Continue the ablation saved in `directory` (its ablation.yaml): only runs without a result are trained."""
    directory = _absolute(directory)
    saved = Path(directory) / ABLATION_FILE
    if not saved.is_file():
        raise ConfigError("--resume", directory, f"an ablation directory written by `ltsearch ablate` (holding {ABLATION_FILE})")
    ablation = parse_ablation(read_saved(saved, "--resume"), source=str(saved))
    return run_ablation(ablation, directory=directory, address=address, stream=stream)


def _check_directory(directory: str) -> None:
    if "://" in directory:
        raise ConfigError("--out", directory, "a local or network-filesystem path (runs checkpoint into their own directories)")
    path = Path(directory)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / ABLATION_FILE).is_file())):
        raise ConfigError("--out", directory, "a new directory or one holding this ablation (ablation.yaml); this one holds something else")


def _datasets(plan: CellPlan, pending: list[str]) -> dict[str, Any]:
    """Each distinct data config of the runs still to train, built once."""
    from ltsearch.data import build_dataset

    data: dict[str, Any] = {}
    for run_id in pending:
        key = plan.data_keys[run_id]
        if key not in data:
            data[key] = build_dataset(plan.run_config(plan.runs[run_id]).data)
    return data


def _prepare(ablation: Ablation, directory: str, pending: list[str]) -> Launch:
    """Save the resolved file (what --resume reads) and number this attempt."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    saved = {**ablation.raw, TRACKING_SECTION: _pinned_tracking(ablation)} if ablation.tracking.enabled else ablation.raw
    tmp = path / (ABLATION_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(saved, sort_keys=False))
    tmp.replace(path / ABLATION_FILE)
    attempt = 1 + sum(1 for child in path.glob("attempt-*") if child.is_dir())
    return Launch(directory, pending, attempt)


def _pinned_tracking(ablation: Ablation) -> dict[str, Any]:
    settings = ablation.tracking
    return {"enabled": True, "uri": settings.resolved_uri(), "experiment": settings.experiment or ablation.name, "artifacts": settings.artifacts}


def _fit(ablation: Ablation, plan: CellPlan, launch: Launch, data: dict[str, Any], stream: Any,
         progress_interval_s: float) -> AblationTracking | None:
    import ray

    datasets = {key: ray.put(value) for key, value in data.items()}  # once each in the object store, for all runs
    resources = ablation.execution.resources
    baseline_keys = method_prefix_keys(plan.run_config(run) for run in plan.runs.values())
    sharing = open_sharing(launch.directory, ablation.execution.share_prefix, ablation.execution.checkpoint.every, baseline_keys)
    trainable = tune.with_resources(tune.with_parameters(train_cell, plan=plan, datasets=datasets, sharing=sharing),
                                    {"cpu": resources.cpu, "gpu": resources.gpu})
    objective = Objective(metric="val/top1", mode="max")
    progress = ProgressTable([RUN_KEY], objective, max(run.epochs for run in ablation.runs), progress_interval_s, stream,
                             board=sharing.board if sharing is not None else None)
    live = AblationTracking(ablation, launch.directory) if ablation.tracking.enabled else None
    tuner = tune.Tuner(
        trainable,
        param_space={RUN_KEY: tune.grid_search(launch.pending)},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=f"attempt-{launch.attempt}", storage_path=launch.directory, verbose=0,
                                  callbacks=[progress, *result_loggers(), EpochLog(str(Path(launch.directory) / f"attempt-{launch.attempt}")),
                                             *([live] if live is not None else [])],
                                  failure_config=tune.FailureConfig(max_failures=ablation.execution.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    tuner.fit()
    report_sharing(sharing, stream)
    return live
