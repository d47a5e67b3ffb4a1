"""Multi-objective sweeps on a real local Ray runtime with real Optuna samplers and a real MLflow store (digits).

Bad input is refused before anything starts; a two-objective sweep's front equals a brute-force non-domination
check over the trials it stored, each front point reruns with `ltsearch train` to its own numbers, and a sweep
interrupted after its first trial and resumed keeps every trial in its front.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from ltsearch.cli import main
from ltsearch.results import read_table
from ltsearch.tune import load_sweep, resume_sweep, run_sweep
from ltsearch.tune.algorithms import SCHEDULERS, SchedulerContext, make_sampler
from ltsearch.tune.objectives import Objective, non_dominated, parse_objective

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
TWO = ["metric=[val/top1, val/few]", "mode=[max, max]"]
SMALL = ["train.epochs=3", "search.max_concurrent=2", "checkpoint.every=1", "space.model.width={choice: [16, 24]}",
         "data.max_train_per_class=40"]


def brute_front(trials: list[dict], metrics: list[str]) -> set[str]:
    """Completed trials that no other completed trial beats on one objective while matching it on all (both maximised)."""
    done = [t for t in trials if t["status"] == "completed"]
    front = set()
    for t in done:
        a = [t[f"best/{m}"] for m in metrics]
        beaten = any(all(o[f"best/{m}"] >= x for m, x in zip(metrics, a)) and any(o[f"best/{m}"] > x for m, x in zip(metrics, a))
                     for o in done if o is not t)
        if not beaten:
            front.add(t["trial_id"])
    return front


# ======================================================================================== no Ray runtime
@pytest.mark.parametrize("overrides, key", [
    (["metric=[val/top1, val/few]", "mode=[max]"], "mode"),
    (["metric=[val/top1, val/few]", "mode=max"], "mode"),
    (["metric=[val/top1, test/few]", "mode=[max, max]"], "metric"),
    ([*TWO, "scheduler.metric=val/bacc"], "scheduler.metric"),
    ([*TWO, "search.sampler=random", "scheduler={name: pbt}"], "scheduler.name"),
    ([*TWO, "search.sampler=cmaes"], "search.sampler"),
    ([*TWO, "scheduler={name: fifo, metric: val/few}"], "scheduler.metric"),
    (["metric=[val/top1, val/many]", "mode=[max, max]", "data.max_train_per_class=40"], "metric"),  # no many-shot class left
])
def test_bad_objectives_are_exit_2_with_one_line_and_nothing_started(tmp_path, capsys, mlflow_store, overrides, key):
    out = tmp_path / "sweep"
    assert main(["tune", str(QUICKSTART), "--out", str(out), "--set", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ltsearch tune: error: ") and f"config key '{key}'" in err, err
    assert not out.exists() and not Path(mlflow_store.removeprefix("sqlite:///")).exists()
    assert not ray.is_initialized()


@pytest.mark.cifar
def test_few_shot_on_cifar10_lt_is_refused_naming_the_groups_it_has(cifar_root, tmp_path, capsys, mlflow_store):
    """CIFAR-10-LT at rho = 100 keeps >= 50 images per class: no few-shot class, so the shipped file searches val/medium."""
    out = tmp_path / "sweep"
    assert main(["tune", str(REPO / "search_spaces" / "smart_pareto.yaml"), "--out", str(out), "--set", f"data.root={cifar_root}",
                 "metric=[val/top1, val/few]", "resources={cpu: 1, gpu: 0}"]) == 2
    err = capsys.readouterr().err
    assert "config key 'metric': got 'val/few'" in err and "many 8, medium 2, few 0" in err and err.count("\n") == 1
    assert not out.exists() and not ray.is_initialized()


def test_the_shipped_pareto_files_are_valid(capsys):
    for path in (REPO / "search_spaces" / "smart_pareto.yaml", REPO / "search_spaces" / "examples" / "digits_pareto.yaml"):
        assert path.read_text().startswith(f"# ltsearch tune search_spaces/{path.relative_to(REPO / 'search_spaces')}")
        assert main(["check", str(path)]) == 0
        assert "objectives: val/top1 (max), val/" in capsys.readouterr().out


def test_the_first_objective_is_judged_unless_scheduler_metric_names_another(capsys):
    assert main(["check", str(QUICKSTART), "--set", *TWO]) == 0
    assert "scheduler asha judges: val/top1 (max), the first objective (scheduler.metric chooses another)" in capsys.readouterr().out
    sweep = load_sweep(QUICKSTART, [*TWO, "scheduler.metric=val/few"])
    assert sweep.judged == ("val/few", "max")
    asha = SCHEDULERS.get("asha").obj(sweep.scheduler.params, SchedulerContext(sweep.max_active_epochs, sweep.space, *sweep.judged))
    assert (asha._metric, asha._mode) == ("val/few", "max")


def test_objectives_parse_single_and_several_and_dominance_keeps_ties():
    assert parse_objective({}) == Objective("val/top1", "max") and not parse_objective({}).multi
    several = parse_objective({"metric": ["val/top1", "val/few"], "mode": ["max", "min"]})
    assert several.metrics == ("val/top1", "val/few") and several.signs() == (1.0, -1.0) and several.metric == "val/top1"
    points = [(90.0, 10.0), (80.0, 5.0), (90.0, 10.0), (85.0, 20.0), (95.0, 30.0)]
    assert non_dominated(points, several.signs()) == [0, 1, 2, 4]  # (85, 20) is beaten by (90, 10); equal points keep each other


def test_nsgaii_survives_the_pickling_ray_tune_does_for_resume():
    """Tune pickles the searcher into every experiment checkpoint; Optuna's NSGA-II holds a lock that cannot be pickled."""
    import pickle

    import optuna

    sampler = pickle.loads(pickle.dumps(make_sampler("nsgaii", 0, 4)))
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.suggest_float("y", 0, 1)), n_trials=10)
    assert sampler.population_size == 4 and len(study.best_trials) >= 1


