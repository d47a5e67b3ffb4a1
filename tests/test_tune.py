"""`ltsearch tune` on a real local Ray runtime with real Optuna samplers, on the embedded digits data.

One Ray runtime (2 CPUs) serves the module and is shut down even when a test fails; budgets are tiny
(a few trials of 1-4 epochs of a 16-channel CNN). Subprocess scenarios (a killed driver, a 2-node
cluster) live in test_tune_cluster.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from ltsearch.cli import main
from ltsearch.cli.tune import use_token_auth
from ltsearch.config import read_yaml
from ltsearch.errors import ConfigError
from ltsearch.results import read_table
from ltsearch.tune import (EPOCHS, Objective, SweepOutcome, load_sweep, parse_sweep, pbt_keys, progress_table, run_sweep,
                           storage_warning)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
TINY = ["train.epochs=2", "search.max_concurrent=2", "space.model.width={choice: [16, 24]}", "scheduler={name: fifo}",
        "checkpoint.every=1"]


def sweep(tmp_path: Path, file: Path, *overrides: str, **kwargs) -> tuple[SweepOutcome, str]:
    stream = io.StringIO()
    outcome = run_sweep(load_sweep(file, list(overrides)), directory=str(tmp_path / "sweep"), stream=stream,
                        progress_interval_s=0.0, **kwargs)
    return outcome, stream.getvalue()


def trial_epochs(directory: str, trial_id: str) -> list[int]:
    """The epochs a trial reported, in order, from Ray's own result log."""
    lines = (Path(directory) / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [json.loads(line)[EPOCHS] for line in lines]


# ======================================================================================== no Ray runtime
def test_sweep_file_defaults_and_grid_trial_count():
    sweep_ = load_sweep(QUICKSTART, ["search.num_samples=3", "space.loss.name={grid: [ce, ldam]}"])
    assert sweep_.objective.metric == "val/top1" and sweep_.objective.mode == "max"
    assert sweep_.num_trials == 6 and len(sweep_.cells) == 2
    assert sweep_.execution.resources.cpu == 1 and sweep_.execution.checkpoint.every == 3  # the file's: at ASHA's rungs
    assert sweep_.execution.checkpoint.keep == 2 and sweep_.execution.max_failures == 1  # defaults
    assert sweep_.max_epochs == 30


@pytest.mark.parametrize("override, key", [
    ("colour=red", "colour"),
    ("scheduler.grace_period=0", "scheduler.grace_period"),
    ("scheduler={name: fifo, grace_period: 2}", "scheduler.grace_period"),
    ("search.sampler=bayes", "search.sampler"),
    ("search.num_samples=0", "search.num_samples"),
    ("resources.gpu=1.5", "resources.gpu"),
    ("metric=test/top1", "metric"),
    ("mode=up", "mode"),
    ("space={}", "space"),
])
def test_bad_sweep_settings_name_their_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_sweep(QUICKSTART, [override])
    assert error.value.key == key
    assert str(error.value).startswith(f"{QUICKSTART}: ")


def test_pbt_needs_a_random_unconditional_population_and_mutates_float_keys_by_default():
    raw = read_yaml(QUICKSTART)
    raw["scheduler"] = {"name": "pbt"}
    with pytest.raises(ConfigError, match="'random' with scheduler pbt"):  # Ray runs PBT without a search algorithm
        parse_sweep(raw, source="q")
    raw["search"]["sampler"] = "random"
    with pytest.raises(ConfigError, match="no conditional keys"):  # loss.ldam.max_m depends on the sampled loss.name
        parse_sweep(raw, source="q")
    raw["space"].pop("loss.ldam.max_m")
    sweep_ = parse_sweep(raw, source="q")
    assert pbt_keys(sweep_.scheduler.params, sweep_.space) == ["optim.lr", "optim.weight_decay"]
    raw["scheduler"] = {"name": "pbt", "mutate": ["model.width", "loss.name", "train.seed"]}
    with pytest.raises(ConfigError, match="every trial samples"):  # train.seed is not in the space
        parse_sweep(raw, source="q")


def test_progress_table_shows_counts_metric_and_hyperparameters():
    rows = [{"trial": "a1", "status": "TERMINATED", "epochs": "8/8", "value": 91.0, "best": 93.0, "config": {"optim.lr": 0.05, "loss.name": "ce"}},
            {"trial": "b2", "status": "RUNNING", "epochs": "3/8", "value": 80.5, "best": 85.0, "config": {"optim.lr": 0.2, "loss.name": "ldam"}},
            {"trial": "c3", "status": "PENDING", "epochs": "0/8", "value": None, "best": None, "config": {"optim.lr": 0.01, "loss.name": "ce"}}]
    text = progress_table(rows, ["optim.lr", "loss.name"], Objective("val/top1", "max"), 12.0)
    lines = text.splitlines()
    assert "3 trials: 1 pending, 1 running, 1 terminated" in lines[0]
    assert lines[1].split() == ["trial", "status", "epochs", "val/top1", "best", "optim.lr", "loss.name"]
    assert lines[2].split() == ["b2", "running", "3/8", "80.5", "85", "0.2", "ldam"]  # running first
    assert lines[4].split()[:5] == ["c3", "pending", "0/8", "-", "-"]


MOUNTS = "/dev/vda1 / ext4 rw 0 0\nnfs1:/export /nfs nfs4 rw 0 0\n"


@pytest.mark.parametrize("directory, nodes, warns", [
    ("/home/u/runs/x", ["10.0.0.1", "10.0.0.2"], True),   # local disk, a second machine
    ("/nfs/sweeps/x", ["10.0.0.1", "10.0.0.2"], False),   # NFS: every node sees it
    ("s3://bucket/x", ["10.0.0.1", "10.0.0.2"], False),   # a bucket
    ("/home/u/runs/x", ["10.0.0.1", "10.0.0.1"], False),  # every node on this machine
])
def test_storage_warning_only_when_other_machines_cannot_see_the_path(directory, nodes, warns):
    message = storage_warning(directory, nodes, "10.0.0.1", MOUNTS)
    assert (message is not None) == warns
    if warns:
        assert "10.0.0.2" in message and "s3://" in message and "ext4" in message


def test_token_auth_is_switched_on_only_for_explicit_addresses(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {"RAY_AUTH_TOKEN": "t"}
    use_token_auth("auto", env)
    assert "RAY_AUTH_MODE" not in env
    use_token_auth("10.0.0.1:6379", env)
    assert env["RAY_AUTH_MODE"] == "token"
    env = {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t"}
    use_token_auth("10.0.0.1:6379", env)
    assert env["RAY_AUTH_MODE"] == "disabled"  # the user's choice wins
    env = {}
    use_token_auth("10.0.0.1:6379", env)  # no token anywhere: nothing to send
    assert env == {}


def test_an_existing_sweep_directory_is_never_overwritten(tmp_path):
    (tmp_path / "sweep").mkdir()
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(load_sweep(QUICKSTART, []), directory=str(tmp_path / "sweep"))


# ========================================================================================= real Ray
def test_tpe_sweep_with_conditional_space_writes_results_and_best_reruns_identically(ray_runtime, tmp_path, capsys):
    """TPE fills a grid over the loss; LDAM's margin is sampled only for LDAM; best.yaml reruns to the same numbers."""
    outcome, log = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=3", "search.num_samples=2",
                         "space.loss.name={grid: [ce, ldam]}")
    assert outcome.finished
    trials = read_table(Path(outcome.directory) / "trials.parquet")
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}
    assert sorted(t["loss.name"] for t in trials) == ["ce", "ce", "ldam", "ldam"]  # every grid cell twice
    for t in trials:
        assert (t["loss.ldam.max_m"] is not None) == (t["loss.name"] == "ldam")
        assert set(json.loads(t["config"])) == {"loss.name", "model.width", "optim.lr", "optim.weight_decay"} \
            | ({"loss.ldam.max_m"} if t["loss.name"] == "ldam" else set())
        assert 0.01 <= t["optim.lr"] <= 0.3 and t["model.width"] in (16, 24)
    history = read_table(Path(outcome.directory) / "history.parquet")
    assert sorted((h["trial_id"], h["epoch"]) for h in history) == sorted((t["trial_id"], e) for t in trials for e in range(3))
    assert "trials: " in log and "loss.name" in log and "best trial" in log
    for trial_dir in Path(outcome.directory).glob("trial_*"):  # the files tune.outputs reads, and no TensorBoard events
        assert (trial_dir / "result.json").stat().st_size and (trial_dir / "progress.csv").stat().st_size
        assert not list(trial_dir.glob("events.out.tfevents*")), "TensorBoard's logger costs every report ~11 ms and is off"

    best = outcome.best
    assert best["best/val/top1"] == max(t["best/val/top1"] for t in trials)
    best_yaml = Path(outcome.directory) / "best.yaml"
    assert main(["train", str(best_yaml), "--out", str(tmp_path / "rerun"), "--quiet"]) == 0
    rerun = read_table(tmp_path / "rerun" / "history.parquet")
    tuned = [h for h in history if h["trial_id"] == best["trial_id"]]
    assert [r["val/top1"] for r in rerun] == [h["val/top1"] for h in tuned]
    assert [r["test/top1"] for r in rerun] == [h["test/top1"] for h in tuned]
    assert [r["train/loss"] for r in rerun] == pytest.approx([h["train/loss"] for h in tuned], rel=0, abs=0)


def test_random_sampler_runs_distinct_trials(ray_runtime, tmp_path):
    outcome, _ = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=1", "search.sampler=random", "search.num_samples=3")
    assert outcome.finished and len(outcome.trials) == 3
    assert len({t["optim.lr"] for t in outcome.trials}) == 3
    assert all(t["status"] == "completed" and t["epochs"] == 1 for t in outcome.trials)


def test_grid_sampler_runs_every_combination_once(ray_runtime, tmp_path):
    outcome, _ = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=1", "search.sampler=grid", "search.num_samples=1",
                       "space={optim.lr: {grid: [0.05, 0.1]}, model.width: {choice: [16, 24]}}")
    assert outcome.finished
    assert sorted((t["optim.lr"], t["model.width"]) for t in outcome.trials) == [(0.05, 16), (0.05, 24), (0.1, 16), (0.1, 24)]


