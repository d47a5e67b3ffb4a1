"""Shared prefixes through Ray: the board on a real local Ray runtime, sweeps and ablations on digits.

The exactness of one fork against a run from scratch, per method, is tests/test_prefix_exact.py; here
it is the orchestration: one trunk per key however many trials ask at once, waiting without polling,
a failing trunk failing its dependents with its error, a stalled trunk taken over, the cache reused by
a later sweep, schedulers counting from the start epoch, tracking the shared epochs once, and a sweep
whose results are identical with and without sharing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from ltsearch.ablate.runner import run_ablation
from ltsearch.ablate.settings import parse_ablation
from ltsearch.cli import main
from ltsearch.config import load_run_config, read_yaml
from ltsearch.prefix import PREFIX_KEY, SHARED_PREFIX
from ltsearch.prefix.board import FAILED, READY, TRAIN, PrefixBoard
from ltsearch.prefix.keys import prefix_of
from ltsearch.results import read_table
from ltsearch.tune import ACTIVE_EPOCHS, EPOCHS, load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
TIMING = ("epoch_seconds", "images_per_s", "time", "timestamp", "node_id")


def sweep_file(tmp_path: Path, **space: str) -> Path:
    """A SAFA sweep on digits: 5 epochs, the method starting at epoch 3 or 4, searched over post-start knobs."""
    lines = [f"base: {DIGITS}", "name: safa_share", "augmenter: {name: safa, start_epoch: 3}", "train: {epochs: 5}",
             "model: {width: 16}", "space:", *(f"  {key}: {dist}" for key, dist in space.items()),
             "search: {sampler: random, num_samples: 4, seed: 0, max_concurrent: 2}", "scheduler: {name: fifo}",
             "resources: {cpu: 1}", "checkpoint: {every: 1}", "tracking: {enabled: false}"]
    path = tmp_path / "safa_share.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


SPACE = {"augmenter.safa.lambda_recycle": "{loguniform: [10.0, 1000.0]}", "augmenter.start_epoch": "{choice: [3, 4]}"}


def run(tmp_path: Path, name: str, file: Path, *overrides: str):
    stream = io.StringIO()
    outcome = run_sweep(load_sweep(file, list(overrides)), directory=str(tmp_path / name), stream=stream, progress_interval_s=0.0)
    return outcome, stream.getvalue()


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING and not k.startswith(("prefix/", "best/")) and k not in ("trial_id",)
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def by_config(outcome, keys: list[str]) -> dict[tuple, list[dict]]:
    """Each trial's epoch rows, keyed by its sampled values (trial ids differ between sweeps)."""
    points = {t["trial_id"]: tuple(t[k] for k in keys) for t in outcome.trials}
    rows: dict[tuple, list[dict]] = {}
    for row in outcome.history:
        rows.setdefault(points[row["trial_id"]], []).append(row)
    return {point: sorted(found, key=lambda r: r["epoch"]) for point, found in rows.items()}


# ================================================================================== keys (no Ray)
def test_prefix_key_ignores_post_start_knobs_and_sees_everything_else(tmp_path):
    base = ["augmenter.name=safa", "train.epochs=5", "augmenter.start_epoch=3"]
    key = prefix_of(load_run_config(DIGITS, base)).key
    assert prefix_of(load_run_config(DIGITS, [*base, "augmenter.safa.lambda_recycle=5.0", "augmenter.start_epoch=4"])).key == key
    for change in ("optim.lr=0.05", "train.seed=1", "data.imbalance=20", "model.width=16", "train.epochs=6"):
        assert prefix_of(load_run_config(DIGITS, [*base, change])).key != key, change
    assert prefix_of(load_run_config(DIGITS, [*base, "augmenter.start_epoch=4"])).fork_epoch == 4
    assert prefix_of(load_run_config(DIGITS, ["augmenter.name=safa", "augmenter.start_epoch=0"])) is None  # active from epoch 0
    assert prefix_of(load_run_config(DIGITS, [])) is None  # no method


