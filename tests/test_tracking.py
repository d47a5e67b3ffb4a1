"""Tracking in a real sqlite MLflow store: the writer, the recorder and `ltsearch train`'s run.

Sweeps (parent/child runs through Ray Tune) are in test_tracking_sweep.py.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ltsearch.cli import main
from ltsearch.errors import ConfigError
from ltsearch.tracking import record
from ltsearch.tracking.settings import TrackingConfig, parse_tracking, resolve_uri, split_tracking
from ltsearch.tracking.store import Tracker


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# ------------------------------------------------------------------------------------------ settings
def test_tracking_section_is_split_off_and_validated(tmp_path: Path) -> None:
    rest, tracking = split_tracking({"optim": {"lr": 0.1}, "tracking": {"uri": "http://10.0.0.1:5000", "experiment": "x"}})
    assert rest == {"optim": {"lr": 0.1}} and tracking.uri == "http://10.0.0.1:5000" and tracking.experiment == "x"
    assert resolve_uri("sqlite:///mlruns.db", tmp_path) == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert TrackingConfig(uri="sqlite:///a/b.db").artifact_root(tmp_path) is not None
    for bad, key in (({"uri": "ftp://x"}, "tracking.uri"), ({"enabled": "yes"}, "tracking.enabled"), ({"urI": "x"}, "tracking.urI"),
                     ({"experiment": ""}, "tracking.experiment"), ("sqlite:///x", "tracking")):
        with pytest.raises(ConfigError) as caught:
            parse_tracking(bad, source="f.yaml")
        assert caught.value.key == key and "f.yaml" in str(caught.value)


def test_the_environment_uri_is_the_default_and_a_file_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert TrackingConfig().resolved_uri() == "http://127.0.0.1:5999"
    assert TrackingConfig(uri="sqlite:////tmp/x.db").resolved_uri() == "sqlite:////tmp/x.db"


# ------------------------------------------------------------------------------------------- writer
def test_runs_are_found_by_tags_and_no_step_is_written_twice(mlflow_store: str) -> None:
    first = Tracker(TrackingConfig(), "exp")
    first.open_run("parent", name="sweep", find={"ltsearch.kind": "sweep", "ltsearch.dir": "/d"}, params={"a.b": 1})
    first.open_run("t1", name="child", find={"ltsearch.trial_id": "t1"}, parent="parent", params={"lr": 0.1})
    for epoch in range(3):
        first.log_metrics("t1", epoch, {"train/loss": 1.0 / (epoch + 1), "val/top1": 10.0 * epoch})
    first.close_run("t1", "KILLED")
    assert first.close() == []
    # a second process (a resumed sweep) continues the same runs: epoch 2 again is skipped, epoch 3 is new
    second = Tracker(TrackingConfig(), "exp")
    second.open_run("parent", name="sweep", find={"ltsearch.kind": "sweep", "ltsearch.dir": "/d"})
    second.open_run("t1", name="child", find={"ltsearch.trial_id": "t1"}, parent="parent", reopen=True)
    second.log_metrics("t1", 2, {"train/loss": 99.0})
    second.log_metrics("t1", 3, {"train/loss": 0.2})
    second.log_summary("t1", 3, {"best/val/top1": 20.0})
    second.log_summary("t1", 3, {"best/val/top1": 20.0})
    second.close_run("t1", "FINISHED")
    assert second.close() == []
    runs = _runs(mlflow_store)
    assert sorted(r.info.run_name for r in runs) == ["child", "sweep"]
    child = next(r for r in runs if r.info.run_name == "child")
    assert child.info.status == "FINISHED" and child.data.params == {"lr": "0.1"}
    assert child.data.tags["mlflow.parentRunId"] == next(r for r in runs if r.info.run_name == "sweep").info.run_id
    client = MlflowClient(mlflow_store)
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "train/loss")] == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.2)]
    assert len(client.get_metric_history(child.info.run_id, "best/val/top1")) == 1


def test_epoch_rows_of_runs_trained_at_once_share_requests_and_every_step_arrives(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows queued within batch_s go in one log_batch per run (two runs interleaved); a status is never written before
    the rows queued ahead of it; flush() does not wait out the batching delay."""
    requests: list[list[int]] = []
    real = MlflowClient.log_batch

    def counted(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            requests.append(sorted({m.step for m in metrics}))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    tracker = Tracker(TrackingConfig(), "exp", batch_s=30.0)
    for key in ("a", "b"):
        tracker.open_run(key, name=key, find={"ltsearch.trial_id": key})
    assert tracker.flush(30)
    started = time.monotonic()
    for epoch in range(6):
        for key in ("a", "b"):
            tracker.log_metrics(key, epoch, {"train/loss": float(epoch), "val/top1": 10.0 + epoch})
    tracker.close_run("a", "FINISHED")
    tracker.log_metrics("b", 6, {"train/loss": 6.0})
    assert tracker.flush(30) and time.monotonic() - started < 10, "flush writes at once, it does not wait out batch_s"
    assert tracker.close() == []
    assert requests == [list(range(6)), list(range(6)), [6]], "one request per run for the rows before the status, then the rest"
    client = MlflowClient(mlflow_store)
    for run in _runs(mlflow_store):
        expected = 7 if run.info.run_name == "b" else 6
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(expected))
    assert {r.info.run_name: r.info.status for r in _runs(mlflow_store)}["a"] == "FINISHED"


