"""`ltsearch tune` as a user runs it, in subprocesses: a driver killed with SIGKILL and resumed, and a
2-node Ray cluster on loopback (`ray start --head` + `ray start --address`) started and stopped here.

Every process these tests start is stopped by its id (the driver's whole session, the `ray start
--block` supervisors, the second driver that holds a node's CPU), also when an assertion fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ltsearch.results import read_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = str(REPO / "search_spaces" / "quickstart.yaml")
SMALL = ["--set", "space.model.width={choice: [16]}", "--set", "scheduler={name: fifo}", "--set", "search.max_concurrent=2",
         "--set", "train.device=cpu", "--set", "checkpoint.every=1"]

pytestmark = pytest.mark.slow


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (the driver started with start_new_session, and what it spawned)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def result_lines(directory: Path) -> dict[str, list[int]]:
    """trial id -> the epochs it reported, in order (Ray's result.json)."""
    out = {}
    for path in directory.glob("trial_*/result.json"):
        epochs = []
        for line in path.read_text().splitlines():
            try:
                epochs.append(json.loads(line)["epochs"])
            except json.JSONDecodeError:  # the line being written right now
                break
        out[path.parent.name.removeprefix("trial_")] = epochs
    return out


def test_a_killed_sweep_resumes_with_every_trial_accounted_for_once(tmp_path):
    directory = tmp_path / "sweep"
    env = {**os.environ, "LTSEARCH_CACHE": str(tmp_path / "cache")}
    epochs, trials = 8, 5
    command = [str(BIN / "ltsearch"), "tune", QUICKSTART, *SMALL, "--set", f"train.epochs={epochs}", "--set", f"search.num_samples={trials}",
               "--out", str(directory)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill once one trial finished and another is part-way, with a checkpoint
            lines = result_lines(directory)
            done = [t for t, e in lines.items() if e and e[-1] == epochs]
            partway = [t for t, e in lines.items() if e and 2 <= e[-1] < epochs]
            if done and partway and list(directory.glob("experiment_state-*.json")):
                break
            assert driver.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("no moment with a finished and a part-way trial")
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        kill_session(driver.pid)
    before = result_lines(directory)
    finished_before = {t for t, e in before.items() if e and e[-1] == epochs}  # a trial just started may have reported nothing yet
    assert not (directory / "trials.parquet").exists()

    resumed = subprocess.run([str(BIN / "ltsearch"), "tune", "--resume", str(directory)], env=env, capture_output=True, text=True,
                             timeout=300, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = result_lines(directory)
    rows = read_table(directory / "trials.parquet")
    assert len(rows) == trials and len({r["trial_id"] for r in rows}) == trials == len(after)
    assert all(r["status"] == "completed" and r["epochs"] == epochs for r in rows)
    for trial in finished_before:
        assert after[trial] == before[trial], f"finished trial {trial} ran again"
    for trial, reported in after.items():
        assert reported.count(1) == 1, f"trial {trial} started over: {reported}"  # part-way trials resumed from checkpoints
        assert sorted(set(reported)) == list(range(1, epochs + 1))
    history = read_table(directory / "history.parquet")
    assert len(history) == trials * epochs
    assert "best trial" in resumed.stdout
    assert_resumed_store_has_one_run_each(env["MLFLOW_TRACKING_URI"], {r["trial_id"] for r in rows}, epochs)


def assert_resumed_store_has_one_run_each(uri: str, trial_ids: set[str], epochs: int) -> None:
    """The resumed sweep continued the runs the killed driver created: one parent, one child per trial, none RUNNING,
    and every epoch logged exactly once."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"] * (len(trial_ids) + 1)
    (parent,) = [r for r in runs if r.data.tags["ltsearch.kind"] == "sweep"]
    children = [r for r in runs if r.data.tags["ltsearch.kind"] == "trial"]
    assert sorted(r.data.tags["ltsearch.trial_id"] for r in children) == sorted(trial_ids)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    for run in children:
        # sorted: epochs the killed driver never wrote are filled in at the end, after later ones (MLflow orders by time)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(epochs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --block`: the supervisor stays in the foreground and stops its node on SIGTERM."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    command = [str(BIN / "ray"), "start", *args, "--num-cpus", "1", "--object-store-memory", str(150 * 2**20), "--disable-usage-stats",
               "--block", "--node-ip-address", "127.0.0.1", *[x for port in ports for x in (port, str(free_port()))]]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_started(node: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)


SAFA_SWEEP = """\
base: {base}
name: safa_cluster
augmenter: {{name: safa, start_epoch: 3}}
train: {{epochs: 6}}
model: {{width: 16}}
space:
  augmenter.safa.lambda_recycle: {{loguniform: [10.0, 1000.0]}}
search: {{sampler: random, num_samples: 4, seed: 0, max_concurrent: 2}}
scheduler: {{name: fifo}}
resources: {{cpu: 1}}
tracking: {{enabled: false}}
"""

#: A second Ray driver that takes the one CPU of the node it is told (a line on stdin), so that the sweep's trials,
#: one CPU each, can only run on the other node. It prints the cluster's node ids, then each seat's node once taken.
SEAT = """\
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"head": [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]],
                  "worker": [n["NodeID"] for n in alive if "node:__internal_head__" not in n["Resources"]]}), flush=True)