def test_the_head_ratio_is_in_the_key_only_when_the_loader_draws_with_the_head_mask_before_the_start(tmp_path):
    """SAFA, M2m and RSG read the head mask only once active; before T it reaches training only through a DRS switch
    to the `head_tail` sampler (loss.resample), so gamma splits prefixes exactly when that switch comes before T."""
    for method in ("safa", "m2m", "rsg"):
        base = [f"augmenter.name={method}", "train.epochs=5", "augmenter.start_epoch=3"]

        def key(*extra: str) -> str:
            return prefix_of(load_run_config(DIGITS, [*base, *extra])).key

        assert key("augmenter.head_ratio=0.4") == key("augmenter.head_ratio=0.6"), method
        drs = ["loss.resample.sampler=head_tail", "loss.resample.start_epoch=2"]
        assert key(*drs, "augmenter.head_ratio=0.4") != key(*drs, "augmenter.head_ratio=0.6"), method
        after = ["loss.resample.sampler=head_tail", "loss.resample.start_epoch=3"]  # switches at T: post-T
        assert key(*after, "augmenter.head_ratio=0.4") == key(*after, "augmenter.head_ratio=0.6"), method
        balanced = ["loss.resample.sampler=class_balanced", "loss.resample.start_epoch=0"]  # reads no head mask
        assert key(*balanced, "augmenter.head_ratio=0.4") == key(*balanced, "augmenter.head_ratio=0.6"), method
    smart = ["augmenter.name=smart", "train.epochs=5", "augmenter.start_epoch=3"]  # SMART declares gamma (its fixed pairing)
    assert (prefix_of(load_run_config(DIGITS, [*smart, "augmenter.head_ratio=0.4"])).key
            != prefix_of(load_run_config(DIGITS, [*smart, "augmenter.head_ratio=0.6"])).key)


