"""`ltsearch ui` end to end: a real `mlflow server` on a real store, looked at with headless Chromium.

The store is the one tests/test_runs.py builds (a sweep with nested trials, each with a logged
per-class plot). The UI is started as a user starts it, as a subprocess, and stopped with SIGINT or
SIGTERM; afterwards no process of the server may remain and the port must be free again.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from _chromium import CHROMIUM, dump_dom
from test_runs import Store, make_store

from ltsearch.cli import main
from ltsearch.tracking import server

pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (.ci/run installs Debian's chromium)")
REPO = Path(__file__).resolve().parents[1]
READY_S = 150  # mlflow imports and migrates on start: seconds on a loaded 2-core runner
STOP_S = 40
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is local: never via a proxy


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(tmp_path_factory.mktemp("ui-store"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((server.LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass
class UiProcess:
    """A running `ltsearch ui` with its stdout and stderr read line by line by background threads."""

    process: subprocess.Popen
    out: queue.Queue
    err: list[str]

    def wait_for(self, pattern: str, timeout_s: float = READY_S) -> re.Match:
        """The first stdout line matching `pattern`; the lines before it are consumed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None and self.out.empty():
                    break
                continue
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} from ltsearch ui (exit {self.process.poll()}); stderr: {''.join(self.err)}")


