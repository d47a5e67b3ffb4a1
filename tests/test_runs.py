"""`ltsearch runs`: a real sqlite store written with the MLflow client the way `ltsearch tune` writes it.

`make_store` is shared with tests/test_ui.py: it follows the tag contract of ltsearch/tracking/settings.py
(a sweep parent, trials as nested children, a train run), so both commands are tested against the shape
the store really has, not against a mock of MLflow.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ltsearch.cli import main
from ltsearch.tracking.settings import (TAG_COMMAND, TAG_DIR, TAG_EPOCHS, TAG_ERROR, TAG_KIND, TAG_METRIC, TAG_MODE,
                                        TAG_SELECTED_EPOCH, TAG_STOPPED_EARLY, TAG_TRIAL, TrackingConfig)

T0 = 1_767_261_600_000  # 2026-01-01 10:00 UTC in ms: fixed start times make "latest" deterministic


@dataclass(frozen=True)
class Store:
    """What make_store wrote: the URI to pass as tracking.uri and the ids the tests look for."""

    root: Path
    uri: str
    experiment_id: str
    sweep_id: str
    sweep_name: str
    sweep_dir: Path
    old_sweep_name: str
    train_name: str
    children: dict[str, str]  # run name -> run id, of the latest sweep
    plot: bytes = field(repr=False)  # the per_class_accuracy.png logged on every trial


def per_class_png(accuracies: list[float]) -> bytes:
    """A real matplotlib bar chart, as the trainer logs it (the UI test compares these bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4, 2.5), dpi=80)
    axes.bar(range(len(accuracies)), accuracies, color="tab:blue")
    axes.set_xlabel("class (many -> few)")
    axes.set_ylabel("top-1 %")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _client(uri: str):
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_trial(client, experiment_id: str, parent: str, name: str, *, start: int, status: str, trial: str,
               params: dict[str, str], curve: list[float], tags: dict[str, str], plot: Path) -> str:
    """One child run: params, per-epoch metrics, best/ summaries at the best epoch, tags, artifacts, status."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, run_name=name, start_time=start,
                            tags={"mlflow.parentRunId": parent, TAG_KIND: "trial", TAG_TRIAL: trial, TAG_METRIC: "val/top1", TAG_MODE: "max"})
    run_id = run.info.run_id
    metrics = [Metric(key, value, start + epoch, epoch) for epoch, top1 in enumerate(curve)
               for key, value in (("train/loss", 2.0 - top1 / 100), ("val/top1", top1), ("test/top1", top1 - 1.5), ("lr", 0.05))]
    best = max(range(len(curve)), key=curve.__getitem__) if curve else None
    if best is not None:
        metrics += [Metric("best/val/top1", curve[best], start, 0), Metric("best/test/top1", curve[best] - 1.5, start, 0)]
        tags = {TAG_SELECTED_EPOCH: str(best), TAG_EPOCHS: str(len(curve)), **tags}
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    client.log_artifact(run_id, str(plot))
    client.set_terminated(run_id, status=status, end_time=start + 60_000)
    return run_id


def make_store(root: Path) -> Store:
    """A store as `ltsearch tune` and `ltsearch train` leave it, in root/mlruns.db (artifacts in root/mlartifacts)."""
    from mlflow.entities import Metric

    settings = TrackingConfig(uri="sqlite:///mlruns.db")
    uri, artifacts = settings.resolved_uri(root), settings.artifact_root(root)
    client = _client(uri)
    plot_bytes = per_class_png([90.0, 80.0, 62.0, 41.0, 20.0])
    plot = root / "per_class_accuracy.png"
    plot.write_bytes(plot_bytes)
    experiment_id = client.create_experiment("quickstart", artifact_location=artifacts)
    common = {"model.name": "resnet8", "data.name": "digits", "train.epochs": "4"}

    old_dir = root / "runs" / "quickstart-20260101-100000"
    old = client.create_run(experiment_id, run_name=old_dir.name, start_time=T0,
                            tags={TAG_KIND: "sweep", TAG_DIR: str(old_dir), TAG_METRIC: "val/top1", TAG_MODE: "max"})
    _log_trial(client, experiment_id, old.info.run_id, "ce lr=0.1", start=T0 + 1000, status="FINISHED", trial="t0",
               params={**common, "augmenter.name": "none", "optim.lr": "0.1"}, curve=[30.0, 40.0], tags={}, plot=plot)
    client.set_terminated(old.info.run_id, status="FINISHED", end_time=T0 + 120_000)

    ablation_experiment = client.create_experiment("ablate-losses", artifact_location=artifacts)
    ablation = client.create_run(ablation_experiment, run_name="ablate-losses-20260101-090000", start_time=T0 - 3_600_000,
                                 tags={TAG_KIND: "ablation", TAG_DIR: str(root / "runs" / "ablate-losses-20260101-090000"),
                                       TAG_METRIC: "train/loss", TAG_MODE: "min"})
    for index, (name, loss) in enumerate((("ce seed=0", 0.5), ("ldam seed=0", 0.3))):
        cell = client.create_run(ablation_experiment, run_name=name, start_time=T0 - 3_500_000 + index,
                                 tags={"mlflow.parentRunId": ablation.info.run_id, TAG_KIND: "cell"})
        client.log_batch(cell.info.run_id, metrics=[Metric("best/train/loss", loss, T0, 0)], synchronous=True)
        client.set_terminated(cell.info.run_id, status="FINISHED")
    client.set_terminated(ablation.info.run_id, status="FINISHED")
    client.create_run("0", run_name="not-ltsearch", start_time=T0 + 9_000_000)  # a run of some other tool: never listed

    train_experiment = client.create_experiment("digits", artifact_location=artifacts)
    train = client.create_run(train_experiment, run_name="digits-20260101-110000", start_time=T0 + 3_600_000,
                              tags={TAG_KIND: "train", TAG_DIR: str(root / "runs" / "digits-20260101-110000"), TAG_METRIC: "val/top1",
                                    TAG_MODE: "max", TAG_EPOCHS: "3", TAG_SELECTED_EPOCH: "2"})
    client.log_batch(train.info.run_id, metrics=[Metric("best/val/top1", 55.5, T0, 0), Metric("best/test/top1", 54.25, T0, 0)], synchronous=True)
    client.set_terminated(train.info.run_id, status="FINISHED", end_time=T0 + 3_700_000)

    sweep_dir = root / "runs" / "quickstart-20260101-120000"
    start = T0 + 7_200_000
    sweep = client.create_run(experiment_id, run_name=sweep_dir.name, start_time=start,
                              tags={TAG_KIND: "sweep", TAG_DIR: str(sweep_dir), TAG_METRIC: "val/top1", TAG_MODE: "max",
                                    TAG_COMMAND: "ltsearch tune search_spaces/quickstart.yaml"})
    sweep_id = sweep.info.run_id
    children = {}
    trials = (("smart tau=0.31 lr=0.05", "FINISHED", {"augmenter.name": "smart", "augmenter.tau": "0.31", "optim.lr": "0.05"},
               [40.0, 61.0, 71.25, 70.0], {}),
              ("rsg lr=0.2", "FINISHED", {"augmenter.name": "rsg", "augmenter.tau": "null", "optim.lr": "0.2"},
               [35.0, 48.5], {TAG_STOPPED_EARLY: "true"}),
              ("m2m lr=0.9", "FAILED", {"augmenter.name": "m2m", "augmenter.tau": "null", "optim.lr": "0.9"},
               [], {TAG_ERROR: "training diverged in epoch 1/4, step 3/10: non-finite loss term(s) cls = nan"}))
    for index, (name, status, params, curve, tags) in enumerate(trials):
        children[name] = _log_trial(client, experiment_id, sweep_id, name, start=start + 1000 * (index + 1), status=status,
                                    trial=f"t{index}", params={**common, **params}, curve=curve, tags=tags, plot=plot)
    client.set_terminated(sweep_id, status="FINISHED", end_time=start + 300_000)
    return Store(root=root, uri=uri, experiment_id=experiment_id, sweep_id=sweep_id, sweep_name=sweep_dir.name, sweep_dir=sweep_dir,
                 old_sweep_name=old_dir.name, train_name=train.info.run_name, children=children, plot=plot_bytes)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(tmp_path_factory.mktemp("store"))


def runs(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["runs", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def test_overview_lists_top_level_runs_newest_first(store: Store, capsys: pytest.CaptureFixture) -> None:
    code, out, err = runs(capsys, "--set", f"tracking.uri={store.uri}")
    assert code == 0, err
    header, *lines = rows(out)
    assert header.split() == ["KIND", "NAME", "EXPERIMENT", "STATUS", "STARTED", "CHILDREN", "BEST", "OBJECTIVE", "TEST/TOP1", "DIR"]
    assert [line.split()[1] for line in lines] == [store.sweep_name, store.train_name, store.old_sweep_name, "ablate-losses-20260101-090000"]
    latest, train, old, ablation = lines
    assert latest.startswith("sweep") and "quickstart" in latest and "FINISHED" in latest
    assert "2 finished, 1 failed" in latest and "smart tau=0.31 lr=0.05" in latest and "val/top1 71.25" in latest and "69.75" in latest
    assert str(store.sweep_dir) in latest
    assert train.startswith("train") and "val/top1 55.50" in train and "54.25" in train
    assert "1 finished" in old and "ce lr=0.1" in old and "val/top1 40.00" in old
    assert ablation.startswith("ablation") and "ldam seed=0" in ablation and "train/loss 0.30" in ablation  # mode min: lowest wins
    assert "not-ltsearch" not in out


def test_limit(store: Store, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = runs(capsys, "--set", f"tracking.uri={store.uri}", "--limit", "1")
    assert code == 0
    assert len(rows(out)) == 2 and store.sweep_name in rows(out)[1]


def test_experiment_name_shows_the_newest_sweep_trials_best_first(store: Store, capsys: pytest.CaptureFixture) -> None:
    code, out, err = runs(capsys, "quickstart", "--set", f"tracking.uri={store.uri}")
    assert code == 0, err
    lines = rows(out)
    assert lines[0].startswith(f"sweep {store.sweep_name} (experiment quickstart, FINISHED")
    assert "newest of 2 runs in experiment quickstart" in lines[1]
    assert lines[2].startswith("3 trials (2 finished, 1 failed), sorted by best/val/top1, highest first")
    header, best, stopped, failed = lines[3:]
    columns = header.split()
    assert columns[:8] == ["#", "NAME", "STATUS", "best/val/top1", "best/test/top1", "EPOCHS", "SELECTED", "STOPPED"]
    assert columns[8:] == ["augmenter.name", "augmenter.tau", "optim.lr", "ERROR"]  # only the params that differ
    assert best.split() == ["1", "smart", "tau=0.31", "lr=0.05", "FINISHED", "71.25", "69.75", "4", "3", "smart", "0.31", "0.05"]
    assert stopped.split() == ["2", "rsg", "lr=0.2", "FINISHED", "48.50", "47.00", "2", "2", "early", "rsg", "null", "0.2"]
    assert failed.split()[:7] == ["3", "m2m", "lr=0.9", "FAILED", "-", "-", "-"]
    assert failed.endswith("training diverged in epoch 1/4, step 3/10: non-finite loss term(s) cls = nan")


def test_directory_and_run_name_pick_one_run(store: Store, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(store.root)
    code, out, err = runs(capsys, f"runs/{store.old_sweep_name}", "--set", f"tracking.uri={store.uri}")  # relative: resolved first
    assert code == 0, err
    lines = rows(out)
    assert lines[0].startswith(f"sweep {store.old_sweep_name} (") and f"dir runs/{store.old_sweep_name}" in lines[0]
    assert lines[1].startswith("1 trial (1 finished)") and rows(out)[3].split()[1:3] == ["ce", "lr=0.1"]

    code, out, _ = runs(capsys, store.sweep_name, "--set", f"tracking.uri={store.uri}")
    assert code == 0 and rows(out)[0].startswith(f"sweep {store.sweep_name} (") and "newest of" not in out

    code, out, _ = runs(capsys, store.train_name, "--set", f"tracking.uri={store.uri}")
    assert code == 0 and rows(out)[1] == "a single run: best/val/top1 55.50, best/test/top1 54.25"


def test_unknown_name_is_exit_2_naming_it(store: Store, capsys: pytest.CaptureFixture) -> None:
    code, out, err = runs(capsys, "no-such-sweep", "--set", f"tracking.uri={store.uri}")
    assert code == 2 and out == ""
    assert err.startswith("ltsearch runs: error:") and "'no-such-sweep'" in err and len(err.strip().splitlines()) == 1


def test_missing_store_is_exit_2_and_not_created(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nothing-here.db"
    code, _, err = runs(capsys, "--set", f"tracking.uri=sqlite:///{missing}")
    assert code == 2 and "tracking.uri" in err and str(missing) in err
    assert not missing.exists()


def test_only_tracking_keys_can_be_set(capsys: pytest.CaptureFixture) -> None:
    code, _, err = runs(capsys, "--set", "optim.lr=0.1")
    assert code == 2 and "'--set'" in err and "tracking.*" in err