@pytest.mark.slow
def test_asha_stops_some_trials_at_rungs(ray_runtime, tmp_path):
    outcome, _ = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=4", "search.sampler=random", "search.num_samples=8",
                       "scheduler={name: asha, grace_period: 1, reduction_factor: 2}")
    assert outcome.finished and len(outcome.trials) == 8
    epochs = sorted(t["epochs"] for t in outcome.trials)
    stopped = [t for t in outcome.trials if t["status"] == "stopped"]
    assert stopped, f"ASHA stopped nothing: {epochs}"
    assert all(t["epochs"] in (1, 2) for t in stopped)  # rungs at 1 and 2 epochs (max 4)
    assert epochs[-1] == 4 and sum(epochs) < 8 * 4


class KillWorkerOnce(tune.Callback):
    """Kills the trial's worker process (SIGKILL, by its pid) the first time it reports epoch 3."""

    def __init__(self) -> None:
        self.killed: list[int] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result[EPOCHS] == 3 and not self.killed:
            self.killed.append(result["pid"])
            os.kill(result["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_a_failed_trial_resumes_from_its_last_checkpoint(ray_runtime, tmp_path):
    killer = KillWorkerOnce()
    outcome, _ = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=4", "search.num_samples=1", "max_failures=1",
                       callbacks=[killer])
    assert killer.killed, "the worker was never killed"
    (trial,) = outcome.trials
    assert trial["status"] == "completed" and trial["epochs"] == 4
    epochs = trial_epochs(outcome.directory, trial["trial_id"])
    # it did not start over: epochs 1 and 2 ran once; at most epoch 3 (reported as the worker died) ran again
    assert epochs.count(1) == 1 and epochs.count(2) == 1 and epochs[-1] == 4 and len(epochs) <= 5, epochs
    pids = [json.loads(line)["pid"] for line in (Path(outcome.directory) / f"trial_{trial['trial_id']}" / "result.json").read_text().splitlines()]
    assert pids[0] == killer.killed[0] and pids[-1] != killer.killed[0]  # a new worker finished it


@pytest.mark.slow
def test_pbt_perturbs_within_the_space(ray_runtime, tmp_path, mlflow_store):
    outcome, _ = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=4", "search.sampler=random", "search.num_samples=4",
                       "space.loss.ldam.max_m=null", "space.loss.name={choice: [ce]}",
                       "scheduler={name: pbt, perturbation_interval: 1, quantile_fraction: 0.5, resample_probability: 0.5}")
    assert outcome.finished and all(t["epochs"] == 4 for t in outcome.trials)
    assert list(Path(outcome.directory).glob("pbt_policy_*.txt")), "PBT never exploited a trial"
    assert all(0.01 <= t["optim.lr"] <= 0.3 and 1e-5 <= t["optim.weight_decay"] <= 1e-2 for t in outcome.trials)
    client = MlflowClient(mlflow_store)  # params cannot change in MLflow: the values each epoch ran with are hp/ metrics
    children = [r for r in client.search_runs([client.get_experiment_by_name("quickstart").experiment_id]) if r.data.tags["ltsearch.kind"] == "trial"]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    for run in children:
        lrs = client.get_metric_history(run.info.run_id, "hp/optim.lr")
        steps = [m.step for m in lrs]  # an exploit may continue another trial's checkpoint: epochs can repeat or jump, never twice logged
        assert len(steps) == len(set(steps)) and 3 in steps and set(steps) <= {0, 1, 2, 3}
        assert all(0.01 <= m.value <= 0.3 for m in lrs)


