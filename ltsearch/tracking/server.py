"""`mlflow server` as a child of `ltsearch ui`: its command line, the port check, the wait, the URLs, the shutdown.

The server runs as `sys.executable -m mlflow server` in a session (and so a process group) of its own: a
Ctrl-C in the terminal reaches only `ltsearch ui`, which then stops the whole group, uvicorn included,
and waits until no process of it is left. Its output goes to a log file, so the terminal keeps the URLs
readable; the file is named at start, its end is shown when the server fails, and it is removed after a
clean stop.

MLflow 3 opens on its GenAI pages by default. The URLs printed carry `workflowType=machine_learning`,
which selects the classic "Model training" view: the runs table where a sweep is a parent row whose
trials are nested under it (collapsed behind its expander; the UI keeps that state in the browser, not
in the URL), the same table filtered to one sweep's trials best first, and the sweep run's own page,
which lists its child runs.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode

from ltsearch.errors import ConfigError, LtsearchError
from ltsearch.tracking.names import mlflow_key
from ltsearch.tracking.settings import TrackingConfig
from ltsearch.tracking.views import VIEW_PARAM

DEFAULT_PORT = 5000
LOOPBACK = "127.0.0.1"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
#: one uvicorn worker: a UI for one person; every extra worker is another full MLflow import at start
WORKERS = 1
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20
#: the classic training-runs view; without it MLflow 3 shows its GenAI (traces, evaluation) pages
WORKFLOW = {"workflowType": "machine_learning"}
#: MLflow's job runner (GenAI scorers, evaluation jobs) starts a dozen processes and delays both start and
#: stop by seconds; browsing training runs never uses it. A value the user set still wins.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServerError(LtsearchError):
    """`mlflow server` exited, or did not answer, before the UI was up (the message ends with its log)."""


def server_command(settings: TrackingConfig, host: str, port: int, cwd: Path | None = None) -> list[str]:
    """The `mlflow server` command line for this store.

    For a local store the artifact root is the `mlartifacts/` folder the runs were logged to (file:// URIs):
    MLflow serves such artifacts by reading them itself, so plots show in the UI. The same folder is the
    destination of proxied `mlflow-artifacts:` URIs, instead of an `mlartifacts/` in whatever directory
    the command happens to run in.
    """
    uri = backend_uri(settings, cwd)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", str(WORKERS)]
    artifacts = settings.artifact_root(cwd)
    if artifacts is not None:
        command += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    if not is_loopback(host):
        command += ["--allowed-hosts", allowed_hosts(host)]
    return command


def backend_uri(settings: TrackingConfig, cwd: Path | None = None) -> str:
    """The store as a backend for `mlflow server`: a tracking server cannot be one; it already has its UI."""
    uri = settings.resolved_uri(cwd)
    if uri.split("://", 1)[0] in ("http", "https", "databricks", "databricks-uc"):
        raise ConfigError("tracking.uri", uri, "a local store or a database that `ltsearch ui` can serve",
                          hint=f"This store is already served by a tracking server: open {uri} in a browser.")
    return uri


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def allowed_hosts(host: str) -> str:
    """Host headers to accept when bound beyond loopback.

    MLflow 3 rejects any Host header outside localhost and private IP ranges (its DNS-rebinding guard), so a
    browser that reaches the machine by name would get "Invalid Host header". This adds the machine's names
    and the address given to MLflow's own defaults; nothing is accepted wholesale.
    """
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {socket.gethostname(), socket.getfqdn()} | ({host} if host not in WILDCARD_HOSTS else set())
    extra = [f"{_url_host(name)}{suffix}" for name in sorted(names) for suffix in ("", ":*")]
    return ",".join(dict.fromkeys([*get_default_allowed_hosts(), *extra]))


def check_port(host: str, port: int) -> None:
    """Fail before anything starts when the port is taken (mlflow would die later with a less clear message).

    SO_REUSEADDR as uvicorn sets it: a port left in TIME_WAIT by a previous server is free for it.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError("--host", host, f"an address or host name of this machine ({error.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ConfigError("--port", port, f"a free port; {port} is already in use on {host}",
                                      hint=f"Another `ltsearch ui` or MLflow server may hold it: choose another, e.g. --port {port + 1}.") from None
                raise ConfigError("--host", host, f"an address this machine can listen on ({error.strerror})") from None


def browser_host(host: str) -> str:
    """The host to put in URLs: this machine's name when listening on all interfaces, else the host given."""
    return socket.getfqdn() if host in WILDCARD_HOSTS else host


def base_url(host: str, port: int) -> str:
    return f"http://{_url_host(host)}:{port}"


def store_ui_base(settings: TrackingConfig) -> str:
    """Where a user opens the UI of this store without `ltsearch ui`'s own arguments: the tracking server itself when the
    store is one (http://host:5000), else where `ltsearch ui` listens by default."""
    uri = settings.resolved_uri()
    return uri.rstrip("/") if uri.split("://", 1)[0] in ("http", "https") else base_url(LOOPBACK, DEFAULT_PORT)


def ui_url(base: str, route: str, **query: str) -> str:
    """A page of the MLflow UI (hash routes) in the training-runs workflow."""
    return f"{base}/#{route}?{urlencode({**query, **WORKFLOW}, quote_via=quote)}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table: each sweep a parent row, its trials nested under it."""
    return ui_url(base, f"/experiments/{experiment_id}/runs")


def trials_url(base: str, experiment_id: str, parent_id: str, metric: str, mode: str) -> str:
    """The same table, only this parent's children, best first by its objective (sortable, with metric columns)."""
    return ui_url(base, f"/experiments/{experiment_id}/runs", searchFilter=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                  orderByKey=f"metrics.`{mlflow_key('best/' + metric)}`", orderByAsc="true" if mode == "min" else "false")


def view_url(base: str, experiment_id: str, view: str) -> str:
    """The runs table opened on a saved view (views.py): its filter, sort, columns and group-by, kept on the server."""
    return ui_url(base, f"/experiments/{experiment_id}/runs", **{VIEW_PARAM: view})


def compare_url(base: str, experiment_ids: list[str], run_ids: list[str]) -> str:
    """MLflow's compare-runs page for these runs: parallel coordinates of params against metrics, scatter and contour
    plots, and their params and metrics side by side. The lists are JSON, as the UI's own links write them."""
    return ui_url(base, "/compare-runs", runs=json.dumps(run_ids, separators=(",", ":")),
                  experiments=json.dumps(sorted(set(experiment_ids)), separators=(",", ":")))


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (a sweep's lists its child runs; a trial's Artifacts tab shows its plots)."""
    return ui_url(base, f"/experiments/{experiment_id}/runs/{run_id}")


class MlflowServer:
    """One `mlflow server` process group, started, waited for and stopped by `ltsearch ui`."""

    def __init__(self, command: list[str], health_url: str):
        self.command = command
        self.health_url = health_url
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        handle, name = tempfile.mkstemp(prefix="ltsearch-ui-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(handle, "wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={**SERVER_ENV, **os.environ}, start_new_session=True)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll /health until it answers; an early exit or the timeout raises ServerError with the log's end."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while not _answers(self.health_url):
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"mlflow server exited with code {code} before answering on {self.health_url}; {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"mlflow server did not answer on {self.health_url} within {timeout_s:.0f} s; {self.log_tail()}")
            time.sleep(0.25)

    def wait(self) -> int:
        """Block until the server exits by itself (it should not); its exit code."""
        assert self.process is not None, "start() first"
        return self.process.wait()

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after STOP_TIMEOUT_S; returns when none of it runs.

        Signals are ignored meanwhile, so a second Ctrl-C cannot cut the cleanup short and leave workers behind.
        """
        if self.process is None:
            return
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            group = self.process.pid
            for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
                if not group_pids(group):
                    break
                _signal_group(group, sig)
                deadline = time.monotonic() + wait_s
                while group_pids(group) and time.monotonic() < deadline:
                    self.process.poll()  # reap the leader as soon as it exits: a zombie would still count
                    time.sleep(0.1)
            self.process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.process.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self) -> str:
        """The last lines of the server's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return "it wrote no log"
        lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"the end of its log ({self.log_path}):\n" + "\n".join(f"  {line}" for line in lines)


def group_pids(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc; where there is no /proc, whether any signal reaches it."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
            return [group]
        except ProcessLookupError:
            return []
    pids = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited while being listed
            if int(fields[2]) == group and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, systemd, a CI runner) and SIGINT stop the UI through the same cleanup.

    SIGINT is installed explicitly too: a process started in the background by a non-interactive shell
    inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt for it.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def health_url(host: str, port: int) -> str:
    """Where this machine asks whether the server is up: loopback when it listens on every interface."""
    return f"{base_url(LOOPBACK if host in WILDCARD_HOSTS else host, port)}/health"


def _answers(url: str) -> bool:
    """True once GET url returns 200; proxies from the environment are bypassed (this is a local server)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
