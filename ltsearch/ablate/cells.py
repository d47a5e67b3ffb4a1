"""One ablation run (cell × seed pair) as a Ray Tune trial, with its own directory as the record.

Each run writes into `<ablation>/runs/<run_id>/`: `config.yaml`, `checkpoint.pt` (every `checkpoint.every`
epochs and after the last, atomically), `history.parquet` (one row per epoch) and, when it has ended,
`result.json` (status, the best-val epoch and every metric there, the selection rule and the method's
start epoch, so the matrix can tell an epoch before the method started). `result.json` is what makes a run
done: a resumed or rerun ablation trains exactly the runs without one, and a run cut short continues
from its own checkpoint, whichever Tune experiment (attempt) ran it before. That is why ablations do
not use Tune's experiment restore: adding a seed or a row to the file must run only the new runs.

A run that diverges (nan/inf loss) ends as `error` in its result.json and is not retried: the same
seed would diverge the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from ltsearch.ablate.settings import Ablation, Run
from ltsearch.config import build_run_config, dump_yaml, with_threads
from ltsearch.data.fingerprints import pin_run_data
from ltsearch.epochs import scalars
from ltsearch.errors import TrainingDiverged
from ltsearch.prefix import PREFIX_KEY
from ltsearch.prefix.fork import PrefixSharing, start_trainer
from ltsearch.results import write_json, write_table
from ltsearch.space import apply_point
from ltsearch.tracking.record import CLASS_COUNTS, PER_CLASS
from ltsearch.tune._names import EPOCHS

RUNS_DIR = "runs"
RESULT_FILE = "result.json"
RUN_KEY = "run_id"  # the one key of a trial's Tune config: which run it is


@dataclass(frozen=True)
class CellPlan:
    """What every run shares (put in the object store once): the base config, the runs by id, how to checkpoint."""

    base: dict
    directory: str
    runs: dict[str, Run]
    data_keys: dict[str, str]
    checkpoint_every: int
    threads: int

    @classmethod
    def of(cls, ablation: Ablation, directory: str) -> "CellPlan":
        runs = {run.run_id: run for run in ablation.runs}
        plan = cls(base=ablation.base, directory=directory, runs=runs, data_keys={}, checkpoint_every=ablation.execution.checkpoint.every,
                   threads=max(1, int(ablation.execution.resources.cpu)))
        plan.data_keys.update({run_id: data_key(plan.run_config(run)) for run_id, run in runs.items()})
        return plan

    def run_config(self, run: Run) -> Any:
        return build_run_config(with_threads(apply_point(self.base, run.point), self.threads))


def run_dir(directory: str, run_id: str) -> Path:
    return Path(directory) / RUNS_DIR / run_id


def read_result(directory: str, run_id: str) -> dict[str, Any] | None:
    """The run's result.json, or None while it has not ended."""
    path = run_dir(directory, run_id) / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def data_key(config: Any) -> str:
    """Runs whose data sections agree share one dataset (built once on the driver)."""
    from ltsearch.config import to_dict

    return json.dumps(to_dict(config.data), sort_keys=True)


def train_cell(config: dict, plan: CellPlan, datasets: dict[str, Any] | None = None, sharing: PrefixSharing | None = None) -> None:
    """Ray Tune function trainable for one run: resumes from its own checkpoint, reports every epoch.

    A new run whose rows agree with others until the method's start epoch forks their shared prefix
    (`sharing`); the prefix's epochs are reported first, marked `prefix/shared`, as if it had trained them.
    """
    import ray

    from ltsearch.checkpoints import CHECKPOINT_FILE
    from ltsearch.engine import Trainer, method_start_epoch, summarize

    run = plan.runs[config[RUN_KEY]]
    run_config = plan.run_config(run)
    where = run_dir(plan.directory, run.run_id)
    data = ray.get(datasets[plan.data_keys[run.run_id]]) if datasets else None
    pin_run_data(data, where)  # the driver's fingerprints, and the ones this run started on (DataMismatch otherwise)
    started = time.time()
    replay: list[dict[str, Any]] = []
    if (where / CHECKPOINT_FILE).is_file():
        trainer = Trainer.restore(where, data=data, config=run_config)
    else:
        where.mkdir(parents=True, exist_ok=True)
        (where / "config.yaml").write_text(dump_yaml(run_config))
        try:
            trainer, _ = start_trainer(run_config, sharing, data)
        except TrainingDiverged as error:  # the shared prefix diverged: so would this run, from scratch
            write_json({"status": "error", "error": str(error), "epochs": 0, "seconds": time.time() - started}, where / RESULT_FILE)
            return
        replay = list(trainer.history)
    counts = trainer.class_counts.tolist()
    epochs = run_config.train.epochs
    for row in replay:
        tune.report({**scalars(row), EPOCHS: row["epoch"] + 1, PER_CLASS: row.get(PER_CLASS), CLASS_COUNTS: counts,
                     PREFIX_KEY: row.get(PREFIX_KEY)})
    try:
        for result in trainer.run():
            if (result.epoch + 1) % plan.checkpoint_every == 0 or result.epoch + 1 == epochs:
                result.save_checkpoint(where)
            write_table(trainer.history, where / "history.parquet")
            tune.report({**result.scalars(), EPOCHS: result.epoch + 1, PER_CLASS: result.metrics.get(PER_CLASS), CLASS_COUNTS: counts})
    except TrainingDiverged as error:
        write_json({"status": "error", "error": str(error), "epochs": trainer.epoch, "seconds": time.time() - started}, where / RESULT_FILE)
        return
    summary = summarize(trainer)
    write_json({"status": "completed", "epochs": trainer.epoch, "best_epoch": summary["best_epoch"], "select_metric": summary["select_metric"],
                "select_epochs": run_config.train.select_epochs, "method_start": method_start_epoch(run_config),
                "metrics": summary["best"], "legacy/best_test_top1": summary["legacy/best_test_top1"], CLASS_COUNTS: counts, "seconds": time.time() - started},
               where / RESULT_FILE)
