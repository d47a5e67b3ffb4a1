"""M2m: closed forms of Eq. 3/5 and the generation probability, one batched translation step against
hand-computed gradients, γ as a loss threshold (Alg. 1) or the reference's confidence rule,
acceptance/rejection, the diagnostics, and the isolation of g and f during generation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ltsearch.augmenters.base import AugmenterContext, FeatureSpec, TrainState, head_class_mask, resolve_start_epoch
from ltsearch.augmenters.m2m import (M2m, M2mConfig, acceptance_matrix, draw_seeds, generation_probability, passes_gamma,
                                     random_start, target_loss, translate)
from ltsearch.config import AugmenterConfig, RunConfig, build, load_run_config
from ltsearch.engine import Trainer
from ltsearch.errors import ConfigError
from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.registry import AUGMENTERS

COUNTS = torch.tensor([100, 50, 10])


def linear(weight: list[list[float]], bias: list[float]) -> nn.Module:
    """A classifier on flattened inputs with known weights, so gradients have closed forms."""
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return nn.Sequential(nn.Flatten(), layer)


def tiny_backbone(num_classes: int = 3, channels: int = 1) -> Backbone:
    """Normalize + conv + BN + dropout: a model whose train/eval modes matter."""
    stage = nn.Sequential(Normalize((0.5,) * channels, (0.25,) * channels), nn.Conv2d(channels, 4, 1),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    return Backbone([stage], nn.Linear(4, num_classes), [FeatureInfo(channels, 1, "input"), FeatureInfo(4, 1, "s0")])


def make_m2m(g: nn.Module, counts: torch.Tensor = COUNTS, start_epoch: int = 0, **section) -> M2m:
    augmenter = AugmenterConfig(name="m2m", sections={"m2m": build(M2mConfig, section, "augmenter.m2m")})
    context = AugmenterContext(
        config=RunConfig(augmenter=augmenter), insert_at=0, start_epoch=start_epoch, head_ratio=1 / 3,
        feature=FeatureSpec(1, 2, 2), num_classes=len(counts), class_counts=counts,
        head_mask=head_class_mask(counts, 1 / 3), device=torch.device("cpu"), cache_dir=Path("unused"),
        reference_model=lambda epochs=None, path=None: g)
    return M2m(context)


def state(model: nn.Module, epoch: int = 0) -> TrainState:
    return TrainState(epoch=epoch, epochs=10, step=0, steps_per_epoch=1, model=model)


def target_confidence(g: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.exp(-target_loss(g, x, targets))


ACCEPT_ALL = 1e9  # a loss threshold no translation exceeds


# --------------------------------------------------------------------------------------------- config
def test_registered_with_paper_defaults():
    entry = AUGMENTERS.get("m2m")
    assert entry.obj is M2m and M2m.input_only
    assert entry.meta["defaults"]["insert_at"] == 0
    assert resolve_start_epoch("m2m", None, 200) == 160  # deferral epoch 160 of 200
    cfg = build(AugmenterConfig, {"name": "m2m", "m2m": {}}, "augmenter").m2m
    assert (cfg.beta, cfg.lam, cfg.gamma, cfg.steps, cfg.step_size) == (0.999, 0.5, 0.99, 10, 0.1)
    assert cfg.acceptance == "loss"  # Sec. 2.3 / Algorithm 1: γ bounds L(g; x*, k)
    assert cfg.reference_path is None and cfg.reference_epochs is None


@pytest.mark.parametrize("key, value", [("beta", 1.0), ("beta", -0.1), ("lam", -0.5), ("gamma", 0.0), ("gamma", -1.0),
                                        ("steps", 0), ("step_size", 0.0), ("noise_radius", -1.0), ("reference_epochs", 0),
                                        ("reference_path", "/nonexistent/g.pt"), ("acceptance", "softmax")])
def test_config_rejects_out_of_range(key, value):
    with pytest.raises(ConfigError) as error:
        build(M2mConfig, {key: value}, "augmenter.m2m")
    assert error.value.key == f"augmenter.m2m.{key}"


def test_gamma_range_depends_on_the_rule():
    assert build(M2mConfig, {"gamma": 1.5}, "augmenter.m2m").gamma == 1.5  # a CE bound may exceed 1
    with pytest.raises(ConfigError) as error:
        build(M2mConfig, {"gamma": 1.5, "acceptance": "confidence"}, "augmenter.m2m")
    assert error.value.key == "augmenter.m2m.gamma"


def test_gamma_bounds_the_cross_entropy_or_the_confidence():
    # g's softmax on the target is 0.5, so L = log 2 ≈ 0.693: kept by the paper's γ = 0.99, not by the reference's rule.
    g = linear([[0.0, 0.0, 0.0, 0.0]] * 3, [math.log(0.5), math.log(0.3), math.log(0.2)])
    x, targets = torch.zeros(2, 1, 2, 2), torch.tensor([0, 2])
    loss = target_loss(g, x, targets)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), math.log(5.0)]))
    assert passes_gamma(loss, 0.99, "loss").tolist() == [True, False]
    assert passes_gamma(loss, 0.99, "confidence").tolist() == [False, False]
    assert passes_gamma(loss, 0.5, "confidence").tolist() == [True, False]
    assert passes_gamma(loss, math.log(2.0), "loss").tolist() == [True, False]  # Alg. 1 rejects only L > γ


# ---------------------------------------------------------------------------------------- closed forms
def test_acceptance_matrix_matches_eq3():
    accept = acceptance_matrix(COUNTS, 0.9)
    expected = torch.tensor([[0.0, 1 - 0.9 ** 50, 1 - 0.9 ** 90],
                             [0.0, 0.0, 1 - 0.9 ** 40],
                             [0.0, 0.0, 0.0]])  # zero when k0 is not more frequent than k
    torch.testing.assert_close(accept, expected)
    assert acceptance_matrix(COUNTS, 0.999)[0, 2].item() == pytest.approx(1 - 0.999 ** 90, rel=1e-6)
    assert acceptance_matrix(COUNTS, 0.0).tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_generation_probability_is_one_minus_count_ratio():
    torch.testing.assert_close(generation_probability(COUNTS), torch.tensor([0.0, 0.5, 0.9]))


def test_seed_classes_follow_q_not_batch_multiplicity():
    # Class 0 appears 3 times, class 1 once: Q(0|2) must not be inflated by the multiplicity (Eq. 5).
    torch.manual_seed(0)
    beta = 0.99
    labels = torch.tensor([0, 0, 0, 1] + [2] * 4000)
    seeds, has_seed = draw_seeds(labels, acceptance_matrix(COUNTS, beta))
    assert has_seed.tolist() == [False] * 3 + [True] * 4001  # class 0 has no more frequent class
    assert (labels[seeds[3]] == 0).item()  # the only source for class 1
    q0 = (1 - beta ** 90) / ((1 - beta ** 90) + (1 - beta ** 40))
    observed = (labels[seeds[4:]] == 0).float().mean().item()
    assert abs(observed - q0) < 4 * math.sqrt(q0 * (1 - q0) / 4000)
    assert (labels[seeds[4:]] != 2).all()


def test_random_start_has_radius_and_stays_in_range():
    torch.manual_seed(0)
    seeds = torch.full((5, 3, 8, 8), 0.5)
    start = random_start(seeds, 0.5, (0.0, 1.0))
    torch.testing.assert_close((start - seeds).flatten(1).norm(dim=1), torch.full((5,), 0.5))
    edge = random_start(torch.ones(4, 3, 8, 8), 0.5, (0.0, 1.0))
    assert edge.max() <= 1.0 and edge.min() >= 0.0


def test_random_start_noise_is_zero_mean():
    # Positive noise renormed to 0.5 would brighten each 192-value seed by about 0.5/sqrt(192/3) ≈ 0.03 on average.
    torch.manual_seed(0)
    seeds = torch.full((1000, 3, 8, 8), 0.5)
    delta = random_start(seeds, 0.5, (0.0, 1.0)) - seeds
    assert abs(delta.mean().item()) < 1e-3
    assert (delta > 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------------------- translation
def test_translate_matches_hand_computed_normalised_steps():
    # Linear g(x) = A x + a and f(x) = B x + b: ∇_x [CE(g(x), k) + λ f_k0(x)] = Aᵀ(softmax(g(x)) − e_k) + λ B_k0.
    A, a = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -0.5, 1.0], [-1.0, 0.0, 1.0, 0.5]]), torch.tensor([0.1, 0.0, -0.1])
    B, b = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0], [1.0, 0.0, 0.0, -1.0]]), torch.zeros(3)
    g, f = linear(A.tolist(), a.tolist()), linear(B.tolist(), b.tolist())
    x0 = torch.tensor([[0.9, 0.1, 0.2, 0.5], [0.3, 0.6, 0.8, 0.1]]).view(2, 1, 2, 2)
    seed_classes, targets = torch.tensor([0, 1]), torch.tensor([2, 2])
    lam, eta, steps = 0.5, 0.1, 3
    out = translate(x0, seed_classes, targets, f, g, steps=steps, step_size=eta, lam=lam, value_range=(0.0, 1.0))
    x = x0.flatten(1)
    for _ in range(steps):
        grad = (torch.softmax(x @ A.T + a, 1) - torch.eye(3)[targets]) @ A + lam * B[seed_classes]
        x = (x - eta * grad / grad.norm(dim=1, keepdim=True)).clamp(0.0, 1.0)
    torch.testing.assert_close(out.flatten(1), x)


def separable_g(channels: int = 1) -> nn.Module:
    """g trained a few steps on toy data where the class is the mean brightness band (dark / mid / bright)."""
    torch.manual_seed(0)
    g = tiny_backbone(3, channels)
    levels = torch.tensor([0.15, 0.5, 0.85])
    labels = torch.arange(3).repeat(40)
    images = (levels[labels].view(-1, 1, 1, 1) + 0.05 * torch.randn(120, channels, 2, 2)).clamp(0, 1)
    optim = torch.optim.SGD(g.parameters(), lr=0.5)
    for _ in range(60):
        optim.zero_grad()
        nn.functional.cross_entropy(g(images), labels).backward()
        optim.step()
    g.zero_grad(set_to_none=True)
    return g.eval().requires_grad_(False)


def test_translated_batch_gains_target_confidence_and_stays_in_range():
    g, f = separable_g(), tiny_backbone()
    x0 = torch.full((6, 1, 2, 2), 0.15)  # class-0 seeds
    targets = torch.tensor([1, 1, 1, 2, 2, 2])
    before = target_confidence(g, x0, targets)
    start = random_start(x0, 0.5, (0.0, 1.0))
    out = translate(start, torch.zeros(6, dtype=torch.long), targets, f, g, steps=15, step_size=0.1, lam=0.5,
                    value_range=(0.0, 1.0))
    after = target_confidence(g, out, targets)
    assert (after > before + 0.3).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


# -------------------------------------------------------------------------------------------- augment
def batch(n: int = 64, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    labels = torch.arange(3).repeat(n // 3 + 1)[:n]
    return torch.rand(n, channels, 2, 2), labels


def test_rejected_generations_keep_the_real_sample():
    g = linear([[0.01] * 4, [0.0] * 4, [-0.01] * 4], [0.0, 0.0, 0.0])  # confidence ~1/3: L ≈ 1.1 > γ = 0.99
    aug = make_m2m(g, beta=0.0)
    feats, labels = batch()
    out = aug(feats, labels, state(tiny_backbone().train()))
    assert torch.equal(out.feats, feats) and torch.equal(out.labels, labels)


def test_accepted_rows_are_confident_and_others_untouched():
    g, f = separable_g(), tiny_backbone()
    aug = make_m2m(g, gamma=-math.log(0.6), beta=0.0)  # β = 0: only g's test (confidence ≥ 0.6) can reject
    feats, labels = batch(64)
    torch.manual_seed(3)
    out = aug(feats, labels, state(f))
    changed = (out.feats != feats).flatten(1).any(dim=1)
    assert changed.any() and not changed[labels == 0].any()  # the most frequent class is never generated
    assert (target_confidence(g, out.feats[changed], labels[changed]) >= 0.6).all()
    assert torch.equal(out.labels, labels)
    assert out.feats.min() >= 0.0 and out.feats.max() <= 1.0


def test_generation_rate_per_class_is_one_minus_count_ratio():
    g = linear([[1.0] * 4, [0.0] * 4, [-1.0] * 4], [0.0, 0.0, 0.0])
    f = linear([[0.0] * 4] * 3, [0.0] * 3)
    aug = make_m2m(g, gamma=ACCEPT_ALL, beta=0.0, steps=1)  # every generation is accepted
    torch.manual_seed(4)
    labels = torch.tensor([0] * 10 + [1] * 1500 + [2] * 1500)
    feats = torch.full((len(labels), 1, 2, 2), 0.5)
    changed = (aug(feats, labels, state(f)).feats != feats).flatten(1).any(dim=1)
    for cls, p in ((1, 0.5), (2, 0.9)):
        rate = changed[labels == cls].float().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 1500)


def test_rejection_draw_follows_eq3():
    # Seeds of class 0 (n=100) for class 1 (n=50) with β = 0.99: a class-1 sample is generated with probability
    # 1 − 50/100 and the translation kept with 1 − 0.99^(100−50) (Eq. 3 uses the gap, not n_0: 1 − 0.99^100 would give 0.32).
    g = linear([[0.0] * 4] * 2, [0.0, 0.0])
    f = linear([[0.0] * 4] * 2, [0.0, 0.0])
    aug = make_m2m(g, counts=torch.tensor([100, 50]), gamma=ACCEPT_ALL, beta=0.99, steps=1)
    torch.manual_seed(5)
    labels = torch.tensor([0] + [1] * 3000)
    feats = torch.full((len(labels), 1, 2, 2), 0.5)
    rate = (aug(feats, labels, state(f)).feats != feats).flatten(1).any(dim=1)[1:].float().mean().item()
    p = (1 - 50 / 100) * (1 - 0.99 ** 50)  # ≈ 0.198
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 3000)


def test_reference_confidence_rule_keeps_only_confident_translations():
    g, f = separable_g(), tiny_backbone()
    aug = make_m2m(g, gamma=0.6, beta=0.0, acceptance="confidence")
    feats, labels = batch(64)
    torch.manual_seed(3)
    out = aug(feats, labels, state(f))
    changed = (out.feats != feats).flatten(1).any(dim=1)
    assert changed.any() and (target_confidence(g, out.feats[changed], labels[changed]) >= 0.6).all()


def test_diagnostics_count_attempts_acceptances_and_confidences():
    g, f = separable_g(), tiny_backbone()
    aug = make_m2m(g, gamma=-math.log(0.6), beta=0.0)
    feats, labels = batch(64)
    torch.manual_seed(3)
    out = aug(feats, labels, state(f))
    changed = (out.feats != feats).flatten(1).any(dim=1)
    values = aug.epoch_diagnostics()
    assert values["accepted"] == changed.sum().item() > 0
    assert values["accepted"] <= values["g_passed"] <= values["attempts"] <= (labels != 0).sum().item()
    assert values["acceptance_rate"] == pytest.approx(values["accepted"] / values["attempts"])
    assert values["g_pass_rate"] == pytest.approx(values["g_passed"] / values["attempts"])
    kept_confidence = target_confidence(g, out.feats[changed], labels[changed])
    assert values["accepted_confidence"] == pytest.approx(kept_confidence.mean().item(), rel=1e-5)
    assert values["accepted_confidence_min"] >= 0.6 > values["g_confidence_min"]
    assert aug.epoch_diagnostics() == {}  # collected once, then reset
    assert set(M2m.progress_keys) <= set(values)


def test_diagnostics_show_an_epoch_that_accepts_nothing():
    g = linear([[0.01] * 4, [0.0] * 4, [-0.01] * 4], [0.0, 0.0, 0.0])  # L ≈ 1.1 > γ = 0.99 everywhere
    aug = make_m2m(g, beta=0.0)
    feats, labels = batch()
    aug(feats, labels, state(tiny_backbone().train()))
    values = aug.epoch_diagnostics()
    assert values["attempts"] > 0 and values["accepted"] == values["acceptance_rate"] == values["g_pass_rate"] == 0
    assert values["g_confidence"] == pytest.approx(1 / 3, abs=0.02) and "accepted_confidence" not in values


class Counting(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls, self.modes = model, 0, set()

    def forward(self, x):
        self.calls += 1
        self.modes.update(m.training for m in self.modules())
        return self.model(x)


def test_one_batched_optimisation_isolates_f_and_g():
    g, f = Counting(separable_g().requires_grad_(True)), Counting(tiny_backbone())
    f.train()
    f.model.stages[0][2].eval()  # a frozen BN must stay frozen
    modes = [m.training for m in f.modules()]
    aug = make_m2m(g, gamma=ACCEPT_ALL, steps=10)
    feats, labels = batch(64)
    aug(feats, labels, state(f))
    assert (g.calls, f.calls) == (10 + 1, 10)  # one forward per step for the whole batch, plus the γ check
    assert f.modes == {False} and g.modes == {False}  # BN statistics and dropout frozen while generating
    assert [m.training for m in f.modules()] == modes
    assert all(p.grad is None for p in list(f.parameters()) + list(g.parameters()))
    assert aug.state_dict() == {} and list(aug.parameters()) == [] and list(aug.children()) == []


def test_reference_is_fetched_once_when_active_and_leaves_rng_alone():
    calls = []

    def reference_model(epochs=None, path=None):
        calls.append((epochs, path))
        torch.manual_seed(123)  # training g reseeds; the run must not notice
        return separable_g()

    aug = make_m2m(nn.Identity(), start_epoch=2, reference_epochs=7)
    aug.context.reference_model = reference_model
    feats, labels = batch(9)
    f = tiny_backbone()
    assert aug.sampler(1) is None and aug.sampler(2) == "class_balanced"
    aug.on_epoch_start(1)
    assert aug(feats, labels, state(f, epoch=1)).feats is feats and calls == []
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    aug.on_epoch_start(2)
    assert torch.equal(torch.rand(3), expected)
    aug(feats, labels, state(f, epoch=2))
    aug(feats, labels, state(f, epoch=3))
    assert calls == [(7, None)]


# ------------------------------------------------------------------------------------ real CIFAR-10
@pytest.mark.slow
@pytest.mark.cifar
def test_cifar10_slice_translates_and_reports(cifar_root: Path, tmp_path: Path):
    """ResNet-32 on a tiny CIFAR-10-LT slice, active from the first step, no grad clip: finite loss, every diagnostic.

    g is a 2-epoch ERM ResNet-32, near chance on the tail targets, so this does not require a kept
    translation; it requires that the attempts and g's confidence on them are measured. β = 0.9 (a
    paper candidate): with β = 0.999, Eq. 3 rejects nearly every seed when counts differ by < 100.
    """
    repo = Path(__file__).resolve().parents[1]
    config = load_run_config(repo / "configs" / "cifar10_lt.yaml", [
        f"data.root={cifar_root}", "data.max_train_per_class=100", "data.max_eval_per_class=20", "train.epochs=1",
        "train.threads=1", "train.device=cpu", "optim.schedule.warmup_epochs=0", "augmenter.name=m2m",
        "augmenter.start_epoch=0", "augmenter.m2m.reference_epochs=2", "augmenter.m2m.beta=0.9"])
    assert config.optim.grad_clip is None
    metrics = next(Trainer(config, cache_dir=tmp_path).run()).metrics
    assert math.isfinite(metrics["train/loss"]) and metrics["train/sampler"] == "class_balanced"
    assert metrics["aug/attempts"] > 0 and 0 <= metrics["aug/accepted"] <= metrics["aug/g_passed"] <= metrics["aug/attempts"]
    assert metrics["aug/acceptance_rate"] == pytest.approx(metrics["aug/accepted"] / metrics["aug/attempts"])
    assert 0 < metrics["aug/g_confidence"] < 1 and metrics["aug/g_confidence_max"] <= 1
    if metrics["aug/accepted"] > 0:
        assert metrics["aug/accepted_confidence_min"] >= math.exp(-0.99) - 1e-6  # Alg. 1: L(g; x*, k) ≤ γ
