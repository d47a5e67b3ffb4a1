"""Every registered augmenter through the real engine: every insertion point, every core loss, idle
before T_th, the eval path, exact resume with augmenter state, and the CLI on digits and CIFAR-10."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_engine import assert_same_run
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


# ------------------------------------------------------------------------------------ step records
@dataclass
class Step:
    """One training step as the hooks saw it: the loader's batch, then (kind, ...) events in call order."""

    epoch: int
    x: torch.Tensor
    y: torch.Tensor
    events: list[tuple] = field(default_factory=list)

    def parts(self) -> tuple[list[tuple], tuple, list[tuple], tuple]:
        """(stage calls before the augmenter, the augmenter's call, stage calls after it up to the loss, the loss call).
        Calls the augmenter makes itself (M2m's f, SAFA's head) fall between its two events and are left out."""
        kinds = [event[0] for event in self.events]
        called, returned = kinds.index("augmenter called"), kinds.index("augmenter")
        loss = returned + 1 + kinds[returned + 1:].index("loss")
        before = [event for event in self.events[:called] if event[0] == "stage"]
        after = [event for event in self.events[returned + 1:loss] if event[0] == "stage"]
        return before, self.events[returned], after, self.events[loss]


def record_steps(trainer: Trainer) -> list[Step]:
    """Forward hooks on the backbone's stages and pool, the augmenter and the loss, and a wrapper around the engine's
    step that notes the batch: what every training step handed to whom. The product code runs unchanged."""
    steps: list[Step] = []
    model = trainer.model

    def add(*event) -> None:
        if steps:
            steps[-1].events.append(tuple(part.detach() if isinstance(part, torch.Tensor) else part for part in event))

    for index, module in enumerate([*model.stages, model.pool]):  # index len(stages): the pool, before the classifier
        module.register_forward_hook(lambda m, args, out, index=index: add("stage", index, args[0], out))
    trainer.augmenter.register_forward_pre_hook(lambda m, args: add("augmenter called"))
    trainer.augmenter.register_forward_hook(lambda m, args, out: add("augmenter", *args, out))
    trainer.loss_fn.register_forward_hook(lambda m, args, kwargs, out: add("loss", *args, kwargs, out), with_kwargs=True)
    engine_step = trainer.train_step

    def train_step(x, y, class_weights):
        steps.append(Step(trainer.epoch, x, y))
        return engine_step(x, y, class_weights)

    trainer.train_step = train_step
    return steps


def changed_the_batch(feats: torch.Tensor, out) -> bool:
    """The method did something to what the classifier trains on: samples added or moved, or weights other than 1."""
    weighted = out.sample_weights is not None and not bool((out.sample_weights == 1).all())
    return out.feats.shape != feats.shape or not torch.equal(out.feats, feats) or weighted


# resnet32's boundaries on 8x8 digits, from the architecture (not from its feature_info): input, stem, layer1, layer2, layer3
RESNET32_ON_DIGITS = {0: (1, 8, 8), 1: (16, 8, 8), 2: (16, 8, 8), 3: (32, 4, 4), 4: (64, 2, 2)}
CASES = [(m, k) for m in METHODS for k in valid_insertion_points(m, "resnet32")]


@pytest.mark.parametrize(("method", "insert_at"), CASES, ids=[f"{m}-k{k}" for m, k in CASES])
def test_trains_at_every_insertion_point_of_resnet32(method: str, insert_at: int) -> None:
    """In every step the augmenter gets exactly what stages [0, k) made of the batch, the stages from k on get exactly
    what it handed back, and in some step it changed that (k = 1 and 2 have one shape: the values tell them apart)."""
    config = config_for(method, "model.name=resnet32", f"augmenter.insert_at={insert_at}", "augmenter.start_epoch=0",
                        "train.epochs=1", "data.max_train_per_class=16")
    trainer = Trainer(config)
    steps = record_steps(trainer)
    (result,) = list(trainer.run())
    assert finite(result.metrics), result.metrics
    assert result.metrics["train/loss"] > 0
    stages = len(trainer.model.stages)
    assert len(steps) == len(trainer.loader) and stages == 4
    acted = 0
    for step in steps:
        before, (_, feats, labels, _, out), after, (_, logits, targets, _, _) = step.parts()
        assert [event[1] for event in before] == list(range(insert_at))  # forward_until(k) and nothing else
        reached = step.x
        for _, _, given, made in before:
            assert torch.equal(given, reached)
            reached = made
        assert torch.equal(feats, reached) and torch.equal(labels, step.y)
        assert tuple(feats.shape) == (len(step.y), *RESNET32_ON_DIGITS[insert_at])
        assert [event[1] for event in after] == list(range(insert_at, stages + 1))  # forward_from(k): the rest, the pool
        assert torch.equal(after[0][2], out.feats)
        assert logits.shape[0] == len(targets) == out.feats.shape[0] and torch.equal(targets, out.labels)
        acted += changed_the_batch(feats, out)
    assert acted > 0, f"{method} at k={insert_at} never changed a batch"


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
    """Resumed after epoch 0 (before the method starts at 1): every history column (train/aux/*, aug/*), the weights,
    the augmenter's state and the optimiser's slots equal an uninterrupted run's."""
    overrides = ("augmenter.start_epoch=1", "train.epochs=3")
    straight = Trainer(config_for(method, *overrides))
    for _ in straight.run():
        pass
    trainer = Trainer(config_for(method, *overrides))
    for result in trainer.run():
        result.save_checkpoint(tmp_path)
        break
    resumed = list(fit(config_for(method, *overrides), resume_from=tmp_path))
    assert [r.epoch for r in resumed] == [1, 2]
    diagnostics = [key for key in straight.history[-1] if key.startswith("aug/")]
    assert diagnostics and not any(key.startswith("aug/") for key in straight.history[0])  # the method acted after the cut
    assert_same_run(straight, resumed[-1].trainer)