def test_prefix_key_reads_warm_start_weights_by_content(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    import torch

    from ltsearch.engine import Trainer

    trainer = Trainer(load_run_config(DIGITS, ["train.epochs=1", "model.width=16"]))
    torch.save({"model": trainer.model.state_dict()}, first)
    torch.save({"model": {k: v + 1 for k, v in trainer.model.state_dict().items()}}, second)
    keys = {path: prefix_of(load_run_config(DIGITS, ["augmenter.name=safa", "train.epochs=5", "augmenter.start_epoch=3", "model.width=16",
                                                     f"train.init_from={path}"])).key for path in (first, second)}
    assert keys[first] != keys[second]


def test_check_and_dry_run_print_prefixes_and_epochs_saved(tmp_path, capsys):
    file = sweep_file(tmp_path, **SPACE)
    assert main(["check", str(file)]) == 0
    out = capsys.readouterr().out
    assert "shared prefixes (from 4 trials drawn at random; before early stopping): 1 for 4 of 4 runs; epochs 20 -> " in out
    assert "fork at epoch 3, 4" in out or "fork at epoch 3" in out or "fork at epoch 4" in out
    assert main(["check", str(file), "--set", "share_prefix=false"]) == 0
    assert "shared prefixes: off" in capsys.readouterr().out
    ablation = REPO / "ablations" / "safa_table6.yaml"
    assert main(["ablate", str(ablation), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # the LDAM-DRW row forks the trunk of the five SAFA rows: one trunk of 160 epochs per column and seed
    assert "shared prefixes: 30 for 180 of 180 runs; epochs 36000 -> 12150 (23850 saved, 2.96x fewer" in out
    assert main(["ablate", str(ablation), "--dry-run", "--no-share-prefix"]) == 0
    assert "shared prefixes: off" in capsys.readouterr().out


# ================================================================================== the board
def test_board_gives_the_trunk_to_one_caller_and_wakes_the_others_when_published(ray_runtime):
    board = PrefixBoard.remote()
    first = ray.get(board.claim.remote("k", 3))
    assert first["status"] == TRAIN
    waiting = [board.claim.remote("k", 3) for _ in range(3)]
    later = board.claim.remote("k", 4)  # a later fork epoch joins the running trunk
    ready, _ = ray.wait(waiting + [later], timeout=1.0)
    assert not ready  # they wait inside the actor, no answer yet
    plan = ray.get(board.progress.remote("k", first["token"], 1, 0.1))
    assert plan["target"] == 4 and plan["wanted"] == [3, 4]
    ray.get(board.published.remote("k", first["token"], 3))
    assert [answer["status"] for answer in ray.get(waiting)] == [READY] * 3
    ready, _ = ray.wait([later], timeout=0.5)
    assert not ready
    ray.get(board.published.remote("k", first["token"], 4))
    assert ray.get(later)["status"] == READY
    ray.get(board.release.remote("k", first["token"]))
    assert ray.get(board.summary.remote())["k"]["epochs_trained"] == 1


def test_the_progress_table_shows_a_run_training_its_trunk_before_it_reports(ray_runtime):
    from types import SimpleNamespace

    from ltsearch.tune.progress import ProgressTable
    from ltsearch.tune.settings import Objective

    board = PrefixBoard.remote()
    token = ray.get(board.claim.remote("0123456789abcdef", 24, "t_trunk"))["token"]
    ray.get(board.progress.remote("0123456789abcdef", token, 7, 30.0))
    trials = [SimpleNamespace(trial_id="t_trunk", status="RUNNING", config={}, last_result={"trial_id": "t_trunk"}),  # Tune's own keys
              SimpleNamespace(trial_id="t_done", status="TERMINATED", config={}, last_result={EPOCHS: 30, "val/top1": 70.0})]
    stream = io.StringIO()
    table = ProgressTable(["run_id"], Objective(metric="val/top1", mode="max"), 30, interval_s=0.0, stream=stream, board=board)
    table.on_step_end(0, trials)
    shown = stream.getvalue()
    assert "trunk 01234567 7/24" in shown and "30/30" in shown
    table.on_step_end(1, trials)
    assert stream.getvalue() == shown  # nothing changed: nothing printed again
    ray.get(board.progress.remote("0123456789abcdef", token, 8, 30.0))
    table.on_step_end(2, trials)
    assert "trunk 01234567 8/24" in stream.getvalue()[len(shown):]


def test_board_fails_every_waiter_with_the_trunks_error(ray_runtime):
    board = PrefixBoard.remote()
    owner = ray.get(board.claim.remote("k", 3))
    waiters = [board.claim.remote("k", 3), board.claim.remote("k", 2)]
    time.sleep(0.3)
    ray.get(board.release.remote("k", owner["token"], {"kind": "TrainingDiverged", "error": "train/loss is nan at epoch 1", "details": None}))
    answers = ray.get(waiters)
    assert all(a["status"] == FAILED and a["kind"] == "TrainingDiverged" and "nan at epoch 1" in a["error"] for a in answers)


def test_board_hands_a_stalled_trunk_to_the_next_caller(ray_runtime):
    board = PrefixBoard.remote(stall_s=0.5)
    owner = ray.get(board.claim.remote("k", 3))
    successor = ray.get(board.claim.remote("k", 3), timeout=10)  # no heartbeat for 0.5 s: the owner is presumed lost
    assert successor["status"] == TRAIN and successor["token"] != owner["token"]
    assert ray.get(board.progress.remote("k", owner["token"], 1, 0.1))["target"] == -1  # the old owner is told to stop


def test_board_gives_a_restarted_owner_its_trunk_back_at_once(ray_runtime):
    board = PrefixBoard.remote()  # stall 10 min: only the claimant's name can explain an immediate handover
    owner = ray.get(board.claim.remote("k", 3, "trial_a"))
    other = board.claim.remote("k", 3, "trial_b")
    again = ray.get(board.claim.remote("k", 3, "trial_a"), timeout=10)  # Tune retried trial_a: its old process is gone
    assert again["status"] == TRAIN and again["token"] != owner["token"]
    assert ray.get(board.progress.remote("k", owner["token"], 1, 0.1))["target"] == -1
    ready, _ = ray.wait([other], timeout=0.5)
    assert not ready  # trial_b still waits for the (new) trunk
    ray.get(board.published.remote("k", again["token"], 3))
    assert ray.get(other)["status"] == READY
    anonymous = PrefixBoard.remote()
    first = ray.get(anonymous.claim.remote("k", 3))
    ready, _ = ray.wait([anonymous.claim.remote("k", 3)], timeout=0.5)
    assert first["status"] == TRAIN and not ready  # no names: a second caller waits, as before


@ray.remote(num_cpus=0)
class _TrialProcess:
    """Stands for a Tune trial's actor: `step` is the trial's running step (the trunk trains inside it)."""

    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()

    def step(self, seconds: float) -> None:
        time.sleep(seconds)


def test_board_hands_the_trunk_on_the_moment_its_trainers_process_dies(ray_runtime):
    """No retry and no stall: the owner's actor dies (killed, OOM, node lost) and the waiter takes over.

    The stall is an hour and the waiter is given 2 minutes: only the watch on the actor can hand the trunk over in
    that time (the board looks every second; a loaded machine may take longer, never an hour)."""
    board = PrefixBoard.remote(stall_s=3600.0)
    trainer = _TrialProcess.remote()
    trainer_id = ray.get(trainer.actor_id.remote())
    trainer.step.remote(3600)
    owner = ray.get(board.claim.remote("k", 3, "trial_a", trainer_id))
    waiter = board.claim.remote("k", 3, "trial_b")
    ready, _ = ray.wait([waiter], timeout=2.0)
    assert owner["status"] == TRAIN and not ready  # a live owner inside its step keeps the trunk
    ray.kill(trainer)
    successor = ray.get(waiter, timeout=120)
    assert successor["status"] == TRAIN and successor["token"] != owner["token"]
    assert ray.get(board.progress.remote("k", owner["token"], 1, 0.1))["target"] == -1  # the old token is void


def test_board_leaves_a_trunk_whose_trainer_it_cannot_look_up_to_the_stall_rule(ray_runtime):
    """An actor id the GCS does not know (not a death of it) hands nothing over before the stall.

    The owner beats every 0.2 s for 2.5 s (the watch's first look is at the claim, the next ones every second), so
    a waiter answered in that time was answered by the watch, whatever the machine's load: the stall is 4 s after
    the last beat. Then the beats stop and the stall rule hands the trunk over."""
    board = PrefixBoard.remote(stall_s=4.0)
    owner = ray.get(board.claim.remote("k", 3, "trial_a", "ab" * 16))
    waiter = board.claim.remote("k", 3, "trial_b")
    assert owner["status"] == TRAIN
    beats = 0
    for _ in range(12):
        assert ray.get(board.progress.remote("k", owner["token"], 0, None))["target"] == 3, "the beating owner lost the trunk"
        beats += 1
        ready, _ = ray.wait([waiter], timeout=0.2)
        assert not ready, f"the trunk was handed over after {beats} beats: an actor id that cannot be looked up was taken for dead"
    assert ray.get(waiter, timeout=120)["status"] == TRAIN  # the stall rule, 4 s after the last heartbeat
    assert ray.get(board.progress.remote("k", owner["token"], 1, 0.1))["target"] == -1


# ================================================================================== sweeps
@pytest.mark.slow
def test_a_trunk_whose_snapshot_another_command_published_meanwhile_hands_it_on(ray_runtime, tmp_path, monkeypatch):
    """Commands share the cache: between a run's look at it and its claim, another command may publish the snapshot.
    The trunk then starts at the fork epoch, trains nothing, and must still tell its board the epoch is there
    (before, its run claimed the trunk again, and again, without end)."""
    from ltsearch.prefix.fork import _through_board, open_sharing, start_trainer

    monkeypatch.setenv("LTSEARCH_CACHE", str(tmp_path / "cache"))
    config = load_run_config(DIGITS, ["augmenter.name=safa", "train.epochs=4", "augmenter.start_epoch=2", "model.width=16",
                                      "data.max_train_per_class=40", "data.max_eval_per_class=10"])
    prefix = prefix_of(config)
    start_trainer(config, open_sharing(str(tmp_path / "other"), True, 1))  # the other command trains and publishes it
    mine = open_sharing(str(tmp_path / "mine"), True, 1)
    found: list[Path] = []
    claimant = threading.Thread(target=lambda: found.append(_through_board(prefix, mine, mine.store(), None)), daemon=True)
    claimant.start()  # straight to the board, as if the snapshot had appeared just after start_trainer's look
    claimant.join(timeout=120)
    assert not claimant.is_alive(), "the run kept claiming a trunk whose snapshot is on disk"
    assert found == [mine.store().directory(prefix.key) / f"epoch-{prefix.fork_epoch}.pt"]
    assert ray.get(mine.board.summary.remote())[prefix.key]["epochs_trained"] == 0


def test_sweep_trains_the_prefix_once_and_matches_the_unshared_sweep_bit_for_bit(ray_runtime, tmp_path):
    file = sweep_file(tmp_path, **SPACE)
    shared, log = run(tmp_path, "shared", file)
    alone, _ = run(tmp_path, "alone", file, "share_prefix=false")
    assert "shared prefixes: 4 run(s) forked from 1 prefix(es); their trunks trained 4 epoch(s) in this session" in log
    summary = json.loads((tmp_path / "shared" / "prefixes" / "summary.json").read_text())
    (entry,) = summary.values()
    assert entry["epochs_trained"] == 4 and entry["forks"] == 4  # one trunk to epoch 4, four forks, nothing trained twice
    assert not (tmp_path / "alone" / "prefixes").exists()
    keys = list(SPACE)
    ours, theirs = by_config(shared, keys), by_config(alone, keys)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for point, rows in ours.items():
        start = point[1]
        assert [r["epoch"] for r in rows] == list(range(5))
        assert [bool(r.get(SHARED_PREFIX)) for r in rows] == [e < start for e in range(5)]  # the prefix epochs, marked
        assert [comparable(r) for r in rows] == [comparable(r) for r in theirs[point]]  # every number identical
        assert all(r[ACTIVE_EPOCHS] == r[EPOCHS] - start for r in rows)
    assert shared.best["config"] == alone.best["config"] and shared.best["best/val/top1"] == alone.best["best/val/top1"]


def own_trainables() -> list[int]:
    """The pids of this test's Ray trainables: workers of its own raylet only (a `pkill -f ray::ImplicitFunc` would
    also kill the trainings of anyone else on the machine: another test run, a user's ablation)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if title.startswith(b"ray::ImplicitFunc") and parent == raylet:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_trunk_killed_mid_way_is_taken_back_by_its_retried_trial_and_changes_no_number(ray_runtime, tmp_path):
    """SIGKILL the process training the trunk after its snapshot at epoch 2 of 8: Tune retries that trial
    (max_failures 1), the board hands it the trunk back at once (not after the 10-minute stall), the trunk
    resumes from its latest snapshot, and every trial's numbers equal those of the sweep without sharing."""
    lines = [f"base: {DIGITS}", "name: safa_killed", "augmenter: {name: safa, start_epoch: 8}", "train: {epochs: 10}",
             "model: {width: 16}", "space:", "  augmenter.safa.lambda_recycle: {loguniform: [10.0, 1000.0]}",
             "search: {sampler: random, num_samples: 2, seed: 0, max_concurrent: 1}", "scheduler: {name: fifo}",
             "resources: {cpu: 1}", "checkpoint: {every: 1}", "max_failures: 1", "tracking: {enabled: false}"]
    file = tmp_path / "safa_killed.yaml"
    file.write_text("\n".join(lines) + "\n")
    prefixes = tmp_path / "shared" / "prefixes"
    seen: dict[str, object] = {}

    def kill_the_trunk() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(prefixes.glob("*/epoch-2.pt")):
            time.sleep(0.01)
        seen["before_kill"] = sorted(p.name for p in prefixes.glob("*/epoch-*.pt"))
        trainers = own_trainables()
        for pid in trainers:
            os.kill(pid, signal.SIGKILL)
        seen["killed"] = bool(trainers)

    killer = threading.Thread(target=kill_the_trunk, daemon=True)
    killer.start()
    started = time.monotonic()
    shared, log = run(tmp_path, "shared", file)
    elapsed = time.monotonic() - started
    killer.join(timeout=5)
    assert seen.get("killed") and "epoch-8.pt" not in seen["before_kill"], seen  # killed mid-trunk, before T
    assert elapsed < 300, elapsed  # far less than the 600 s stall a lost owner costs
    (entry,) = json.loads((prefixes / "summary.json").read_text()).values()
    assert 8 <= entry["epochs_trained"] <= 9 and entry["forks"] == 2, entry  # resumed, not restarted: at most the killed epoch again
    alone, _ = run(tmp_path, "alone", file, "share_prefix=false")
    keys = ["augmenter.safa.lambda_recycle"]
    ours, theirs = by_config(shared, keys), by_config(alone, keys)
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for point, rows in ours.items():
        assert [r["epoch"] for r in rows] == list(range(10))
        assert [comparable(r) for r in rows] == [comparable(r) for r in theirs[point]]


@pytest.mark.slow
def test_a_later_sweep_forks_from_the_cache_and_tracks_shared_epochs_once(ray_runtime, tmp_path, mlflow_store):
    file = sweep_file(tmp_path, **{"augmenter.safa.lambda_recycle": "{loguniform: [10.0, 1000.0]}"})
    first, _ = run(tmp_path, "first", file)
    second, log = run(tmp_path, "second", file, "tracking.enabled=true")
    assert "4 run(s) forked from 1 prefix(es); their trunks trained 0 epoch(s) in this session (all found" in log  # from the cache
    assert (tmp_path / "second" / "prefixes").is_dir()
    assert [comparable(r) for r in first.history if r["epoch"] < 3] == [comparable(r) for r in second.history if r["epoch"] < 3]
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("safa_share").experiment_id])
    prefix_runs = [r for r in runs if r.data.tags.get("ltsearch.kind") == "prefix"]
    trials = [r for r in runs if r.data.tags.get("ltsearch.kind") == "trial"]
    assert len(prefix_runs) == 1 and len(trials) == 4
    (prefix_run,) = prefix_runs
    assert sorted(m.step for m in client.get_metric_history(prefix_run.info.run_id, "val/top1")) == [0, 1, 2]
    for trial in trials:
        assert trial.data.tags["ltsearch.prefix_key"] == prefix_run.data.tags["ltsearch.prefix_key"]
        assert trial.data.tags["ltsearch.prefix_run"] == prefix_run.info.run_id
        assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, "val/top1")) == [3, 4]


