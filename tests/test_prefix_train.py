"""`ltsearch train` shares prefixes through the cache: a run publishes its state at its fork epoch T, and a later
run of the same prefix key continues from it, exactly as it would have trained [0, T) itself.

RSG trains its modules before T (the fork takes them from the snapshot), SAFA does not (the fork keeps its own);
run B changes a post-T knob of A, so both share A's key. B forked from A's snapshot must equal B trained with
--no-share-prefix bit for bit on CPU: every per-epoch metric but timing, and the final weights.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from ltsearch.checkpoints import read_checkpoint
from ltsearch.cli import main
from ltsearch.prefix import PREFIX_KEY, SHARED_PREFIX

REPO = Path(__file__).resolve().parents[1]
T, EPOCHS = 2, 4
BASE = ["train.device=cpu", "train.threads=1", f"train.epochs={EPOCHS}", "data.max_train_per_class=40", "data.max_eval_per_class=10",
        "optim.batch_size=32", "model.width=16", f"augmenter.start_epoch={T}"]
#: per method: A's post-T knob value, then B's (the prefix key leaves both out)
KNOBS = {"rsg": ("augmenter.rsg.lambda_mv=0.01", "augmenter.rsg.lambda_mv=1.0", "augmenter.rsg.num_centers=3",
                 "augmenter.rsg.contrastive_channels=16"),
         "safa": ("augmenter.safa.lambda_recycle=100.0", "augmenter.safa.lambda_recycle=10.0")}
TIMING = ("epoch_seconds", "images_per_s")


def train(out: Path, method: str, knob: str, *extra: str) -> int:
    sets = [item for value in [f"augmenter.name={method}", knob, *KNOBS[method][2:], *BASE] for item in ("--set", value)]
    return main(["train", str(REPO / "configs" / "digits.yaml"), *sets, "--out", str(out), "--quiet", *extra])


def epochs(out: Path) -> list[dict]:
    """Every per-epoch value but timing and the sharing markers (lists as lists, a key a run lacks as absent)."""
    rows = pd.read_parquet(out / "history.parquet").to_dict("records")
    return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()
             if k not in (*TIMING, SHARED_PREFIX, PREFIX_KEY) and not (isinstance(v, float) and v != v)} for row in rows]


@pytest.mark.parametrize("method", ["rsg", "safa"])
def test_a_run_publishes_its_prefix_and_a_later_run_forks_from_it_exactly(method: str, tmp_path: Path, monkeypatch, capsys) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LTSEARCH_CACHE", str(cache))
    knob_a, knob_b = KNOBS[method][:2]

    assert train(tmp_path / "a", method, knob_a) == 0
    published = list((tmp_path / "a" / "prefixes").glob(f"*/epoch-{T}.pt"))
    assert len(published) == 1 and read_checkpoint(published[0])["epoch"] == T
    assert (cache / "prefixes" / published[0].parent.name / published[0].name).is_file()
    assert "publishes the shared prefix" in capsys.readouterr().out

    assert train(tmp_path / "b", method, knob_b) == 0
    assert f"epochs 1-{T}: the shared prefix" in capsys.readouterr().out
    forked = pd.read_parquet(tmp_path / "b" / "history.parquet")
    assert forked[SHARED_PREFIX].fillna(0).tolist() == [1] * T + [0] * (EPOCHS - T)
    assert set(forked[PREFIX_KEY].dropna()) == {published[0].parent.name}

    assert train(tmp_path / "c", method, knob_b, "--no-share-prefix") == 0
    assert not (tmp_path / "c" / "prefixes").exists()
    assert epochs(tmp_path / "b") == epochs(tmp_path / "c")
    weights_b, weights_c = (read_checkpoint(tmp_path / run / "checkpoint.pt")["model"] for run in ("b", "c"))
    assert all(torch.equal(weights_b[name], weights_c[name]) for name in weights_c)
    # and B differs from A after T: the knob is real, so the equality above is not a copy of A
    assert epochs(tmp_path / "a")[:T] == epochs(tmp_path / "b")[:T] and epochs(tmp_path / "a")[T:] != epochs(tmp_path / "b")[T:]


def test_no_share_prefix_leaves_the_cache_alone(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LTSEARCH_CACHE", str(cache))
    assert train(tmp_path / "a", "safa", KNOBS["safa"][0], "--no-share-prefix") == 0
    assert not (cache / "prefixes").exists() and not (tmp_path / "a" / "prefixes").exists()


@pytest.mark.slow
def test_rerunning_a_sweeps_best_yaml_forks_from_its_trunk_and_repeats_the_trial(tmp_path: Path, monkeypatch, capsys) -> None:
    """The sweep's trunk is in the cache, so `ltsearch train best.yaml` takes epochs [0, T) from it and then
    trains what the best trial trained after T: the same numbers, epoch for epoch (one torch thread each)."""
    import io

    from ltsearch.tune import load_sweep, run_sweep

    monkeypatch.setenv("LTSEARCH_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "sweep.yaml"
    file.write_text("\n".join([
        f"base: {REPO / 'configs' / 'digits.yaml'}", "name: rerun", f"augmenter: {{name: safa, start_epoch: {T}}}",
        f"train: {{epochs: {EPOCHS}}}", "model: {width: 16}", "data: {max_train_per_class: 40, max_eval_per_class: 10}",
        "space:", "  augmenter.safa.lambda_recycle: {loguniform: [10.0, 1000.0]}",
        "search: {sampler: random, num_samples: 2, seed: 0, max_concurrent: 1}", "scheduler: {name: fifo}",
        "resources: {cpu: 1}", "tracking: {enabled: false}"]) + "\n")
    outcome = run_sweep(load_sweep(file, []), directory=str(tmp_path / "sweep"), stream=io.StringIO(), progress_interval_s=0.0)
    best = outcome.best["trial_id"]
    capsys.readouterr()

    assert main(["train", str(tmp_path / "sweep" / "best.yaml"), "--out", str(tmp_path / "rerun"), "--quiet"]) == 0
    assert f"epochs 1-{T}: the shared prefix" in capsys.readouterr().out
    trial = sorted((row for row in outcome.history if row["trial_id"] == best), key=lambda row: row["epoch"])
    rerun = epochs(tmp_path / "rerun")
    assert len(trial) == len(rerun) == EPOCHS
    for ran, again in zip(trial, rerun):
        both = [k for k in again if k in ran]  # the sweep's history leaves out a few (the sampler's name, val's per-class list)
        assert {"train/loss", "val/top1", "test/top1", "test/few"} <= set(both)
        assert {k: ran[k] for k in both} == {k: again[k] for k in both}
