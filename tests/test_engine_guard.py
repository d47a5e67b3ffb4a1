"""Nothing fails silently: a non-finite loss stops the run (exit 3), diagnostics reach the results,
warm starts load weights only, and post-hoc logit adjustment changes what evaluation predicts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltsearch.augmenters.base import DiagnosticMeter
from ltsearch.config import load_run_config
from ltsearch.divergence import DivergenceGuard
from ltsearch.engine import Trainer
from ltsearch.errors import ConfigError, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def digits(*overrides: str):
    return load_run_config(REPO / "configs" / "digits.yaml", ["train.device=cpu", *overrides])


def ltsearch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ltsearch.cli", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


# ------------------------------------------------------------------------------------ the guard
def test_guard_names_the_first_non_finite_step_and_only_the_terms_that_broke_there():
    guard = DivergenceGuard(epoch=2, epochs=10, steps_per_epoch=50, check_every=1000)
    for step in range(7):
        aux = torch.tensor(float("inf")) if step >= 5 else torch.tensor(1.0)
        loss = torch.tensor(float("nan")) if step >= 6 else torch.tensor(2.0)
        guard.observe({"loss": loss, "aux/l_r": aux}, step)
    with pytest.raises(TrainingDiverged) as error:
        guard.check()
    assert (error.value.epoch, error.value.step) == (2, 5)
    assert error.value.terms == {"aux/l_r": math.inf}
    assert "epoch 3/10, step 6/50" in str(error.value) and "aux/l_r = inf" in str(error.value)


def test_guard_raises_at_its_check_interval_without_an_explicit_check():
    guard = DivergenceGuard(epoch=0, epochs=1, steps_per_epoch=100, check_every=4)
    for step in range(3):
        guard.observe({"loss": torch.tensor(1.0)}, step)
    with pytest.raises(TrainingDiverged):
        guard.observe({"loss": torch.tensor(float("nan"))}, 3)


# ------------------------------------------------------------------------------------ the meter
def test_diagnostic_meter_sums_averages_and_tracks_extremes_then_resets():
    meter = DiagnosticMeter()
    meter.add("generated", torch.tensor([1.0, 1.0, 0.0]))
    meter.add("generated", 4)
    meter.mean("omega", torch.tensor([1.0, 3.0]))
    meter.mean("omega", torch.tensor([5.0]))
    meter.mean("omega", torch.tensor([]))
    values = meter.collect()
    assert values == {"generated": 6.0, "omega": 3.0, "omega_min": 1.0, "omega_max": 5.0}
    assert meter.collect() == {}


def test_diagnostic_meter_masked_means_count_only_the_masked_samples_and_omit_empty_ones():
    meter = DiagnosticMeter()
    meter.mean("kept", torch.tensor([0.2, 0.9, 0.5]), where=torch.tensor([False, True, True]))
    meter.mean("kept", torch.tensor([0.1]), where=torch.tensor([False]))
    meter.mean("never", torch.tensor([0.3, 0.4]), where=torch.tensor([False, False]))
    values = meter.collect()
    assert values == pytest.approx({"kept": 0.7, "kept_min": 0.5, "kept_max": 0.9})


# ------------------------------------------------------------------------------------ the engine
def test_a_diverging_run_raises_instead_of_finishing():
    trainer = Trainer(digits("train.epochs=2", "optim.lr=1.0e30", "optim.schedule.warmup_epochs=0"))
    with pytest.raises(TrainingDiverged) as error:
        list(trainer.run())
    assert error.value.epoch == 0 and "loss" in error.value.terms
    assert trainer.epoch == 0 and trainer.history == []


@pytest.mark.slow
def test_cli_exits_3_keeps_the_last_good_checkpoint_and_writes_no_metrics(tmp_path: Path):
    """Epoch 1 trains normally; epoch 2's lr (x1e30) blows the loss up."""
    out = tmp_path / "run"
    proc = ltsearch("train", "configs/digits.yaml", "--set", "train.device=cpu", "--set", "train.epochs=3",
                    "--set", "optim.schedule.name=step", "--set", "optim.schedule.milestones=[1]", "--set", "optim.schedule.factors=[1.0e30]", "--out", str(out))
    assert proc.returncode == 3, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "training diverged in epoch 2/3" in message and "non-finite loss term(s)" in message
    assert f"after epoch 1/3) is in {out}" in message
    assert not (out / "metrics.json").exists()
    assert "training diverged in epoch 2/3" in (out / "error.txt").read_text()
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_augmenter_diagnostics_reach_the_epoch_metrics(monkeypatch):
    trainer = Trainer(digits("train.epochs=1"))
    monkeypatch.setattr(trainer.augmenter, "epoch_diagnostics", lambda: {"generated": 7.0})
    metrics = trainer.train_epoch()
    assert metrics["aug/generated"] == 7.0


def test_init_from_loads_the_backbone_weights_only(tmp_path: Path):
    source = Trainer(digits("train.epochs=1"))
    list(source.run())
    source.save_checkpoint(tmp_path)
    warm = Trainer(digits("train.epochs=1", f"train.init_from={tmp_path}", "train.seed=5"))
    for name, value in source.model.state_dict().items():
        assert torch.equal(value, warm.model.state_dict()[name]), name
    assert warm.epoch == 0 and warm.history == [] and not warm.optimizer.state  # a fresh run, not a resume


def test_init_from_refuses_a_missing_or_mismatched_checkpoint(tmp_path: Path):
    with pytest.raises(ConfigError, match="train.init_from"):
        digits(f"train.init_from={tmp_path / 'nowhere'}")
    other = Trainer(digits("train.epochs=1", "model.width=8"))
    other.save_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="train.init_from"):
        Trainer(digits(f"train.init_from={tmp_path}"))


def test_posthoc_logit_adjustment_changes_the_prediction_not_the_network():
    """With a huge τ every prediction becomes the rarest class, so balanced test top-1 is 1/C exactly."""
    trainer = Trainer(digits("train.epochs=1", "loss.name=logit_adjust", "loss.logit_adjust.tau=1000"))
    metrics = trainer.evaluate("test")
    rarest = int(trainer.class_counts.argmin())
    assert metrics["test/top1"] == pytest.approx(100.0 / trainer.data.num_classes, abs=1e-6)
    assert metrics["test/per_class"][rarest] == pytest.approx(100.0)


def test_m2m_reference_g_never_inherits_the_runs_warm_start(tmp_path: Path):
    from ltsearch.engine import reference_config

    Trainer(digits("train.epochs=1")).save_checkpoint(tmp_path)
    config = digits(f"train.init_from={tmp_path}", "augmenter.name=m2m")
    reference = reference_config(config, epochs=None)
    assert reference.train.init_from is None and reference.loss.name == "ce" and reference.augmenter.name == "none"