@pytest.mark.slow
def test_asha_rungs_count_from_the_start_epoch(ray_runtime, tmp_path):
    file = sweep_file(tmp_path, **{"augmenter.safa.lambda_recycle": "{loguniform: [10.0, 1000.0]}"})
    outcome, _ = run(tmp_path, "asha", file, "scheduler={name: asha, grace_period: 1, reduction_factor: 2}", "search.num_samples=4")
    stopped = [t for t in outcome.trials if t["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial: the test shows nothing"
    for trial in stopped:  # judged at its first rung: one epoch after the method started at epoch 3
        assert trial["epochs"] == 4
    for row in outcome.history:
        assert row[ACTIVE_EPOCHS] == row[EPOCHS] - 3


# ================================================================================== ablations
def ablation(tmp_path: Path, *overrides: str):
    raw = read_yaml(REPO / "ablations" / "examples" / "digits_losses.yaml")
    raw.update({"augmenter": {"name": "safa", "start_epoch": 2}, "rows": {"full": {}, "w/o L_r": {"augmenter.safa.lambda_recycle": 0.0}},
                "seeds": {"train": [0], "data": [0]}, "tracking": {"enabled": False}})
    for key in ("baseline", "columns"):
        raw.pop(key, None)
    raw.setdefault("train", {})["epochs"] = 3
    for item in overrides:
        key, value = item.split("=", 1)
        raw.setdefault(key.split(".")[0], {})[key.split(".")[1]] = float(value)
    return parse_ablation(raw, source=str(tmp_path / "a.yaml"))


@pytest.mark.slow
def test_ablation_rows_share_a_prefix_and_a_diverging_prefix_fails_every_row_with_its_error(ray_runtime, tmp_path):
    outcome = run_ablation(ablation(tmp_path), directory=str(tmp_path / "ok"), stream=io.StringIO(), progress_interval_s=0.0)
    assert all(r.status == "completed" for r in outcome.results)
    histories = [read_table(path) for path in sorted((tmp_path / "ok" / "runs").glob("*/history.parquet"))]
    assert len(histories) == 2
    assert [comparable(r) for r in histories[0][:2]] == [comparable(r) for r in histories[1][:2]]
    assert all(r.get(SHARED_PREFIX) == 1 and r.get(PREFIX_KEY) for h in histories for r in h[:2])
    run_ablation(ablation(tmp_path, "optim.lr=1e8"), directory=str(tmp_path / "nan"), stream=io.StringIO(), progress_interval_s=0.0)
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "nan" / "runs").glob("*/result.json"))]
    assert len(results) == 2 and all(r["status"] == "error" for r in results)
    assert all(r["error"].startswith("training diverged in epoch 1/3") for r in results)
    # the dependent got the trunk's error, not its own; SAFA is idle before T, so its trunk is the baseline's
    assert sum("in the shared prefix baseline@2:" in r["error"] for r in results) == 1