# ----------------------------------------------------------------------- every shipped file on digits
DIGITS = ["data.name=digits", "data.imbalance=10", "data.val_fraction=0.2", "data.max_train_per_class=40",
          "model.name=small_cnn", "model.width=16", "train.epochs=2", "train.device=cpu", "optim.lr=0.05",
          "optim.batch_size=64", "optim.schedule={name: constant}", "loss.reweight.start_epoch=1",
          "scheduler={name: fifo}", "resources.cpu=1", "resources.gpu=0", "search.num_samples=1", "search.max_concurrent=2"]
PER_FILE = {
    "quickstart": ["space.model.width={choice: [16]}"],
    "smart_tau": ["space.augmenter.insert_at={choice: [1, 3]}"],
    "smart_pareto": ["space.augmenter.insert_at={choice: [1, 3]}"],
    "safa_lambdas": ["space.augmenter.start_epoch={int: [0, 1]}"],
    "rsg": [],
    "lcreg_latents": ["augmenter.lcreg.second_stage_epochs=1"],
    "m2m": [],
    "insertion_layer": ["space.augmenter.name={grid: [safa, lcreg]}", "space.augmenter.insert_at={grid: [2]}"],
}


def test_every_shipped_file_has_digits_overrides():
    assert sorted(PER_FILE) == sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PER_FILE))
