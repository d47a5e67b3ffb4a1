"""The MLflow writer: every write goes through one queue, written by one background thread.

Why a queue and a thread: the driver's Ray Tune event loop (and `ltsearch train`'s epoch loop) must never
wait on a tracking server. Epoch metrics are written in batches: an epoch's row waits up to `batch_s` in the
queue, and the rows its run queued meanwhile go with it in one request. A trial blocks in `tune.report` until the
driver has handled its result, and a write per epoch, made at that very moment, cost every report ~3 ms on a
2-core machine (benchmarks/RESULTS.md, platform.py); fewer, larger requests also suit a remote tracking server.
A write that fails because the store cannot be reached stays at the head of
the queue and is retried every `retry_s` seconds; the user is told once when the store goes away and once
when it is back. A write the store refuses for good (a bad value) is dropped and listed at the end.
`close()` waits a bounded time and returns what could not be written, so nothing is lost silently.

Runs are addressed by a logical key ("parent", a trial id). A key is bound to an MLflow run by its tags
(`open_run(find=...)`), never by a remembered id alone, so a resumed sweep finds and continues the runs
it created before the driver was killed instead of duplicating them. Metric steps already in the store
are read once per run and never written twice.

Every key leaves here through `_mapped` (names.py): a row named `+ RSG` becomes a param key MLflow accepts,
`rows.plus RSG.augmenter.name`, instead of costing the request it is in. A run whose keys had to change
carries its mapping (tag `ltsearch.names`, artifact `ltsearch_names.json`), and `close()` says so once.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ltsearch.tracking.names import NAMES_FILE, mlflow_keys, mlflow_run_name
from ltsearch.tracking.settings import TAG_NAMES, TrackingConfig
from ltsearch.tracking.warmup import open_client

#: the metric whose history says which epochs of a run are already logged (every epoch reports it)
STEP_MARKER = "train/loss"
PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
#: how long an epoch's metrics may wait for the next epochs' to share its request (`flush` and `close` do not wait)
BATCH_S = 1.0
#: MLflow error codes that mean "this write will never succeed"; anything else is treated as the store being away
PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                             "INVALID_STATE", "PERMISSION_DENIED"})


#: stores this process already said it cannot reach
_TOLD_AWAY: set[str] = set()


@dataclass(eq=False)  # a write is itself: written writes are removed from the queue by identity
class _Write:
    description: str
    apply: Callable[[], None]
    epoch: tuple[str, int, dict[str, float]] | None = None  # (key, step, values): one epoch's metrics, merged with the next
    queued: float = 0.0


class Tracker:
    """Driver-side run log for one command (a sweep, a train run, an ablation)."""

    def __init__(self, settings: TrackingConfig, experiment: str, *, stream: Any = None, retry_s: float = 5.0,
                 batch_s: float = BATCH_S):
        self.uri = settings.resolved_uri()
        self.artifact_root = settings.artifact_root()
        self.experiment_name = settings.experiment or experiment
        self.stream = stream
        self.retry_s = retry_s
        self.batch_s = batch_s
        self.run_ids: dict[str, str] = {}
        self.logged_steps: dict[str, set[int]] = {}
        self.latest: dict[str, dict[str, float]] = {}  # latest summary values found in the store, per key
        self.dropped: list[str] = []
        self.names: dict[str, dict[str, str]] = {}  # per key: the names its run holds under other keys (original -> MLflow)
        self.renamed: dict[str, str] = {}  # every name this process changed, for the line `close()` prints
        self._names_unsent: set[str] = set()  # keys whose run lacks part of its mapping
        self._created: set[str] = set()  # keys whose run this process created (and so still lacks params)
        self._queue: deque[_Write] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._flushing = 0  # callers waiting in flush(): epoch rows are written at once
        self._away_since: float | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._thread = threading.Thread(target=self._drain, name="ltsearch-tracking", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------- what callers queue
    def open_run(self, key: str, *, name: str, find: dict[str, str], tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None, parent: str | None = None, reopen: bool = False) -> None:
        """Bind `key` to the run whose tags match `find` (under `parent`'s run), creating it if there is none.

        `params` are written only when the run is created (MLflow params never change); `reopen` puts a
        found run back to RUNNING (a resumed trial continues it).
        """
        self._put(f"open run '{name}'", lambda: self._open(key, name, find, tags or {}, parent, reopen))
        if params:
            self._put(f"params of run '{name}'", lambda: self._batch(key, params=params) if key in self._created else None)

    def log_metrics(self, key: str, step: int, metrics: dict[str, float]) -> None:
        """One epoch's scalars, sent with the run's other rows queued within `batch_s` (one log_batch); a step already
        in the store is skipped."""
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._put(f"metrics of {key} at step {step}", lambda: self._epochs(key, [(step, values)]), epoch=(key, step, values))

    def log_summary(self, key: str, step: int, metrics: dict[str, float]) -> None:
        """Summary metrics (`best/*`): written unless the store already holds the same latest value."""
        if metrics:
            self._put(f"summary of {key}", lambda: self._summary(key, step, metrics))

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        if tags:
            self._put(f"tags of {key}", lambda: self._batch(key, tags=tags))

    def log_artifact(self, key: str, name: str, content: bytes | Callable[[], bytes | None]) -> None:
        """Queue a file's bytes (copied now, so the caller may delete its file at once), or a function that
        renders them: a plot is then drawn on the writer thread, not on the caller's (the Tune event loop)."""
        self._put(f"artifact {name} of {key}", lambda: self._artifact(key, name, content() if callable(content) else content))

    def log_table(self, key: str, name: str, rows: list[dict[str, Any]]) -> None:
        """A table artifact MLflow's UI can show and compare across runs (`MlflowClient.log_table`)."""
        if rows:
            self._put(f"table {name} of {key}", lambda: self._table(key, name, rows))

    def set_experiment_tag(self, name: str, value: str) -> None:
        """A tag of the experiment itself (a saved view of its runs table: views.py)."""
        self._put(f"experiment tag {name}", lambda: self._client_call().set_experiment_tag(self.experiment_id(), name, value))

    def close_run(self, key: str, status: str) -> None:
        self._put(f"status {status} of {key}", lambda: self._client_call().set_terminated(self._run(key), status=status))

    def run_id(self, key: str, timeout_s: float = 30.0) -> str | None:
        """The MLflow run id behind `key` once its open_run was written (None if not within the timeout)."""
        self.flush(timeout_s)
        return self.run_ids.get(key)

    # ------------------------------------------------------------------------------------ draining
    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write is done; False when the timeout came first.

        A store that is away gets one more retry, not the whole timeout: the user was told, what is kept is
        retried by `close()` and replayed by `ltsearch runs --sync`, and a command ending must not sit out 30 s
        per wait on a server that is down.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        with self._lock:
            self._flushing += 1
            self._lock.notify_all()
            try:
                while self._queue and time.monotonic() < deadline:
                    if self._away_since is not None and time.monotonic() - started > self.retry_s + 1.0:
                        break
                    self._lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                return not self._queue
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float = 30.0) -> list[str]:
        """Write what is queued; return what was not written.

        A reachable store gets up to `timeout_s` to take the queue; one that is away gets one more retry
        (`flush`), and the user is told again what is missing.
        """
        self.flush(timeout_s)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            pending = [write.description for write in self._queue]
        self._thread.join(timeout=max(1.0, self.retry_s + 1.0))
        if self.renamed:
            shown = ", ".join(f"'{name}' -> '{key}'" for name, key in sorted(self.renamed.items())[:4])
            more = f" and {len(self.renamed) - 4} more" if len(self.renamed) > 4 else ""
            self._say(f"tracking: {len(self.renamed)} name(s) changed to fit MLflow's rules: {shown}{more}; "
                      f"each run lists its own in the tag {TAG_NAMES} and {NAMES_FILE}")
        return self.dropped + pending

    def _put(self, description: str, apply: Callable[[], None], epoch: tuple[str, int, dict[str, float]] | None = None) -> None:
        with self._lock:
            self._queue.append(_Write(description, apply, epoch, time.monotonic()))
            self._lock.notify_all()

    def _drain(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing and (not self._queue or self._away_since is not None):
                    return
                wait = self._queue[0].queued + self.batch_s - time.monotonic()
                if self._queue[0].epoch is not None and wait > 0 and not (self._closing or self._flushing):
                    self._lock.wait(wait)  # let the run's next epochs join this request
                    continue
                covered, write = self._next_write()
            outcome = self._attempt(write)
            with self._lock:
                if outcome != "retry":
                    for done in covered:
                        self._queue.remove(done)
                self._lock.notify_all()
                if outcome == "retry" and not self._closing:
                    self._lock.wait(self.retry_s)

    def _next_write(self) -> tuple[list[_Write], _Write]:
        """(the queued writes it covers, the write): the head alone, or with the head's run's other epoch rows queued
        before the next write of another kind (rows of runs trained at once interleave; they are never reordered
        past an open, a summary or a status)."""
        head = self._queue[0]
        if head.epoch is None:
            return [head], head
        key, covered = head.epoch[0], []
        for write in self._queue:
            if write.epoch is None or len(covered) * len(head.epoch[2]) >= METRICS_PER_BATCH:
                break
            if write.epoch[0] == key:
                covered.append(write)
        if len(covered) == 1:
            return covered, head
        rows = [write.epoch[1:] for write in covered]
        steps = ", ".join(str(step) for step, _ in rows)
        return covered, _Write(f"metrics of {key} at steps {steps}", lambda: self._epochs(key, rows))

    def _attempt(self, write: _Write) -> str:
        try:
            write.apply()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training; every failure is reported
            if _is_permanent(error):
                self.dropped.append(f"{write.description}: {_one_line(error)}")
                self._say(f"tracking: could not write {write.description} to {self.uri}: {_one_line(error)}")
                return "dropped"
            if self._away_since is None:
                self._away_since = time.monotonic()
                if self.uri in _TOLD_AWAY:  # one command may use several trackers (stream, then reconciliation): tell once
                    return "retry"
                _TOLD_AWAY.add(self.uri)
                self._say(f"tracking: cannot reach {self.uri} ({_one_line(error)}); training goes on, and what cannot be "
                          f"logged now is kept and retried every {self.retry_s:g} s")
            return "retry"
        if self._away_since is not None:
            _TOLD_AWAY.discard(self.uri)
            self._say(f"tracking: {self.uri} is reachable again after {time.monotonic() - self._away_since:.0f} s; sending what was kept")
            self._away_since = None
        return "done"

    def _say(self, message: str) -> None:
        print(message, file=self.stream or sys.stderr, flush=True)

    # ---------------------------------------------------------------------------- the MLflow calls
    def _client_call(self) -> Any:
        if self._client is None:
            self._client = open_client(self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self._client_call()
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                try:
                    self._experiment_id = client.create_experiment(self.experiment_name, artifact_location=self.artifact_root)
                except Exception:  # noqa: BLE001 - created meanwhile by another process: read it back
                    experiment = client.get_experiment_by_name(self.experiment_name)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _run(self, key: str) -> str:
        if key not in self.run_ids:
            raise LookupError(f"no run is open for {key}")
        return self.run_ids[key]

    def _open(self, key: str, name: str, find: dict[str, str], tags: dict[str, str], parent: str | None, reopen: bool) -> None:
        if key in self.run_ids:
            return
        client = self._client_call()
        match = {**find, **({"mlflow.parentRunId": self._run(parent)} if parent is not None else {})}
        match = {new: match[old] for old, new in self._mapped(key, match).items()}
        clauses = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in match.items())
        found = client.search_runs([self.experiment_id()], filter_string=clauses, max_results=2, order_by=["attributes.start_time ASC"])
        if found:
            run_id = found[0].info.run_id
            if reopen and found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            history = client.get_metric_history(run_id, STEP_MARKER)
            self.logged_steps[key] = {m.step for m in history}
            self.latest[key] = dict(found[0].data.metrics)
            self.names[key] = {**_recorded(found[0].data.tags.get(TAG_NAMES)), **self.names.get(key, {})}
        else:
            short = mlflow_run_name(name)
            if short != name:
                self._note(key, {name: short})
            tags = {new: str(tags[old]) for old, new in self._mapped(key, tags).items()}
            run = client.create_run(self.experiment_id(), run_name=short, tags={**tags, **match})
            run_id = run.info.run_id
            self.logged_steps[key] = set()
            self._created.add(key)
        self.run_ids[key] = run_id
        self._send_names(key)

    def _epochs(self, key: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Epoch rows (step, metrics) in as few requests as MLflow allows; a step already in the store is skipped.

        A step that comes twice in one batch (a PBT exploit re-running an epoch before the first report was sent) is
        written once, with its last values, as the sweep's own files keep it.
        """
        logged = self.logged_steps.setdefault(key, set())
        fresh = [(step, values) for step, values in dict(rows).items() if step not in logged]
        if fresh:
            self._batch(key, rows=fresh)
            logged.update(step for step, _ in fresh)

    def _summary(self, key: str, step: int, values: dict[str, float]) -> None:
        latest = self.latest.setdefault(key, {})  # as the store holds them: compared under the keys they are written with
        values = {new: values[old] for old, new in self._mapped(key, values).items()}
        changed = {k: v for k, v in values.items() if latest.get(k) != v}
        if changed:
            self._batch(key, rows=[(step, changed)])
            latest.update(changed)

    def _batch(self, key: str, *, rows: list[tuple[int, dict[str, float]]] | None = None, params: dict[str, Any] | None = None,
               tags: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id, client, now = self._run(key), self._client_call(), int(time.time() * 1000)
        to = self._mapped(key, [*(params or {}), *(tags or {}), *(k for _, metrics in rows or [] for k in metrics)])
        metric_list = [Metric(to[k], v, now, step) for step, metrics in (rows or []) for k, v in metrics.items()]
        param_list = [Param(to[k], _text(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(to[k], _text(v)) for k, v in (tags or {}).items()]
        self._send_names(key)  # first: a write that fails after it is retried whole, and no data row twice
        for i in range(0, len(metric_list), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metric_list[i:i + METRICS_PER_BATCH], synchronous=True)
        for i in range(0, len(param_list), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=param_list[i:i + PARAMS_PER_BATCH], synchronous=True)
        if tag_list:
            client.log_batch(run_id, tags=tag_list, synchronous=True)

    def _mapped(self, key: str, names: Iterable[str]) -> dict[str, str]:
        """Each name's MLflow key within this request (names.py); changed ones are noted for `key`'s run."""
        mapping = mlflow_keys(names)
        self._note(key, {name: new for name, new in mapping.items() if new != name})
        return mapping

    def _note(self, key: str, changed: dict[str, str]) -> None:
        if not changed:
            return
        known = self.names.setdefault(key, {})
        if any(known.get(name) != new for name, new in changed.items()):
            known.update(changed)
            self.renamed.update(changed)
            self._names_unsent.add(key)

    def _send_names(self, key: str) -> None:
        """The run's whole mapping as a tag (when it fits) and as a file, each time it grows; kept until written."""
        if key not in self._names_unsent or key not in self.run_ids:
            return
        from mlflow.entities import RunTag

        text = json.dumps(dict(sorted(self.names[key].items())), ensure_ascii=False)
        shown = text if len(text) <= MAX_TAG_LENGTH else f"{len(self.names[key])} names; see {NAMES_FILE}"
        self._client_call().log_batch(self.run_ids[key], tags=[RunTag(TAG_NAMES, shown)], synchronous=True)
        self._artifact(key, NAMES_FILE, text.encode())
        self._names_unsent.discard(key)

    def _table(self, key: str, name: str, rows: list[dict[str, Any]]) -> None:
        """log_table the first time; later the same file is replaced (log_table would append the rows again)."""
        import json

        import pandas

        client, run_id = self._client_call(), self._run(key)
        frame = pandas.DataFrame(rows)
        if any(item.path == name for item in client.list_artifacts(run_id)):
            self._artifact(key, name, json.dumps(frame.to_dict(orient="split") | {"index": None}, default=str).encode())
        else:
            client.log_table(run_id, data=frame, artifact_file=name)

    def _artifact(self, key: str, name: str, content: bytes | None) -> None:
        if content is None:
            return
        with tempfile.TemporaryDirectory(prefix="ltsearch-artifact-") as directory:
            path = Path(directory) / name
            path.write_bytes(content)
            self._client_call().log_artifact(self._run(key), str(path))


def _is_permanent(error: BaseException) -> bool:
    code = getattr(error, "error_code", None)
    return isinstance(error, LookupError) or (isinstance(code, str) and code in PERMANENT_CODES)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _recorded(text: str | None) -> dict[str, str]:
    """The mapping a run already carries (a resumed run keeps it when its mapping grows); {} when there is none."""
    try:
        mapping = json.loads(text) if text else {}
    except ValueError:
        return {}
    return mapping if isinstance(mapping, dict) else {}


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"