# ========================================================================================= real Ray
def test_two_objective_sweep_writes_its_front_and_a_front_point_reruns_to_its_values(ray_runtime, tmp_path, mlflow_store, capsys):
    stream = io.StringIO()
    outcome = run_sweep(load_sweep(QUICKSTART, [*SMALL, *TWO, "train.epochs=4", "search.sampler=nsgaii", "search.population_size=4",
                                                "search.num_samples=10", "scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
                                                "scheduler.metric=val/few"]),
                        directory=str(tmp_path / "sweep"), stream=stream, progress_interval_s=60)
    assert outcome.finished
    directory = tmp_path / "sweep"
    trials = read_table(directory / "trials.parquet")
    expected = brute_front(trials, ["val/top1", "val/few"])
    points = read_table(directory / "pareto.parquet")
    assert expected and {p["trial_id"] for p in points} == expected
    assert {t["trial_id"] for t in trials if t["pareto"]} == expected
    assert [p["best/val/top1"] for p in points] == sorted((p["best/val/top1"] for p in points), reverse=True)
    assert sorted(p.name for p in (directory / "pareto").iterdir()) == [f"{i:02d}.yaml" for i in range(1, len(points) + 1)]
    assert (directory / "pareto.png").stat().st_size > 10_000
    log = stream.getvalue()
    assert f"Pareto front: {len(points)} of {sum(t['status'] == 'completed' for t in trials)} completed trials" in log
    assert all(p["trial_id"] in log for p in points)

    point = points[0]
    assert main(["train", str(directory / point["file"]), "--out", str(tmp_path / "rerun"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "rerun" / "metrics.json").read_text())
    assert summary["best_epoch"] == point["best_epoch"]
    assert {k: summary["best"][k] for k in ("val/top1", "val/few", "test/top1", "test/few")} == \
        {k: point[f"best/{k}"] for k in ("val/top1", "val/few", "test/top1", "test/few")}

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["ltsearch.kind"] == "sweep"]
    assert parent.data.tags["ltsearch.objectives"] == "val/top1 (max), val/few (max)"
    assert parent.data.tags["ltsearch.scheduler_metric"] == "val/few"
    artifacts = {"pareto.png", "pareto.parquet", "pareto.json", "importance.png", "importance.md", "importance.json"}
    assert artifacts <= {a.path for a in client.list_artifacts(parent.info.run_id)}  # 10 finished trials: importance in the summary
    assert "**Parameter importance, quickstart: 10 finished trials" in log
    tagged = {r.data.tags["ltsearch.trial_id"] for r in runs if r.data.tags.get("ltsearch.pareto") == "true"}
    assert tagged == expected

    assert main(["report", str(directory), "--importance"]) == 0  # the same, again, from the stored trials: logged to the same run
    assert f"to the sweep run {parent.info.run_id}" in capsys.readouterr().out


class InterruptAfterFirstTrial(tune.Callback):
    """Sends this process SIGINT (Ctrl-C) when the first trial completes; Tune then saves the experiment and stops.

    Once only, marked on disk: Tune restores its callbacks from the state saved before the signal."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_an_interrupted_multi_objective_sweep_resumes_and_keeps_its_front(ray_runtime, tmp_path, mlflow_store):
    directory = tmp_path / "sweep"
    first = run_sweep(load_sweep(QUICKSTART, [*SMALL, *TWO, "search.sampler=tpe", "search.num_samples=6", "scheduler={name: fifo}"]),
                      directory=str(directory), stream=io.StringIO(), progress_interval_s=60, callbacks=[InterruptAfterFirstTrial(tmp_path / "interrupted")])
    assert not first.finished and not (directory / "pareto.parquet").exists()
    done_before = {t["trial_id"]: t for t in first.trials if t["status"] == "completed"}
    assert done_before

    resumed = resume_sweep(str(directory), stream=io.StringIO())
    assert resumed.finished
    trials = read_table(directory / "trials.parquet")
    assert len(trials) == 6 and {t["status"] for t in trials} == {"completed"}
    for trial_id, before in done_before.items():  # kept as they were, not run again
        after = next(t for t in trials if t["trial_id"] == trial_id)
        assert (after["best/val/top1"], after["best/val/few"]) == (before["best/val/top1"], before["best/val/few"])
    expected = brute_front(trials, ["val/top1", "val/few"])
    assert {p["trial_id"] for p in read_table(directory / "pareto.parquet")} == expected == {p["trial_id"] for p in resumed.front}
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(r.data.tags["ltsearch.kind"] for r in runs) == ["sweep"] + ["trial"] * 6  # the same runs, continued
    assert {r.data.tags["ltsearch.trial_id"] for r in runs if r.data.tags.get("ltsearch.pareto") == "true"} == expected
