"""A real digits sweep on a real local Ray runtime, tracked into a real sqlite MLflow store.

One sweep covers the three ends a trial can have: finished, stopped by ASHA, failed (a learning rate of
1e30 diverges in its first epoch). The store must mirror the sweep's own files exactly.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ltsearch.cli import main
from ltsearch.results import read_table
from ltsearch.tune import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
SWEEP = ["train.epochs=4", "search.max_concurrent=2", "search.sampler=random", "search.num_samples=5", "max_failures=0",
         "checkpoint.every=1", "optim.schedule.warmup_epochs=0", "loss.name=ce",
         "space={optim.lr: {grid: [0.05, 1.0e30]}, optim.weight_decay: {loguniform: [1.0e-5, 1.0e-2]}, model.width: {choice: [16]}}",
         "scheduler={name: asha, grace_period: 1, reduction_factor: 2}"]
RAY_FIELDS = ("time_this_iter_s", "time_total_s", "training_iteration", "timestamp", "pid", "iterations_since_restore", "epochs")

pytestmark = pytest.mark.slow


def _children(client: MlflowClient, parent) -> list:
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_a_sweep_is_one_parent_with_a_child_per_trial_and_every_status(ray_runtime, tmp_path, mlflow_store):
    stream = io.StringIO()
    outcome = run_sweep(load_sweep(QUICKSTART, SWEEP), directory=str(tmp_path / "sweep"), stream=stream, progress_interval_s=60)
    assert outcome.finished
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags["ltsearch.kind"] == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["ltsearch.dir"] == str(tmp_path / "sweep")
    assert parent.data.params["space.optim.lr.grid"] == "[0.05, 1e+30]" and parent.data.params["search.sampler"] == "random"
    assert {"ltsearch.git_commit", "ltsearch.version", "ltsearch.data.train_fingerprint", "ltsearch.scheduler"} <= set(parent.data.tags)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.yaml", "trials.parquet", "best.yaml", "search_plot.png"}
    assert f"parent run {parent.info.run_id}" in stream.getvalue() and "ltsearch ui" in stream.getvalue()

    children = {r.data.tags["ltsearch.trial_id"]: r for r in _children(client, parent)}
    trials = {row["trial_id"]: row for row in read_table(tmp_path / "sweep" / "trials.parquet")}
    assert set(children) == set(trials) and len(runs) == len(trials) + 1
    statuses = {row["status"] for row in trials.values()}
    assert {"completed", "stopped", "error"} <= statuses, statuses
    for trial_id, row in trials.items():
        run = children[trial_id]
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.run_name.startswith("ce lr=") and "weight_decay=" in run.info.run_name
        assert run.data.params["optim.lr"] == str(row["optim.lr"]) and run.data.params["train.epochs"] == "4"
        assert not any(key.startswith(RAY_FIELDS) for key in metrics)
        if row["status"] == "error":
            assert run.info.status == "FAILED" and "training diverged" in tags["ltsearch.error"]
            continue
        assert run.info.status == "FINISHED"
        assert (tags.get("ltsearch.stopped_early") == "true") == (row["status"] == "stopped")
        assert tags["ltsearch.epochs"] == str(row["epochs"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")]
        assert steps == list(range(row["epochs"])), "one value per epoch, at step = epoch, never twice"
        assert int(tags["ltsearch.selected_epoch"]) == row["best_epoch"]
        assert metrics["best/val/top1"] == pytest.approx(row["best/val/top1"])
        assert metrics["best/test/top1"] == pytest.approx(row["best/test/top1"])
        assert {"lr", "train/loss", "train/cls_loss", "images_per_s", "test/bacc"} <= set(metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"per_class_accuracy.png", "config.yaml"}


def test_an_unreachable_store_does_not_stop_the_sweep_and_is_replayed_later(ray_runtime, tmp_path, capsys, mlflow_store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = io.StringIO()
    outcome = run_sweep(load_sweep(QUICKSTART, ["train.epochs=1", "search.num_samples=2", "scheduler={name: fifo}",
                                                "space={model.width: {choice: [16]}}", f"tracking.uri=http://127.0.0.1:{port}"]),
                        directory=str(tmp_path / "sweep"), stream=stream, progress_interval_s=60)
    assert outcome.finished and all(t["status"] == "completed" for t in outcome.trials)
    told = capsys.readouterr().err + stream.getvalue()
    assert told.count("cannot reach") == 1 and "did not reach" in told
    assert "browse with: ltsearch ui" not in stream.getvalue()
    assert (tmp_path / "sweep" / "trials.parquet").is_file()
    # what never arrived is replayed from the sweep's own files, into a store that answers; twice changes nothing
    for _ in range(2):
        assert main(["runs", "--sync", str(tmp_path / "sweep"), "--set", f"tracking.uri={mlflow_store}"]) == 0
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(r.data.tags["ltsearch.kind"] for r in runs) == ["sweep", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        if run.data.tags["ltsearch.kind"] == "trial":
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [0]
