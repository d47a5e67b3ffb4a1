"""Engine: schedule values, per-epoch results, exact resume, insertion checks, the cached reference model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ltsearch.config import load_run_config
from ltsearch._runtime import EagerSGD, learning_rate
from ltsearch.engine import Trainer, check_compatible, fit, summarize, train_reference_model
from ltsearch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def digits(*overrides: str):
    return load_run_config(REPO / "configs" / "digits.yaml", ["train.device=cpu", *overrides])


def test_ldam_drw_learning_rate_schedule_matches_the_recipe() -> None:
    config = load_run_config(REPO / "configs" / "ldam_drw_cifar10.yaml")
    lr = [learning_rate(config.optim.schedule, 0.1, epoch, 200) for epoch in range(200)]
    assert lr[0] == pytest.approx(0.02) and lr[4] == pytest.approx(0.1)  # e = epoch + 1 <= 5: 0.1 * e / 5
    assert lr[5] == lr[159] == pytest.approx(0.1)
    assert lr[160] == lr[179] == pytest.approx(0.001)  # x0.01 from index 160 (e > 160)
    assert lr[180] == lr[199] == pytest.approx(1e-5)   # x1e-4 from index 180


def test_cosine_schedule_endpoints() -> None:
    config = load_run_config(None, ["optim.schedule.name=cosine", "optim.schedule.warmup_epochs=2", "optim.schedule.min_factor=0.1"])
    schedule = config.optim.schedule
    assert learning_rate(schedule, 1.0, 0, 12) == pytest.approx(0.5)
    assert learning_rate(schedule, 1.0, 2, 12) == pytest.approx(1.0)
    assert learning_rate(schedule, 1.0, 7, 12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_eager_sgd_takes_torchs_sgd_steps_bit_for_bit(nesterov: bool) -> None:
    """Same weights, momentum buffers and state_dict after 12 steps with weight decay; the state loads into either."""
    def train(optimizer_class: type) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        optimizer = optimizer_class(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        for _ in range(12):
            optimizer.zero_grad()
            model(torch.randn(8, 12)).pow(2).mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], optimizer.state_dict()

    (eager, eager_state), (reference, reference_state) = train(EagerSGD), train(torch.optim.SGD)
    assert all(torch.equal(a, b) for a, b in zip(eager, reference))
    assert eager_state["param_groups"] == reference_state["param_groups"]
    assert all(torch.equal(eager_state["state"][k]["momentum_buffer"], reference_state["state"][k]["momentum_buffer"])
               for k in reference_state["state"])


def test_fit_yields_one_result_per_epoch_with_all_metrics() -> None:
    results = list(fit(digits("train.epochs=2")))
    assert [r.epoch for r in results] == [0, 1]
    metrics = results[-1].metrics
    for key in ("train/loss", "train/top1", "lr", "epoch_seconds", "images_per_s", "val/top1", "val/bacc", "val/gm",
                "test/top1", "test/bacc", "test/gm", "test/many", "test/medium", "test/few", "test/per_class"):
        assert key in metrics, key
    assert all(math.isfinite(v) for v in results[-1].scalars().values())
    assert len(metrics["test/per_class"]) == 10
    assert metrics["test/top1"] > 20.0  # two epochs of a small CNN on digits are well above chance (10%)


TIMING = ("epoch_seconds", "images_per_s")  # wall-clock measurements: the only values a resumed run may change


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested states (tensors, dicts, lists, numbers) differ; tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [found for key in a for found in differences(a[key], b[key], f"{where}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [found for i, (x, y) in enumerate(zip(a, b)) for found in differences(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def assert_same_run(straight: Trainer, resumed: Trainer) -> None:
    """What the end-to-end fault tests compare, in process: every history column but the timings (aug/* diagnostics
    included), the best epoch, and every tensor of the model, the augmenter and the optimiser, bit for bit."""
    def timeless(row: dict) -> dict:
        return {key: value for key, value in row.items() if key not in TIMING}

    assert (straight.epoch, straight.step) == (resumed.epoch, resumed.step)
    assert [timeless(row) for row in straight.history] == [timeless(row) for row in resumed.history]
    assert {**straight.best, "metrics": timeless(straight.best["metrics"])} == {**resumed.best, "metrics": timeless(resumed.best["metrics"])}
    for part in ("model", "augmenter", "optimizer"):
        assert differences(getattr(straight, part).state_dict(), getattr(resumed, part).state_dict(), part) == []


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = Trainer(digits("train.epochs=4"))
    for _ in straight.run():
        pass
    first = Trainer(digits("train.epochs=4"))
    for result in first.run():
        if result.epoch == 1:
            result.save_checkpoint(tmp_path)
            break
    resumed = list(fit(digits("train.epochs=4"), resume_from=tmp_path))
    assert [r.epoch for r in resumed] == [2, 3]
    assert len(straight.history[0]) > 20  # every column: train, val, test, lr, selection, not a handful of keys
    assert_same_run(straight, resumed[-1].trainer)


def test_summary_selects_on_validation_and_keeps_the_legacy_number_apart() -> None:
    trainer = Trainer(digits("train.epochs=3"))
    history = [r.metrics for r in trainer.run()]
    summary = summarize(trainer)
    best_val = max(m["val/top1"] for m in history)
    assert summary["best"]["val/top1"] == best_val
    assert summary["legacy/best_test_top1"] == max(m["test/top1"] for m in history)
    assert summary["construction"]["imbalance"] == 10


@pytest.mark.parametrize("insert_at", [5, -6])
def test_insertion_point_is_checked_against_the_backbone(insert_at: int) -> None:
    config = digits("augmenter.name=none", f"augmenter.insert_at={insert_at}", "model.name=resnet32")
    with pytest.raises(ConfigError) as caught:
        check_compatible(config)
    assert caught.value.key == "augmenter.insert_at"
    assert "[1, 2, 3, 4]" in str(caught.value)


def test_reference_model_is_trained_once_and_reused(tmp_path: Path) -> None:
    config = digits("train.epochs=1")
    trainer = Trainer(config, cache_dir=tmp_path)
    g1 = train_reference_model(config, trainer.data, tmp_path, epochs=1)
    cached = list(tmp_path.glob("reference-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    g2 = train_reference_model(config, trainer.data, tmp_path, epochs=1)
    assert cached[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    assert not g2.training and all(not p.requires_grad for p in g2.parameters())
    for a, b in zip(g1.state_dict().values(), g2.state_dict().values()):
        assert torch.equal(a, b)
    # the reference run is plain ERM whatever the trial's loss, re-weighting, re-sampling and augmenter: g of such a
    # trial, trained in an empty cache, is bit for bit the network a plain CE run without a method ends with
    other = digits("train.epochs=1", "loss.name=balanced_softmax", "loss.reweight.kind=inverse", "loss.reweight.start_epoch=0",
                   "loss.resample.sampler=class_balanced", "loss.resample.start_epoch=0", "augmenter.name=smart")
    g = train_reference_model(other, trainer.data, tmp_path / "empty", epochs=1)
    (trained,) = (tmp_path / "empty").glob("reference-*.pt")
    recorded = torch.load(trained, weights_only=True)["config"]
    assert recorded["loss"]["name"] == "ce" and recorded["loss"]["reweight"]["kind"] == "none"
    assert recorded["loss"]["resample"]["sampler"] == "instance" and recorded["augmenter"]["name"] == "none"
    plain = Trainer(digits("train.epochs=1"))
    assert (plain.config.loss.name, plain.config.augmenter.name, plain.config.loss.reweight.kind) == ("ce", "none", "none")
    for _ in plain.run():
        pass
    assert differences(g.state_dict(), plain.model.state_dict()) == []
    assert trained.name == cached[0].name  # the same cache key as the plain config's g


def test_train_top1_under_posthoc_logit_adjustment_counts_the_adjusted_prediction() -> None:
    """train/top1 predicts as val and test do: argmax(z - tau log pi) under post-hoc logit adjustment, not argmax z."""
    trainer = Trainer(digits("train.threads=1", "loss.name=logit_adjust", "loss.logit_adjust.mode=posthoc",
                             "loss.logit_adjust.tau=2.0"))
    sampler, weights = trainer.begin_epoch()
    x, y = next(iter(trainer.loader.epoch(sampler)))
    k = trainer.augmenter.insert_at
    with torch.no_grad():  # train mode, as the step sees it: the same batch statistics, the same logits
        logits = trainer.model.forward_from(k, trainer.model.forward_until(k, x)).float()
    adjusted = int((trainer.loss_fn.eval_logits(logits).argmax(1) == y).sum())
    raw = int((logits.argmax(1) == y).sum())
    assert adjusted != raw  # the batch tells the two rules apart
    assert int(trainer.train_step(x, y, weights)["correct"]) == adjusted