def test_a_step_reported_twice_in_one_batch_is_written_once_with_its_last_values(mlflow_store: str) -> None:
    """PBT: an exploited trial re-runs an epoch from another trial's checkpoint and reports that epoch again, often
    within the batching delay of its first report; MLflow must still hold one value per step (the sweep's files
    keep the last report)."""
    tracker = Tracker(TrackingConfig(), "exp", batch_s=30.0)
    tracker.open_run("t", name="t", find={"ltsearch.trial_id": "t"})
    for step, loss in ((0, 1.0), (1, 0.9), (2, 0.8), (2, 0.7), (3, 0.6)):
        tracker.log_metrics("t", step, {"train/loss": loss})
    assert tracker.close() == []
    (run,) = _runs(mlflow_store)
    history = MlflowClient(mlflow_store).get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.9), (2, 0.7), (3, 0.6)]


def test_an_unreachable_store_never_blocks_and_lists_what_was_not_written(capsys: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Queueing never waits on the store, shown without a stopwatch: a server that takes the writer's first request
    and does not answer holds that request for as long as the test likes, and all 20 epochs are queued meanwhile.
    Then the server goes away (the port is closed) and every write is reported as not written."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # the held request is not given up while the test runs
    asked, released, queued = threading.Event(), threading.Event(), threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # hold the request until released, then hang up without an answer
            asked.set()
            released.wait()
            self.close_connection = True

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def queue() -> None:
        for epoch in range(20):
            tracker.log_metrics("run", epoch, {"train/loss": 1.0})
        queued.set()

    try:
        tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{server.server_address[1]}"), "exp", retry_s=0.5)
        tracker.open_run("run", name="r", find={"ltsearch.kind": "train"})
        assert asked.wait(120), "the writer never sent its first request"
        threading.Thread(target=queue, daemon=True).start()
        # a writer that made callers wait would keep them waiting until the held request ends (the test ends it below)
        assert queued.wait(120), "queueing writes waited on the store"
    finally:
        released.set()
        server.shutdown()
        server.server_close()  # from here on the port refuses connections
    unwritten = record.finish(tracker, timeout_s=60.0)
    err = capsys.readouterr().err
    assert len(unwritten) == 21 and unwritten[0] == "open run 'r'"
    assert err.count("cannot reach") == 1 and "21 write(s) did not reach" in err


def test_epoch_metrics_keep_ours_and_drop_ray_bookkeeping() -> None:
    row = {"epoch": 3, "train/loss": 0.5, "val/top1": 50.0, "val/num_few": 2, "aug/omega": 1.2, "lr": 0.1, "images_per_s": 900.0,
           "time_this_iter_s": 1.0, "training_iteration": 4, "test/per_class": [1.0, None], "node_id": "x", "epochs": 4,
           "train/aux": float("nan")}
    assert record.epoch_metrics(row) == {"train/loss": 0.5, "val/top1": 50.0, "aug/omega": 1.2, "lr": 0.1, "images_per_s": 900.0}
    assert record.run_name({"augmenter": {"name": "smart"}, "loss": {"name": "ldam"}},
                           {"augmenter.smart.tau": 0.31234, "optim.lr": 0.05}) == "smart+ldam tau=0.312 lr=0.05"
    assert record.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


# ------------------------------------------------------------------------------------------- train
def test_train_is_one_finished_run_with_params_metrics_and_artifacts(tmp_path: Path, mlflow_store: str) -> None:
    out = tmp_path / "run"
    assert main(["train", "--set", "train.epochs=2", "train.seed=0", "--out", str(out), "--quiet"]) == 0
    (run,) = _runs(mlflow_store)
    client = MlflowClient(mlflow_store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["ltsearch.kind"] == "train" and run.data.tags["ltsearch.dir"] == str(out.resolve())
    assert run.data.params["optim.lr"] == "0.1" and "augmenter.smart.tau" not in run.data.params  # only the active method's section
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [0, 1]
    selected = int(run.data.tags["ltsearch.selected_epoch"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/top1")}
    assert run.data.metrics["best/test/top1"] == pytest.approx(history[selected])
    assert not any(key.startswith(("time_", "training_iteration")) for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class_accuracy.png", "config.yaml", "metrics.json"} <= artifacts
    png = Path(client.download_artifacts(run.info.run_id, "per_class_accuracy.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_resumed_continues_its_run_and_a_disabled_tracker_writes_nothing(tmp_path: Path, mlflow_store: str) -> None:
    out = tmp_path / "run"
    assert main(["train", "--set", "train.epochs=1", "--out", str(out), "--quiet"]) == 0
    assert main(["train", "--resume", str(out), "--set", "train.epochs=2", "--quiet"]) == 0
    (run,) = _runs(mlflow_store)
    assert run.info.status == "FINISHED" and run.data.tags["ltsearch.epochs"] == "2"
    assert [m.step for m in MlflowClient(mlflow_store).get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    off = tmp_path / "off"
    assert main(["train", "--set", "train.epochs=1", "tracking.enabled=false", "tracking.uri=sqlite:///" + str(tmp_path / "other.db"),
                 "--out", str(off), "--quiet"]) == 0
    assert not (tmp_path / "other.db").exists()


def test_train_goes_on_when_the_store_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--set", "train.epochs=1", f"tracking.uri=http://127.0.0.1:{_closed_port()}", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert (out / "metrics.json").is_file()
    assert captured.err.count("cannot reach") == 1 and "did not reach" in captured.err
    assert "tracked in MLflow" not in captured.out


def test_a_bad_tracking_value_is_exit_2_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--set", "tracking.uri=ftp://host/x", "--out", str(out)]) == 2
    assert "tracking.uri" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_writes_queued_while_the_server_is_down_arrive_when_it_is_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real `mlflow server` stopped mid-run and started again: nothing logged in between is lost."""
    from ltsearch.tracking import server

    port = _closed_port()
    store = TrackingConfig(uri=f"sqlite:///{tmp_path / 'store.db'}")
    command = server.server_command(store, server.LOOPBACK, port)
    health = server.health_url(server.LOOPBACK, port)
    first = server.MlflowServer(command, health)
    first.start()
    try:
        first.wait_ready()
        tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{port}"), "exp", retry_s=0.5)
        tracker.open_run("run", name="r", find={"ltsearch.kind": "train"})
        tracker.log_metrics("run", 0, {"train/loss": 1.0})
        assert tracker.flush(60)
    finally:
        first.stop()
    for epoch in (1, 2, 3):  # the server is down: queued, retried, training is not held up
        tracker.log_metrics("run", epoch, {"train/loss": 1.0 / (epoch + 1)})
    tracker.close_run("run", "FINISHED")
    assert not tracker.flush(2.0)
    second = server.MlflowServer(command, health)
    second.start()
    try:
        second.wait_ready()
        assert record.finish(tracker, timeout_s=60) == []
        client = MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3]
    finally:
        second.stop()
    err = capsys.readouterr().err
    assert err.count("cannot reach") == 1 and "reachable again" in err
