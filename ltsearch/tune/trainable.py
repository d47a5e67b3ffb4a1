"""The trainable: `train_trial` runs one trial of `engine.Trainer` under Ray Tune, from the `TrialPlan`
every trial shares; it is module-level so that Ray can pickle it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from ltsearch.config import build_run_config, with_threads
from ltsearch.data.fingerprints import check_trial_data, record_fingerprints
from ltsearch.epochs import SELECTABLE, scalars
from ltsearch.prefix import PREFIX_KEY
from ltsearch.prefix.fork import PrefixSharing, start_trainer
from ltsearch.space import Point, apply_point
from ltsearch.tracking.record import CLASS_COUNTS, PER_CLASS
from ltsearch.tune._names import ACTIVE_EPOCHS, EPOCHS
from ltsearch.tune.objectives import Objective, select_epoch
from ltsearch.tune.settings import Sweep


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares (put in the object store once): the base run config and reporting rules."""

    base: dict
    objective: Objective
    checkpoint_every: int
    threads: int
    sharing: PrefixSharing | None = None


def trial_run_config(plan: TrialPlan, point: Point) -> Any:
    """The run config of one trial: base + sampled point, with torch threads = the trial's CPUs unless set.

    Pinning the thread count keeps concurrent trials from oversubscribing the cores, and makes the
    trial's arithmetic (and so `best.yaml`'s rerun) identical to what ran under Tune.
    """
    return build_run_config(with_threads(apply_point(plan.base, point), plan.threads))


def train_trial(config: dict, plan: TrialPlan, data: Any = None) -> None:
    """Ray Tune function trainable: one engine run, reported per epoch, checkpointed, resumable.

    A trial forked from a shared prefix first reports the prefix's epochs (marked `prefix/shared`, not
    trained again), so its results, history and best epoch read exactly as if it had trained them.
    It first checks that its data has the fingerprints the driver recorded (and, resumed, those its
    checkpoint was trained on: `data/fingerprints.py`), and fails naming both values otherwise.
    """
    from ltsearch.engine import Trainer, method_start_epoch  # torch: imported once per worker process, which reuse_actors keeps

    run_config = trial_run_config(plan, config)
    checkpoint = tune.get_checkpoint()
    replay, prefix = [], None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer = Trainer.restore(directory, data=data, config=run_config)
            trained_on = check_trial_data(trainer.data, directory)  # and the images the checkpoint was trained on
    else:
        trainer, prefix = start_trainer(run_config, plan.sharing, data)
        trained_on = check_trial_data(trainer.data)
        replay = list(trainer.history)
    report = _Reporter(plan.objective, start_epoch=method_start_epoch(run_config), node=ray.get_runtime_context().get_node_id(),
                       counts=trainer.class_counts.tolist(), prefix_key=prefix.key if prefix else None)
    for row in trainer.history[:len(trainer.history) - len(replay)]:  # a restored run already reported its earlier epochs
        report.track_best(row)
    for row in replay:
        tune.report(report.metrics(row))
    epochs = run_config.train.epochs
    for result in trainer.run():
        metrics = report.metrics(result.metrics)
        if (result.epoch + 1) % plan.checkpoint_every == 0 or result.epoch + 1 == epochs:
            with tempfile.TemporaryDirectory(prefix="ltsearch-ckpt-") as directory:
                result.save_checkpoint(directory)
                record_fingerprints(trainer.data, directory, trained_on)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(metrics)


class _Reporter:
    """Turns one epoch's metrics into a Tune result: scalars, epoch counters (absolute, and after the method's start
    epoch for schedulers), each objective at the epoch selected so far (`best/<metric>`, objectives.py's rule),
    per-class lists, the prefix the trial forked from."""

    def __init__(self, objective: Objective, *, start_epoch: int, node: str, counts: list[int], prefix_key: str | None):
        self.objective, self.start_epoch, self.node, self.counts, self.prefix_key = objective, start_epoch, node, counts, prefix_key
        self.best: dict[str, Any] | None = None

    def track_best(self, row: dict[str, Any]) -> None:
        self.best = select_epoch([r for r in (self.best, row) if r is not None], self.objective, SELECTABLE) or self.best

    def metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        self.track_best(row)
        done = int(row["epoch"]) + 1
        metrics: dict[str, Any] = scalars(row)
        metrics.update({EPOCHS: done, ACTIVE_EPOCHS: done - self.start_epoch, "node_id": self.node, PER_CLASS: row.get(PER_CLASS),
                        CLASS_COUNTS: self.counts})
        metrics.update({f"best/{m}": (self.best or {}).get(m) for m in self.objective.metrics})
        if self.prefix_key is not None:
            metrics[PREFIX_KEY] = self.prefix_key
        return metrics


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (Ray's default embeds every parameter and hits path limits)."""
    return f"trial_{trial.trial_id}"


def _plan(sweep: Sweep, sharing: PrefixSharing | None = None) -> TrialPlan:
    return TrialPlan(base=sweep.base, objective=sweep.objective, checkpoint_every=sweep.execution.checkpoint.every,
                     threads=max(1, int(sweep.execution.resources.cpu)), sharing=sharing)