def start_ui(*args: str, cwd: Path) -> UiProcess:
    process = subprocess.Popen([sys.executable, "-m", "ltsearch.cli", "ui", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    out: queue.Queue = queue.Queue()
    err: list[str] = []
    threading.Thread(target=lambda: [out.put(line) for line in process.stdout], daemon=True).start()
    threading.Thread(target=lambda: [err.append(line) for line in process.stderr], daemon=True).start()
    return UiProcess(process, out, err)


def processes_on(port: int) -> list[tuple[int, int]]:
    """Live processes (pid, pgid) started for this port, from `ps` (zombies do not count: they run nothing)."""
    listing = subprocess.run(["ps", "-eww", "-o", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        pid, pgid, stat, command = line.split(None, 3)
        if f"--port {port}" in command and ("mlflow" in command or "uvicorn" in command) and not stat.startswith("Z"):
            found.append((int(pid), int(pgid)))
    return found


def cleanup(ui: UiProcess, port: int) -> None:
    """After a failed test too: stop `ltsearch ui` as a user would, and kill any server group it left behind."""
    if ui.process.poll() is None:
        ui.process.send_signal(signal.SIGTERM)
        try:
            ui.process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            ui.process.kill()
    for group in {pgid for _, pgid in processes_on(port)}:
        os.killpg(group, signal.SIGKILL)


def stop(ui: UiProcess, sig: signal.Signals, port: int) -> None:
    """Send `sig`, then check the exit code, that nothing of the server is left and that the port is free."""
    started = processes_on(port)
    assert started, "the mlflow server processes were not found before stopping"
    groups = {pgid for _, pgid in started}
    assert ui.process.pid not in groups, "the server must run in its own process group"
    ui.process.send_signal(sig)
    assert ui.process.wait(timeout=STOP_S) == 0, "".join(ui.err)
    assert processes_on(port) == []
    assert all(server.group_pids(group) == [] for group in groups)
    server.check_port(server.LOOPBACK, port)  # raises if anything still listens


@needs_chromium
def test_ui_shows_the_sweep_its_trials_and_their_plots(store: Store, tmp_path: Path) -> None:
    port = free_port()
    ui = start_ui("--port", str(port), "--set", f"tracking.uri={store.uri}", cwd=tmp_path)
    try:
        runs_url = ui.wait_for(r"^  runs:\s+(\S+)").group(1)
        trials_url = ui.wait_for(r"^  trials:\s+(\S+)").group(1)
        run_url = ui.wait_for(r"^  run:\s+(\S+)").group(1)
        base = f"http://127.0.0.1:{port}"
        assert runs_url == f"{base}/#/experiments/{store.experiment_id}/runs?workflowType=machine_learning"
        assert run_url == f"{base}/#/experiments/{store.experiment_id}/runs/{store.sweep_id}?workflowType=machine_learning"

        # the experiment's runs table, model-training view: the sweep is a parent row (its trials fold under it)
        dom = dump_dom(runs_url, expect=(store.sweep_name,), screenshot_path=tmp_path / "runs.png")
        assert store.sweep_name in dom and f'href="#/experiments/{store.experiment_id}/runs/{store.sweep_id}"' in dom
        assert store.old_sweep_name in dom

        # the sweep's trials, best first
        names = list(store.children)
        dom = dump_dom(trials_url, expect=tuple(names), screenshot_path=tmp_path / "ui.png")
        assert all(name in dom for name in names)
        assert dom.index(names[0]) < dom.index(names[1]) < dom.index(names[2])  # best/val/top1 descending, failed last
        assert store.old_sweep_name not in dom

        # the sweep's own page lists its child runs
        dom = dump_dom(run_url, expect=tuple(names), screenshot_path=tmp_path / "sweep.png")
        assert store.sweep_name in dom and all(name in dom for name in names)

        # a trial's Artifacts tab shows the per-class plot, and the server hands out the very bytes logged
        child = store.children[names[0]]
        artifact_url = server.ui_url(base, f"/experiments/{store.experiment_id}/runs/{child}/artifacts/per_class_accuracy.png")
        dom = dump_dom(artifact_url, expect=('alt="per_class_accuracy.png"',), screenshot_path=tmp_path / "artifact.png")
        assert re.search(r'<img alt="per_class_accuracy\.png" src="blob:http://127\.0\.0\.1:\d+/', dom), "the plot is not shown"
        with LOCAL.open(f"{base}/get-artifact?path=per_class_accuracy.png&run_uuid={child}", timeout=30) as response:
            assert response.read() == store.plot
        assert all((tmp_path / name).stat().st_size > 10_000 for name in ("runs.png", "ui.png", "sweep.png", "artifact.png"))

        stop(ui, signal.SIGINT, port)
        assert "stopping MLflow" in "".join(ui.err)
    finally:
        cleanup(ui, port)


def test_host_beyond_loopback_warns_and_serves_this_machine_by_name(store: Store, tmp_path: Path) -> None:
    port = free_port()
    ui = start_ui("--host", "0.0.0.0", "--port", str(port), "--set", f"tracking.uri={store.uri}", cwd=tmp_path)
    try:
        ui.wait_for(r"^  run:\s+http://")
        warning = "".join(ui.err)
        assert "WARNING: --host 0.0.0.0" in warning and "NO authentication" in warning
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=1"
        by_name = urllib.request.Request(api, headers={"Host": f"{socket.getfqdn()}:{port}"})
        with LOCAL.open(by_name, timeout=30) as response:  # --allowed-hosts names this machine
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:  # and nothing else: MLflow's DNS-rebinding guard stays on
            LOCAL.open(urllib.request.Request(api, headers={"Host": "attacker.example.com"}), timeout=30)
        assert refused.value.code in (400, 403)
        stop(ui, signal.SIGTERM, port)
    finally:
        cleanup(ui, port)


def test_missing_store_is_exit_2_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "mlruns.db"
    port = free_port()
    assert main(["ui", "--port", str(port), "--set", f"tracking.uri=sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ltsearch ui: error:") and "tracking.uri" in err and str(missing) in err
    assert not missing.exists() and processes_on(port) == []


def test_taken_port_is_exit_2_naming_port(store: Store, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as holder:
        holder.bind((server.LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["ui", "--port", str(port), "--set", f"tracking.uri={store.uri}"]) == 2
    err = capsys.readouterr().err
    assert "--port" in err and f"{port} is already in use" in err
    assert processes_on(port) == []


def test_server_that_exits_early_is_one_error_with_the_end_of_its_log() -> None:
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "bogus://store", "--port", str(port)]
    mlflow = server.MlflowServer(command, server.health_url(server.LOOPBACK, port))
    mlflow.start()
    try:
        with pytest.raises(server.ServerError, match=r"exited with code 1 before answering on .*; the end of its log \(") as failed:
            mlflow.wait_ready(timeout_s=READY_S)
        assert "bogus://store" in str(failed.value)  # MLflow's own reason, from the log
    finally:
        mlflow.stop()
    assert mlflow.log_path is not None and mlflow.log_path.exists()  # kept: the message names it
    mlflow.log_path.unlink()