# ============================================================== the method-off run on the shared trunk
@pytest.mark.slow
def test_the_baseline_row_forks_the_methods_trunk_and_equals_the_baseline_trained_alone(ray_runtime, tmp_path):
    raw = read_yaml(REPO / "ablations" / "examples" / "digits_losses.yaml")
    raw.update({"augmenter": {"name": "safa", "start_epoch": 2}, "seeds": {"train": [0], "data": [0]}, "tracking": {"enabled": False},
                "rows": {"LDAM-DRW": {"augmenter.name": "none"}, "+ SAFA": {}, "+ M2m": {"augmenter.name": "m2m"}}, "baseline": "LDAM-DRW"})
    raw.pop("columns", None)
    raw.setdefault("train", {})["epochs"] = 4
    outcomes = {}
    for name, share in (("shared", True), ("alone", False)):
        outcomes[name] = run_ablation(parse_ablation({**raw, "share_prefix": share}, source=str(tmp_path / "a.yaml")),
                                      directory=str(tmp_path / name), stream=io.StringIO(), progress_interval_s=0.0)
        assert all(r.status == "completed" for r in outcomes[name].results)
    (entry,) = json.loads((tmp_path / "shared" / "prefixes" / "summary.json").read_text()).values()
    assert entry["epochs_trained"] == 2 and entry["forks"] == 3  # one trunk of T = 2 epochs for all three rows
    histories = {name: {path.parent.name.split("__")[0]: read_table(path) for path in (tmp_path / name / "runs").glob("*/history.parquet")}
                 for name in outcomes}
    keys = {row: {r.get(PREFIX_KEY) for r in history[:2]} for row, history in histories["shared"].items()}
    assert len({key for found in keys.values() for key in found}) == 1 and None not in keys["LDAM-DRW"]
    for row in ("LDAM-DRW", "SAFA", "M2m"):  # forked or not, every number of every epoch is the same
        assert [comparable(r) for r in histories["shared"][row]] == [comparable(r) for r in histories["alone"][row]], row
    assert [comparable(r.metrics) for r in outcomes["shared"].results] == [comparable(r.metrics) for r in outcomes["alone"].results]


