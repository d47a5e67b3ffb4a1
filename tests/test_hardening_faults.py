"""Faults survived and runs repeated: real `ltsearch train` processes, killed and resumed, or run twice.

- SIGKILL in the middle of an epoch, then `--resume`: the final metrics equal an uninterrupted run's, bit for bit.
- A truncated newest checkpoint on `--resume`: detected, said so in one line, the previous checkpoint used, and
  the run still ends exactly as an uninterrupted one.
- The same config and seed give identical metrics on CPU (1 and 2 torch threads), and a seeded sampler with
  `search.max_concurrent: 1` proposes the same configurations in two sweeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_hardening_support import truncate

REPO = Path(__file__).resolve().parents[1]
RUN = ["train.device=cpu", "train.epochs=6", "model.width=48", "train.threads=1", "tracking.enabled=false"]
TIMING = ("epoch_seconds", "images_per_s")  # wall-clock measurements: the only values allowed to differ


def ltsearch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ltsearch.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def outcome(run: Path) -> tuple[dict, list[dict]]:
    """(metrics.json without timings, history rows without timings)."""
    metrics = json.loads((run / "metrics.json").read_text())
    for part in ("final", "best"):
        for key in TIMING:
            metrics[part].pop(key, None)
    history = [{k: v for k, v in row.items() if k not in TIMING} for row in pq.read_table(run / "history.parquet").to_pylist()]
    return metrics, history


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every fault scenario must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = ltsearch("train", "--set", *RUN, "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_exactly_like_an_uninterrupted_run(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ltsearch.cli", "train", "--set", *RUN, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in process.stdout:  # the progress line of epoch 2 is printed after its checkpoint was written
            if line.startswith("epoch   2/6"):
                time.sleep(0.15)  # into epoch 3
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    killed_after = len(pq.read_table(out / "history.parquet"))
    assert 2 <= killed_after < 6

    resumed = ltsearch("train", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"
    assert outcome(out) == outcome(reference)


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_resumes_exactly(reference: Path, tmp_path: Path) -> None:
    out = shutil.copytree(reference, tmp_path / "run")
    assert (out / "checkpoint.prev.pt").is_file(), "the checkpoint before the newest is kept"
    truncate(out / "checkpoint.pt", 0.3)
    (out / "metrics.json").unlink()

    resumed = ltsearch("train", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and "truncated or corrupt" in warning[0] and "checkpoint.prev.pt (after epoch 5)" in warning[0], resumed.stderr
    assert outcome(out) == outcome(reference)


def test_both_checkpoints_unreadable_is_one_clear_error(reference: Path, tmp_path: Path) -> None:
    out = shutil.copytree(reference, tmp_path / "run")
    truncate(out / "checkpoint.pt", 0.3)
    truncate(out / "checkpoint.prev.pt", 0.3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    resumed = ltsearch("train", "--resume", str(out), "--set", "train.epochs=7")
    assert resumed.returncode == 2
    assert len(resumed.stderr.strip().splitlines()) == 1 and "checkpoint.pt': it is truncated or corrupt" in resumed.stderr, resumed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("threads", [1, 2])
def test_the_same_config_and_seed_give_identical_metrics_on_cpu(tmp_path: Path, threads: int) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = ltsearch("train", "--set", "train.device=cpu", "train.epochs=3", "model.width=16", f"train.threads={threads}",
                        "tracking.enabled=false", "--quiet", "--out", str(out))
        assert done.returncode == 0, done.stderr
        runs.append(outcome(out))
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_a_seeded_sampler_proposes_the_same_configurations_in_two_sweeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ltsearch.tune import load_sweep, run_sweep
    from ltsearch.tune.session import ray_session

    monkeypatch.setenv("LTSEARCH_CACHE", str(tmp_path / "cache"))
    overrides = ["train.epochs=1", "search.num_samples=4", "search.max_concurrent=1", "search.seed=7", "scheduler={name: fifo}",
                 "tracking.enabled=false", "space.model.width={choice: [8, 16]}"]
    sampled = []
    with ray_session(None):
        for name in ("first", "second"):
            outcome_ = run_sweep(load_sweep(REPO / "search_spaces" / "quickstart.yaml", overrides), directory=str(tmp_path / name),
                                 stream=open(os.devnull, "w"), progress_interval_s=0.0)
            assert outcome_.finished and len(outcome_.trials) == 4
            keys = ("model.width", "optim.lr", "optim.weight_decay", "loss.name", "loss.ldam.max_m")
            sampled.append([tuple(t.get(k) for k in keys) for t in outcome_.trials])  # Ray's result grid: creation order
    assert sampled[0] == sampled[1]
    assert len(set(sampled[0])) == 4  # four distinct proposals, not one repeated