def test_shipped_search_file_runs_on_digits(ray_runtime, tmp_path, name):
    outcome, _ = sweep(tmp_path, REPO / "search_spaces" / f"{name}.yaml", *DIGITS, *PER_FILE[name])
    assert outcome.finished
    assert [t["status"] for t in outcome.trials] == ["completed"] * len(outcome.trials), [t["error"] for t in outcome.trials]
    assert all(t["epochs"] == 2 for t in outcome.trials)
    assert (Path(outcome.directory) / "best.yaml").is_file()
    if name != "quickstart":  # every method reports what it did into the sweep's per-epoch results
        history = pq.read_table(Path(outcome.directory) / "history.parquet").to_pylist()
        reported = {k for row in history for k, v in row.items() if k.startswith("aug/") and v is not None}
        assert reported, f"{name}: no aug/ diagnostics in history.parquet"


def test_a_diverging_trial_ends_as_an_error_with_its_reason_and_the_others_go_on(ray_runtime, tmp_path):
    outcome, _ = sweep(tmp_path, QUICKSTART, *TINY, "train.epochs=1", "search.sampler=grid", "search.num_samples=1", "max_failures=0",
                       "optim.schedule.warmup_epochs=0", "space={optim.lr: {grid: [0.05, 1.0e30]}}")
    by_lr = {t["optim.lr"]: t for t in outcome.trials}
    assert by_lr[0.05]["status"] == "completed" and by_lr[0.05]["epochs"] == 1
    assert by_lr[1.0e30]["status"] == "error"
    assert "training diverged in epoch 1/1" in by_lr[1.0e30]["error"] and "non-finite loss term(s)" in by_lr[1.0e30]["error"]


def test_trial_rows_fall_back_to_progress_csv_when_result_json_is_missing(tmp_path):
    """Ray sometimes leaves no result.json (seen under PBT); the reports in progress.csv must not be lost."""
    from types import SimpleNamespace

    from ltsearch.tune.outputs import _epoch_rows

    (tmp_path / "progress.csv").write_text(f"{EPOCHS},val/top1,trial_id,done\n1,40.0,t0,False\n2,55.5,t0,False\n2,56.0,t0,True\n")
    rows = _epoch_rows(SimpleNamespace(metrics_dataframe=None, path=str(tmp_path)))
    assert rows == [{EPOCHS: 1, "val/top1": 40.0}, {EPOCHS: 2, "val/top1": 56.0}]
    assert _epoch_rows(SimpleNamespace(metrics_dataframe=None, path=str(tmp_path / "none"))) == []
