"""End-to-end CLI runs: `ltsearch train` and `ltsearch data` as a user types them (subprocesses)."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
LTSEARCH = [sys.executable, "-m", "ltsearch.cli"]


def ltsearch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*LTSEARCH, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_train_writes_metrics_history_config_and_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = ltsearch("train", "configs/digits.yaml", "--set", "train.epochs=2", "--set", "train.device=cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "epoch   2/2" in proc.stdout and re.search(r"done: best epoch [12]/2 by val/top1", proc.stdout), proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val/top1", "test/top1", "test/bacc", "test/gm", "test/many", "test/medium", "test/few"):
        assert key in metrics["final"] and key in metrics["best"]
    assert metrics["epochs_run"] == 2 and metrics["select_metric"] == "val/top1"
    history = pq.read_table(out / "history.parquet").to_pylist()
    assert [row["epoch"] for row in history] == [0, 1]
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()


def test_resume_continues_a_run_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert ltsearch("train", "--set", "train.epochs=1", "--set", "train.device=cpu", "--out", str(out)).returncode == 0
    again = ltsearch("train", "--set", "train.epochs=1", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = ltsearch("train", "--resume", str(out), "--set", "train.epochs=3")
    assert resumed.returncode == 0, resumed.stderr
    assert [row["epoch"] for row in pq.read_table(out / "history.parquet").to_pylist()] == [0, 1, 2]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "data.imbalance=0.5"], "config key 'data.imbalance': got 0.5"),
        (["--set", "augmenter.head_ratio=1.5"], "config key 'augmenter.head_ratio'"),
        (["--set", "optim.lr=-1"], "config key 'optim.lr'"),
        (["--set", "model.depth=3"], "config key 'model.depth'"),
        (["--set", "optim.lr"], "dotted.key=value"),
        (["configs/does_not_exist.yaml"], "does_not_exist.yaml"),
    ],
)
def test_bad_input_is_one_clear_error_exit_2_and_nothing_written(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "never"
    proc = ltsearch("train", *args, "--out", str(out))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not out.exists()


def test_data_prints_the_construction_as_json() -> None:
    proc = ltsearch("data", "configs/digits.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    train = summary["counts"]["train"]
    assert summary["num_classes"] == 10 and len(train) == 10
    assert train == sorted(train, reverse=True) and round(train[0] / train[-1]) == 10


@pytest.mark.cifar
def test_data_on_the_real_cifar10_files(cifar_root: Path) -> None:
    proc = ltsearch("data", "configs/cifar10_lt.yaml", "--set", f"data.root={cifar_root}", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["counts"]["train"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(summary["counts"]["val"]) + sum(summary["counts"]["test"]) == 10000
    assert summary["counts"]["val"] == [100] * 10


@pytest.mark.slow
@pytest.mark.parametrize(("config", "floor"), [("configs/digits.yaml", 80.0), ("configs/digits_ldam_drw.yaml", 80.0)])
def test_digits_default_trains_to_plausible_accuracy(tmp_path: Path, config: str, floor: float) -> None:
    """The 'done when' check: the full shipped digits configs (CE and LDAM-DRW) learn the long-tailed problem."""
    proc = ltsearch("train", config, "--set", "train.device=cpu", "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["best"]
    assert best["test/bacc"] > floor
    assert best["test/few"] is not None


def test_several_overrides_follow_one_set_and_positionals_may_follow_them() -> None:
    from ltsearch.cli._common import expand_overrides

    assert expand_overrides(["runs", "--set", "tracking.uri=x", "a.b=1", "NAME"]) == ["runs", "--set", "tracking.uri=x", "--set", "a.b=1", "NAME"]
    assert expand_overrides(["tune", "f.yaml", "--set", "a=1", "b={x: 1}", "--out", "d", "--set", "c=2"]) == \
        ["tune", "f.yaml", "--set", "a=1", "--set", "b={x: 1}", "--out", "d", "--set", "c=2"]
    assert expand_overrides(["train", "--set", "bad", "f.yaml"]) == ["train", "--set", "bad", "f.yaml"]  # reported as a bad override


def test_an_error_in_an_override_names_the_command_line_not_the_file(tmp_path, capsys) -> None:
    from ltsearch.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    assert main(["train", config, "--set", "optim.lr=.nan", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--set optim.lr=.nan: config key 'optim.lr'" in err and "digits.yaml" not in err
    assert main(["train", config, "--set", "optim.momentum=2", "--out", str(tmp_path / "run")]) == 2  # still the override
    assert "--set optim.momentum=2" in capsys.readouterr().err
