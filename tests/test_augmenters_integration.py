"""Every registered augmenter through the real engine: every insertion point, every core loss, idle
before T_th, the eval path, exact resume with augmenter state, and the CLI on digits and CIFAR-10."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltsearch.augmenters.base import Augmenter, TrainState
from ltsearch.config import load_run_config
from ltsearch.engine import Trainer, fit
from ltsearch.models import num_boundaries
from ltsearch.registry import AUGMENTERS, LOSSES

REPO = Path(__file__).resolve().parents[1]
METHODS = [name for name in AUGMENTERS.names() if name != "none"]
SMALL = ["train.device=cpu", "data.max_train_per_class=40", "data.max_eval_per_class=10", "optim.batch_size=32"]
# M2m's g: a short ERM run, and thresholds low enough that a weak g still accepts some translations
ACTIVE_SAMPLER = {"smart": "head_tail", "safa": "same_class_pairs", "m2m": "class_balanced"}
M2M_EASY = ["augmenter.m2m.reference_epochs=3", "augmenter.m2m.gamma=2.0", "augmenter.m2m.beta=0.9"]  # accept when g's CE <= 2


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LTSEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def config_for(method: str, *overrides: str):
    extra = M2M_EASY if method == "m2m" else []
    return load_run_config(REPO / "configs" / "digits.yaml", [*SMALL, f"augmenter.name={method}", *extra, *overrides])


def valid_insertion_points(method: str, model: str) -> list[int]:
    return [0] if AUGMENTERS.get(method).obj.input_only else list(range(1, num_boundaries(model)))


def finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float))


CASES = [(m, k) for m in METHODS for k in valid_insertion_points(m, "resnet32")]


@pytest.mark.parametrize(("method", "insert_at"), CASES, ids=[f"{m}-k{k}" for m, k in CASES])
def test_trains_at_every_insertion_point_of_resnet32(method: str, insert_at: int) -> None:
    config = config_for(method, "model.name=resnet32", f"augmenter.insert_at={insert_at}", "augmenter.start_epoch=0",
                        "train.epochs=1", "data.max_train_per_class=16")
    (result,) = list(fit(config))
    assert finite(result.metrics), result.metrics
    assert result.metrics["train/loss"] > 0


def _resnet50_state(model) -> TrainState:
    return TrainState(epoch=5, epochs=10, step=50, steps_per_epoch=10, model=model)


@pytest.mark.parametrize("method", METHODS)
def test_plugs_into_every_stage_of_torchvision_resnet50(method: str) -> None:
    """Small 32x32 input so every stage (up to 2048 channels at 1x1) is exercised in one forward/backward."""
    diagonal = ["augmenter.lcreg.covariance=diagonal"] if method == "lcreg" else []  # full is M·2048² floats
    config = config_for(method, "model.name=resnet50", "augmenter.start_epoch=0", "train.epochs=1", "data.max_train_per_class=8", *diagonal)
    trainer = Trainer(config)
    for k in valid_insertion_points(method, "resnet50"):
        trainer.augmenter = _rebuild_at(trainer, k)
        torch.manual_seed(0)
        x = torch.rand(8, trainer.data.in_chans, 32, 32)
        y = trainer.class_counts.argsort(descending=True)[torch.arange(8) % trainer.data.num_classes]
        feats = trainer.model.forward_until(k, x)
        out = trainer.augmenter(feats, y, _resnet50_state(trainer.model))
        logits = trainer.model.forward_from(k, out.feats)
        assert logits.shape == (out.labels.shape[0], trainer.data.num_classes)
        loss = torch.nn.functional.cross_entropy(logits, out.labels) + sum(out.aux_losses.values(), torch.zeros(()))
        loss.backward()
        assert torch.isfinite(loss)


def _rebuild_at(trainer: Trainer, k: int) -> Augmenter:
    trainer.config.augmenter.insert_at = k
    return trainer._build_augmenter()


@pytest.mark.parametrize("method", METHODS)
def test_idle_before_start_epoch(method: str) -> None:
    """Before T_th the batch passes through unchanged (RSG may already train its own modules on it)."""
    trainer = Trainer(config_for(method, "augmenter.start_epoch=5", "train.epochs=6"))
    x, y = next(iter(trainer.loader.epoch("instance")))
    k = trainer.augmenter.insert_at
    feats = trainer.model.forward_until(k, x)
    state = TrainState(epoch=4, epochs=6, step=0, steps_per_epoch=len(trainer.loader), model=trainer.model)
    out = trainer.augmenter(feats, y, state)
    assert torch.equal(out.feats, feats) and torch.equal(out.labels, y)
    assert out.sample_weights is None or torch.all(out.sample_weights == 1)
    assert trainer.augmenter.sampler(4) is None


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_ignores_training_only_augmenters(method: str) -> None:
    trainer = Trainer(config_for(method, "augmenter.start_epoch=0", "train.epochs=1"))
    for _ in trainer.run():
        pass
    if type(trainer.augmenter).eval_transform is Augmenter.eval_transform:
        trainer.model.eval()
        x, _ = next(iter(trainer.loader.epoch("instance")))
        with torch.no_grad():
            k = trainer.augmenter.insert_at
            split = trainer.model.forward_from(k, trainer.augmenter.eval_transform(trainer.model.forward_until(k, x)))
            assert torch.allclose(split, trainer.model(x), atol=1e-6)
    metrics = trainer.evaluate("test")
    again = trainer.evaluate("test")
    assert metrics == again  # evaluation has no randomness and changes no state


@pytest.mark.parametrize("method", METHODS)
def test_resume_with_augmenter_state_is_exact(method: str, tmp_path: Path) -> None:
    overrides = ("augmenter.start_epoch=1", "train.epochs=3")
    straight = [r.metrics for r in fit(config_for(method, *overrides))]
    trainer = Trainer(config_for(method, *overrides))
    for result in trainer.run():
        result.save_checkpoint(tmp_path)
        break
    resumed = [r.metrics for r in fit(config_for(method, *overrides), resume_from=tmp_path)]
    assert len(resumed) == 2
    for a, b in zip(straight[1:], resumed):
        for key in ("train/loss", "test/top1", "test/per_class", "val/top1"):
            assert a[key] == b[key], (method, key)
        aux = [key for key in a if key.startswith("train/aux/")]
        assert aux == [key for key in b if key.startswith("train/aux/")]
        assert all(a[key] == b[key] for key in aux)


LOSS_CASES = [(m, loss) for m in METHODS for loss in LOSSES.names()]


@pytest.mark.parametrize(("method", "loss"), LOSS_CASES, ids=[f"{m}-{l}" for m, l in LOSS_CASES])
def test_combines_with_every_loss_and_drw(method: str, loss: str) -> None:
    config = config_for(method, f"loss.name={loss}", "augmenter.start_epoch=0", "train.epochs=2",
                        "loss.reweight.kind=effective_number", "loss.reweight.start_epoch=1", "data.max_train_per_class=16")
    results = list(fit(config))
    assert all(finite(r.metrics) for r in results)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ltsearch.cli", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("method", METHODS)
def test_cli_train_each_method_on_digits(method: str, tmp_path: Path) -> None:
    extra = [arg for o in (M2M_EASY if method == "m2m" else []) for arg in ("--set", o)]
    proc = _cli("train", "configs/digits.yaml", "--set", f"augmenter.name={method}", "--set", "train.epochs=3",
                "--set", "augmenter.start_epoch=1", "--set", "train.device=cpu", *extra, "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["test/top1"] > 10.0  # above chance after three epochs
    active = metrics["final"]  # the last epoch is past start_epoch: the method's own traces must be there
    if method in ACTIVE_SAMPLER:
        assert active["train/sampler"] == ACTIVE_SAMPLER[method]
    if method in ("safa", "rsg", "lcreg"):
        assert any(key.startswith("train/aux/") for key in active)


@pytest.mark.slow
@pytest.mark.cifar
def test_cli_trains_a_method_on_cifar10(tmp_path: Path, cifar_root: Path) -> None:
    """The CLI on the real CIFAR-10 files: a small long-tailed slice, ResNet-32, RSG at its default insertion point.
    Every method on those files, from scratch and over a trained network, is test_health_cifar's; every method
    through the CLI is test_cli_train_each_method_on_digits."""
    proc = _cli("train", "configs/cifar10_lt.yaml", "--set", f"data.root={cifar_root}", "--set", "augmenter.name=rsg",
                "--set", "data.max_train_per_class=40", "--set", "data.max_eval_per_class=20", "--set", "train.epochs=2",
                "--set", "augmenter.start_epoch=1", "--set", "optim.schedule.warmup_epochs=0", "--set", "train.device=cpu",
                "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["final"]["test/top1"])
    assert any(key.startswith("train/aux/") for key in metrics["final"])  # epoch 2 is past start_epoch: RSG acted


def test_lcreg_second_stage_trains_only_the_classifier() -> None:
    """Decoupled fine-tuning (LCReg Sec. 3.4): in the last epoch only classifier weights may move."""
    trainer = Trainer(config_for("lcreg", "augmenter.start_epoch=0", "train.epochs=2", "augmenter.lcreg.second_stage_epochs=1"))
    runs = trainer.run()
    next(runs)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in trainer.model.named_buffers()}
    aug_before = {name: p.detach().clone() for name, p in trainer.augmenter.named_parameters()}
    last = next(runs)
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all(name.startswith("classifier") for name in moved), moved
    assert all(torch.equal(b, buffers[name]) for name, b in trainer.model.named_buffers()), "frozen BN statistics moved"
    assert all(torch.equal(p, aug_before[name]) for name, p in trainer.augmenter.named_parameters())
    assert not any(key.startswith("train/aux/") for key in last.metrics)
    assert last.metrics["train/sampler"] == "class_balanced"