@ray.remote(num_cpus=1)
class Seat:
    def node(self):
        return ray.get_runtime_context().get_node_id()

seat = None
for line in sys.stdin:
    if seat is not None:
        ray.kill(seat)
    seat = Seat.options(scheduling_strategy=NodeAffinitySchedulingStrategy(line.strip(), soft=False)).remote()
    print(ray.get(seat.node.remote()), flush=True)
"""


def take_seat(seat: subprocess.Popen, node: str) -> None:
    """Occupy `node`'s CPU (the previous seat is given up); returns once the seat is taken."""
    seat.stdin.write(node + "\n")
    seat.stdin.flush()
    assert seat.stdout.readline().strip() == node


def test_a_sweep_runs_its_trials_on_whichever_node_has_room_and_shares_its_prefix_there(tmp_path):
    """Placement is forced, not hoped for: each node has one CPU, a trial takes one, and a second driver holds
    one node's CPU while a sweep runs, so every trial of that sweep must run on the other node (Tune would
    otherwise reuse a warm actor, and trials landed on one node or two depending on the machine's load). Each node
    gets a sweep: the plain sweep runs on the head (where the driver is), the SAFA sweep on the worker, where
    every trial reaches the driver's prefix board across nodes and forks one trunk, trained once."""
    temp = Path(f"/tmp/lts-{os.getpid()}-{time.monotonic_ns() % 10**6}")  # short: Ray's socket paths have a length limit
    temp.mkdir()
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "LTSEARCH_CACHE": str(tmp_path / "cache")}
    nodes, seat = [], None
    try:
        nodes.append(start_node(["--head", "--port", str(port), "--temp-dir", str(temp), "--include-dashboard", "false"],
                                tmp_path / "head.log", env))
        wait_started(nodes[0], tmp_path / "head.log")
        nodes.append(start_node(["--address", f"127.0.0.1:{port}"], tmp_path / "worker.log", env))
        wait_started(nodes[1], tmp_path / "worker.log")
        seat = subprocess.Popen([sys.executable, "-c", SEAT, f"127.0.0.1:{port}"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=(tmp_path / "seat.log").open("w"), text=True, start_new_session=True)
        ids = json.loads(seat.stdout.readline() or "{}")
        assert len(ids.get("head", [])) == 1 and len(ids.get("worker", [])) == 1, (ids, (tmp_path / "seat.log").read_text()[-2000:])
        (head,), (worker,) = ids["head"], ids["worker"]
        driver_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # `ltsearch tune` must switch token auth on itself

        take_seat(seat, worker)
        out = tmp_path / "sweep"
        run = subprocess.run([str(BIN / "ltsearch"), "tune", QUICKSTART, *SMALL, "--set", "train.epochs=3", "--set", "search.num_samples=4",
                              "--address", f"127.0.0.1:{port}", "--out", str(out)], env=driver_env, capture_output=True, text=True,
                             timeout=300, start_new_session=True)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = read_table(out / "trials.parquet")
        assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
        assert [r["node_id"] for r in rows] == [head] * 4, "a trial ran on the node whose CPU was taken"
        assert "warning" not in run.stdout  # both nodes are this machine: the local sweep directory is visible to both

        take_seat(seat, head)
        file = tmp_path / "safa.yaml"
        file.write_text(SAFA_SWEEP.format(base=REPO / "configs" / "digits.yaml"))
        run = subprocess.run([str(BIN / "ltsearch"), "tune", str(file), "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "safa")],
                             env=driver_env, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert run.returncode == 0, run.stderr[-3000:]
        (entry,) = json.loads((tmp_path / "safa" / "prefixes" / "summary.json").read_text()).values()
        assert entry["epochs_trained"] == 3 and entry["forks"] == 4
        rows = read_table(tmp_path / "safa" / "trials.parquet")
        assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
        assert [r["node_id"] for r in rows] == [worker] * 4, "a trial ran on the node whose CPU was taken"
    finally:
        if seat is not None:
            seat.stdin.close()  # the seat's driver ends, and its actor with it
            try:
                seat.wait(60)
            except subprocess.TimeoutExpired:
                kill_session(seat.pid)
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                kill_session(node.pid)
        for node in nodes:
            kill_session(node.pid)  # anything a supervisor left behind
        subprocess.run(["rm", "-rf", str(temp)], check=False)