LOSS_CASES = [(m, loss) for m in METHODS for loss in LOSSES.names()]


def per_sample_loss(name: str, logits: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each loss at its paper defaults, written out here (float64) rather than taken from ltsearch.losses."""
    if name == "balanced_softmax":  # CE(z + log n_c)
        logits = logits + counts.log()
    elif name == "ldam":  # CE(30·(z − m_y·e_y)), m_c = 0.5·(n_min / n_c)^(1/4)
        margins = 0.5 * (counts.min() / counts) ** 0.25
        logits = 30.0 * (logits - F.one_hot(targets, len(counts)) * margins[targets, None])
    cross_entropy = F.cross_entropy(logits, targets, reduction="none")
    if name == "focal":  # (1 − p_y)^γ·CE with γ = 1
        return (1.0 - torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)) * cross_entropy
    return cross_entropy  # ce; logit_adjust trains with plain CE in its default post-hoc mode


@pytest.mark.parametrize(("method", "loss"), LOSS_CASES, ids=[f"{m}-{l}" for m, l in LOSS_CASES])
def test_combines_with_every_loss_and_drw(method: str, loss: str) -> None:
    """Every step's classification loss is the named loss of the batch the augmenter handed back (appended samples,
    ω) with DRW's class weights from epoch 1 on, and the reported loss is that term plus the weighted aux terms."""
    config = config_for(method, f"loss.name={loss}", "augmenter.start_epoch=0", "train.epochs=2",
                        "loss.reweight.kind=effective_number", "loss.reweight.start_epoch=1", "data.max_train_per_class=16")
    trainer = Trainer(config)
    steps = record_steps(trainer)
    results = list(trainer.run())
    assert all(finite(r.metrics) for r in results)
    counts = trainer.class_counts.double()
    drw = (1 - 0.9999) / (1 - 0.9999 ** counts)  # Cui et al.'s effective number at β = 0.9999, summing to C
    drw = drw * len(counts) / drw.sum()
    appended_under_drw = weighted = 0
    for step in steps:
        _, (_, feats, _, state, out), _, (_, logits, targets, kwargs, value) = step.parts()
        assert torch.equal(targets, out.labels) and logits.shape[0] == len(targets)
        omega = kwargs.get("sample_weights")
        assert (omega is None) == (out.sample_weights is None) and (omega is None or torch.equal(omega, out.sample_weights))
        class_weights = kwargs.get("class_weights")
        if step.epoch == 0:
            assert class_weights is None and state.class_weights is None
            c = torch.ones(len(targets), dtype=torch.float64)
        else:
            assert class_weights is not None, "DRW's class weights never reached the loss"
            assert torch.allclose(class_weights.double(), drw, rtol=1e-6, atol=0) and torch.equal(state.class_weights, class_weights)
            c = drw[targets]
        omega = torch.ones_like(c) if omega is None else omega.double()
        expected = (c * omega * per_sample_loss(loss, logits.double(), targets, counts)).sum() / c.sum()
        assert float(value) == pytest.approx(float(expected), rel=1e-5, abs=1e-7), (step.epoch, loss)
        appended_under_drw += step.epoch == 1 and len(targets) > len(step.y)
        weighted += not bool((omega == 1).all())
    if method in ("safa", "rsg"):
        assert appended_under_drw > 0  # the weights were checked on batches with generated samples
    if method == "smart":
        assert weighted > 0
    lam, gamma = trainer.augmenter.loss_weights, trainer.augmenter.cls_weight
    for result in results:  # train/loss and train/cls_loss average γ·L_cls + Σ λ·aux over the real samples of the epoch
        calls = [(len(step.y), step.parts()[1][4], step.parts()[3][4]) for step in steps if step.epoch == result.epoch]
        seen = sum(n for n, _, _ in calls)
        cls = sum(n * float(value) for n, _, value in calls) / seen
        total = sum(n * (gamma * float(value) + sum(lam.get(name, 1.0) * float(term.detach()) for name, term in out.aux_losses.items()))
                    for n, out, value in calls) / seen
        assert result.metrics["train/cls_loss"] == pytest.approx(cls, rel=1e-5)
        assert result.metrics["train/loss"] == pytest.approx(total, rel=1e-5)


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
