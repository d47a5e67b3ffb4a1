"""The trainable: `train_trial` runs one trial of `engine.Trainer` under Ray Tune, from the `TrialPlan`
every trial shares; it is module-level so that Ray can pickle it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from ltsearch.config import build_run_config
from ltsearch.space import Point, apply_point
from ltsearch.tracking.record import CLASS_COUNTS, PER_CLASS
from ltsearch.tune._names import EPOCHS
from ltsearch.tune.settings import Objective, Sweep


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
    counts = trainer.class_counts.tolist()
    epochs = run_config.train.epochs
    for result in trainer.run():
        metrics = result.scalars()
        per_class = {PER_CLASS: result.metrics.get(PER_CLASS), CLASS_COUNTS: counts}  # the tracked per-class plot
        value = metrics.get(objective.metric)
        best = value if objective.better(value, best) else best
        metrics.update({EPOCHS: result.epoch + 1, f"best/{objective.metric}": best, "node_id": node, **per_class})
        if (result.epoch + 1) % plan.checkpoint_every == 0 or result.epoch + 1 == epochs:
            with tempfile.TemporaryDirectory(prefix="ltsearch-ckpt-") as directory:
                result.save_checkpoint(directory)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(metrics)


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (Ray's default embeds every parameter and hits path limits)."""
    return f"trial_{trial.trial_id}"


def _plan(sweep: Sweep) -> TrialPlan:
    return TrialPlan(base=sweep.base, objective=sweep.objective, checkpoint_every=sweep.execution.checkpoint.every,
                     threads=max(1, int(sweep.execution.resources.cpu)))