@pytest.mark.slow
def test_a_sweep_over_the_method_forks_its_baseline_trials_from_the_shared_trunk(ray_runtime, tmp_path):
    lines = [f"base: {DIGITS}", "name: method_choice", "augmenter: {start_epoch: 2}", "train: {epochs: 4}", "model: {width: 16}",
             "space:", "  augmenter.name: {grid: [none, safa, m2m]}", "search: {sampler: random, num_samples: 1, seed: 0, max_concurrent: 1}",
             "scheduler: {name: fifo}", "resources: {cpu: 1}", "checkpoint: {every: 1}", "tracking: {enabled: false}"]
    file = tmp_path / "method_choice.yaml"
    file.write_text("\n".join(lines) + "\n")
    shared, log = run(tmp_path, "shared", file)
    alone, _ = run(tmp_path, "alone", file, "share_prefix=false")
    assert "shared prefixes: 3 run(s) forked from 1 prefix(es); their trunks trained 2 epoch(s) in this session" in log
    ours, theirs = by_config(shared, ["augmenter.name"]), by_config(alone, ["augmenter.name"])
    assert sorted(ours) == [("m2m",), ("none",), ("safa",)]
    assert len({r[PREFIX_KEY] for rows in ours.values() for r in rows if r.get(SHARED_PREFIX)}) == 1
    for point, rows in ours.items():
        assert [comparable(r) for r in rows] == [comparable(r) for r in theirs[point]], point
