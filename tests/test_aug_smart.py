"""SMART: the EMA of Eq. 2–3 against batch statistics, Γ/Σ_th/ω/Eq. 6 on hand-made numbers, full vs
diagonal, head features untouched, the head/tail batch structure, gradients, checkpoints and shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ltsearch.augmenters.base import AugmenterContext, FeatureSpec, TrainState, head_class_mask
from ltsearch.augmenters.smart import (EPS, VARIANCE_FLOOR, Smart, SmartConfig, mixing_weights, positions,
                                       semantic_weight, spread, transfer_diagonal, transfer_features, transfer_full,
                                       unit_covariance)
from ltsearch.config import AugmenterConfig, RunConfig, build
from ltsearch.errors import ConfigError
from ltsearch.models.base import Backbone, FeatureInfo, Normalize, create_backbone
from ltsearch.registry import AUGMENTERS, SAMPLERS

REPO_ROOT = Path(__file__).resolve().parents[1]
COUNTS = torch.tensor([40, 30, 6, 3])  # classes 0, 1 are head at γ = 0.5
LN3 = math.log(3.0)


def make_smart(channels: int = 3, counts: torch.Tensor = COUNTS, start_epoch: int = 0, hw: tuple[int, int] = (2, 2),
               **section) -> Smart:
    augmenter = AugmenterConfig(name="smart", sections={"smart": build(SmartConfig, section, "augmenter.smart")})
    context = AugmenterContext(
        config=RunConfig(augmenter=augmenter), insert_at=1, start_epoch=start_epoch, head_ratio=0.5,
        feature=FeatureSpec(channels, *hw), num_classes=len(counts), class_counts=counts,
        head_mask=head_class_mask(counts, 0.5), device=torch.device("cpu"), cache_dir=Path("unused"))
    return Smart(context)


def state(model: nn.Module | None = None, epoch: int = 0) -> TrainState:
    return TrainState(epoch=epoch, epochs=10, step=0, steps_per_epoch=1, model=model or nn.Identity())


def tiny_backbone(num_classes: int = 4) -> Backbone:
    """Two conv stages (8x8 -> 8x8 -> 4x4), so boundary 1 sits between trainable layers."""
    stages = [nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.ReLU())]
    info = [FeatureInfo(3, 1, "input"), FeatureInfo(4, 1, "s0"), FeatureInfo(3, 2, "s1")]
    return Backbone(stages, nn.Linear(3, num_classes), info)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased covariance of the rows of x (N, D)."""
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / len(x)


# --------------------------------------------------------------------------------------------- config
def test_registered_with_paper_defaults():
    entry = AUGMENTERS.get("smart")
    assert entry.obj is Smart and entry.config is SmartConfig
    assert entry.meta["defaults"] == {"insert_at": -1, "start_fraction": 0.0, "head_ratio": 0.5}
    cfg = build(AugmenterConfig, {"name": "smart", "smart": {}}, "augmenter").smart
    assert (cfg.tau, cfg.ema, cfg.weights, cfg.source, cfg.selection, cfg.covariance, cfg.scale) == \
           (1.0, "dynamic", True, "both", "random", "full", "normalized")  # Sec. 3.3: a randomly sampled head


@pytest.mark.parametrize("key, value", [("tau", 0.0), ("tau", -1.0), ("momentum", 0.0), ("momentum", 1.5),
                                        ("ema", "slow"), ("source", "mixed"), ("selection", "wordnet"),
                                        ("covariance", "lowrank"), ("weights", "yes"),
                                        ("scale", "unitless")])
def test_config_rejects_out_of_range(key, value):
    with pytest.raises(ConfigError) as error:
        build(SmartConfig, {key: value}, "augmenter.smart")
    assert error.value.key == f"augmenter.smart.{key}"


def test_full_covariance_too_large_for_a_gpu_is_refused_before_allocating():
    with pytest.raises(ConfigError) as error:
        make_smart(channels=2048, counts=torch.arange(1000, 0, -1))
    assert error.value.key == "augmenter.smart.covariance"
    assert make_smart(channels=2048, counts=torch.arange(1000, 0, -1), covariance="diagonal").moments.cov.shape == (1000, 2048)


# ----------------------------------------------------------------------------------------- Eq. 2–3
def stream(seed: int = 0):
    """Three batches of (2, 3, 2, 3) maps; class 2 is absent from the second batch."""
    gen = torch.Generator().manual_seed(seed)
    labels = [torch.tensor([0, 2, 2, 0, 1]), torch.tensor([1, 0, 0]), torch.tensor([2, 0, 2, 2, 1, 1])]
    return [(torch.randn(len(y), 3, 2, 3, generator=gen) + 2.0 * y.view(-1, 1, 1, 1) * torch.rand(1, generator=gen), y)
            for y in labels]


def test_dynamic_ema_mean_is_exact_and_covariance_is_the_pooled_within_batch_covariance():
    smart = make_smart(hw=(2, 3))
    batches = stream()
    for feats, labels in batches:
        smart.moments.update(positions(feats), labels, None)
    for k in range(3):
        per_batch = [positions(f[y == k]).reshape(-1, 3) for f, y in batches if (y == k).any()]
        images = [int((y == k).sum()) for _, y in batches]
        mean, pooled = batch_stats(torch.cat(per_batch))
        stats = [batch_stats(x) for x in per_batch]
        weights = [len(x) / sum(len(x) for x in per_batch) for x in per_batch]  # = M_b / N (6 positions per image)
        within = sum(w * cov for w, (_, cov) in zip(weights, stats))
        between = sum(w * torch.outer(m - mean, m - mean) for w, (m, _) in zip(weights, stats))
        assert int(smart.moments.count[k]) == sum(images)
        torch.testing.assert_close(smart.moments.mean[k], mean)  # α = M/N: the exact running mean
        torch.testing.assert_close(smart.moments.cov[k], within)  # Eq. 3 as written
        torch.testing.assert_close(smart.moments.cov[k] + between, pooled)  # what Eq. 3 leaves out
        assert between.abs().max() > 1e-2  # ... which is not negligible here
    assert int(smart.moments.count[3]) == 0 and smart.moments.cov[3].abs().sum() == 0


def test_fixed_momentum_ema_starts_at_the_first_batch_and_leaves_absent_classes_alone():
    smart = make_smart(hw=(2, 3), ema="fixed", momentum=0.25)
    (f1, y1), (f2, y2), _ = stream()
    smart.moments.update(positions(f1), y1, smart._momentum)
    first = [batch_stats(positions(f1[y1 == k]).reshape(-1, 3)) for k in range(3)]
    for k in range(3):
        torch.testing.assert_close(smart.moments.mean[k], first[k][0])
        torch.testing.assert_close(smart.moments.cov[k], first[k][1])
    smart.moments.update(positions(f2), y2, smart._momentum)
    for k in (0, 1):
        mean_b, cov_b = batch_stats(positions(f2[y2 == k]).reshape(-1, 3))
        torch.testing.assert_close(smart.moments.mean[k], 0.75 * first[k][0] + 0.25 * mean_b)
        torch.testing.assert_close(smart.moments.cov[k], 0.75 * first[k][1] + 0.25 * cov_b)
    torch.testing.assert_close(smart.moments.cov[2], first[2][1])  # class 2 not in batch 2


def test_diagonal_moments_are_the_diagonal_of_the_full_ones():
    full, diagonal = make_smart(hw=(2, 3)), make_smart(hw=(2, 3), covariance="diagonal")
    for feats, labels in stream(seed=3):
        full.moments.update(positions(feats), labels, None)
        diagonal.moments.update(positions(feats), labels, None)
    torch.testing.assert_close(diagonal.moments.mean, full.moments.mean)
    torch.testing.assert_close(diagonal.moments.cov, full.moments.cov.diagonal(dim1=-2, dim2=-1))


# ------------------------------------------------------------------------------------- Eq. 4–6, 11
SIGMA_T = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
SIGMA_H = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
# Σ̃ = Σ_tᵀΣ_h = [[2, 1], [4, 4]]; with τ = ln 3 row 1 is softmax(ln3·[2, 1]) = [9, 3]/12, row 2 is [1/2, 1/2]
SIGMA_TH = torch.tensor([[1.5, 0.25], [2.0, 2.0]])


def test_eq4_5_on_a_hand_made_pair():
    torch.testing.assert_close(transfer_full(SIGMA_T, SIGMA_H, LN3), SIGMA_TH)
    # softmax(τ·Σ̃), not Σ̃/τ: with Σ̃/τ row 1 would be e^{2/ln3}/(e^{2/ln3}+e^{1/ln3}) ≈ 0.714, not 0.75
    torch.testing.assert_close(mixing_weights(torch.tensor([[2.0, 1.0]]), LN3), torch.tensor([[0.75, 0.25]]))


def test_gamma_rows_sum_to_one_and_sharpen_with_tau():
    mixed = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(1))
    entropies = []
    for tau in (0.25, 1.0, 4.0, 16.0):
        gamma = mixing_weights(mixed, tau)
        torch.testing.assert_close(gamma.sum(-1), torch.ones(5, 6))
        entropies.append(-(gamma * gamma.log()).sum(-1))
    for smaller, larger in zip(entropies, entropies[1:]):
        assert (larger < smaller).all()
    assert (mixing_weights(mixed, 64.0).argmax(-1) == mixed.argmax(-1)).all()


def test_omega_eq11_on_a_hand_made_sigma_th():
    torch.testing.assert_close(semantic_weight(SIGMA_TH, diagonal=False), torch.tensor(5.75 / 2))
    torch.testing.assert_close(semantic_weight(torch.tensor([[1.0, 3.0, 5.0]]), diagonal=True), torch.tensor([3.0]))


def test_eq6_on_a_hand_made_feature():
    x = torch.tensor([[[3.0, 3.0], [1.0, -1.0]]])  # two positions; the second equals μ_t
    mean_t, var_t = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 4.0]])
    out = transfer_features(x, mean_t, var_t, SIGMA_TH[None])
    # z = ((3-1)/1, (3+1)/2) = (2, 2); z·Σ_th = (2·1.5 + 2·2, 2·0.25 + 2·2) = (7, 4.5); + μ_t
    torch.testing.assert_close(out, torch.tensor([[[8.0, 3.5], [1.0, -1.0]]]), atol=1e-6, rtol=1e-6)
    # ε keeps a zero-variance channel finite: the centred value is 0 there, so F̃ = μ_t
    flat = transfer_features(torch.ones(1, 1, 2), torch.ones(1, 2), torch.zeros(1, 2), SIGMA_TH[None])
    torch.testing.assert_close(flat, torch.ones(1, 1, 2))


def test_diagonal_formulas_equal_full_ones_on_diagonal_covariances():
    gen = torch.Generator().manual_seed(2)
    var_t, var_h = torch.rand(4, 5, generator=gen) + 0.1, torch.rand(4, 5, generator=gen) + 0.1
    x, mean_t = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 5, generator=gen)
    full = transfer_full(torch.diag_embed(var_t), torch.diag_embed(var_h), 2.0)
    diagonal = transfer_diagonal(var_t, var_h, 2.0)
    torch.testing.assert_close(full, torch.diag_embed(diagonal))  # off-diagonals of Γ ⊙ Σ̃ vanish
    torch.testing.assert_close(semantic_weight(full, False), semantic_weight(diagonal, True))
    torch.testing.assert_close(transfer_features(x, mean_t, var_t, full), transfer_features(x, mean_t, var_t, diagonal))
    torch.testing.assert_close(transfer_diagonal(var_t[:, :1], var_h[:, :1], 2.0), var_t[:, :1] * var_h[:, :1])  # D = 1


# ------------------------------------------------------------------------------------- one step
def warm(smart: Smart, seed: int = 0) -> None:
    """Moments for every class, from one batch holding each class twice."""
    feats = torch.randn(8, smart.moments.mean.shape[1], 2, 2, generator=torch.Generator().manual_seed(seed)).abs()
    smart.moments.update(positions(feats), torch.arange(4).repeat(2), None)


def test_literal_scale_moves_only_tail_features_by_eq6_with_the_updated_moments():
    torch.manual_seed(0)
    smart = make_smart(selection="fixed", tau=0.5, scale="literal")
    warm(smart)
    feats = torch.randn(6, 3, 2, 2).abs()
    labels = torch.tensor([2, 3, 2, 0, 1, 0])
    out = smart(feats, labels, state())
    moments = smart.moments  # already updated with this batch (Algorithm 1: line 7 before lines 8-9)
    heads = smart.fixed_head[labels[:3]]
    assert smart.head_mask[heads].all()
    sigma_th = transfer_full(moments.cov[labels[:3]], moments.cov[heads], 0.5)
    expected = transfer_features(positions(feats[:3]), moments.mean[labels[:3]], moments.variance(labels[:3]), sigma_th)
    torch.testing.assert_close(positions(out.feats[:3]), expected)
    assert torch.equal(out.feats[3:], feats[3:])  # head samples bit-identical
    assert not torch.allclose(out.feats[:3], feats[:3])
    assert torch.equal(out.labels, labels)
    torch.testing.assert_close(out.sample_weights, torch.cat([semantic_weight(sigma_th, False), torch.ones(3)]))


def test_normalized_scale_is_eq4_5_on_unit_covariances_coloured_to_the_head_total_variance():
    torch.manual_seed(0)
    smart = make_smart(selection="fixed", tau=0.5)
    warm(smart)
    feats, labels = torch.randn(6, 3, 2, 2).abs(), torch.tensor([2, 3, 2, 0, 1, 0])
    out = smart(feats, labels, state())
    m, tails = smart.moments, labels[:3]
    heads = smart.fixed_head[tails]
    cov_t, cov_h = m.cov[tails], m.cov[heads]
    mean_var_t, mean_var_h = m.variance(tails).mean(1), m.variance(heads).mean(1)
    sigma_th = transfer_full(cov_t / mean_var_t[:, None, None], cov_h / mean_var_h[:, None, None], 0.5)
    var_t = torch.maximum(m.variance(tails), VARIANCE_FLOOR * mean_var_t[:, None])
    z_cov = cov_t / torch.sqrt((var_t + EPS)[:, :, None] * (var_t + EPS)[:, None, :])
    kappa = torch.sqrt(m.variance(heads).sum(1) / torch.stack([torch.trace(s.T @ r @ s) for s, r in zip(sigma_th, z_cov)]))
    expected = transfer_features(positions(feats[:3]), m.mean[tails], var_t, sigma_th * kappa[:, None, None])
    torch.testing.assert_close(positions(out.feats[:3]), expected)
    assert torch.equal(out.feats[3:], feats[3:])
    omega = 1 + sigma_th.sum((1, 2)) / 9  # Eq. 11 divided by C, on top of a head sample's weight 1
    torch.testing.assert_close(out.sample_weights, torch.cat([omega, torch.ones(3)]))
    assert (omega > 1).all() and (omega < 2).all()


def test_normalized_step_on_a_hand_computed_correlated_pair():
    """The default path against numbers worked by hand, not against a copy of its formulas.

    Tail class 2: μ_t = (2, −1), Σ_t = [[1, .5], [.5, 1]] (v̄_t = 1); head class 0: μ_h = (5, 5), Σ_h = 2·I
    (v̄_h = 2, Σ̂_h = I). Σ̃ = Σ̂_tᵀΣ̂_h = Σ_t; τ = 2·ln 3 makes each row of Γ = softmax(τ·Σ̃) (.75, .25), so
    Σ_th = [[.75, .125], [.125, .75]], with eigenvalues .875 along e1 = (1, 1)/√2 and .625 along e2 = (1, −1)/√2,
    where Σ_t has 1.5 and .5. ω = 1 + (.75 + .125 + .125 + .75)/2² = 1.4375. With σ_t² = 1, Cov(z) = Σ_t and
    tr(Σ_thᵀ Σ_t Σ_th) = .875²·1.5 + .625²·.5 = 1.34375, so κ = √(tr Σ_h / 1.34375) = √(4 / 1.34375).
    Each batch's moments equal the running ones, so the step's own update (Algorithm 1, line 7) keeps them.
    """
    smart = make_smart(channels=2, tau=2 * LN3)
    e1, e2 = torch.tensor([1.0, 1.0]) / math.sqrt(2), torch.tensor([1.0, -1.0]) / math.sqrt(2)
    tail_offsets = torch.stack([math.sqrt(3) * e1, -math.sqrt(3) * e1, e2, -e2])  # mean 0, biased cov Σ_t
    head_offsets = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, biased cov 2·I
    mean_t, mean_h = torch.tensor([2.0, -1.0]), torch.tensor([5.0, 5.0])
    m = smart.moments
    m.mean[2], m.cov[2], m.count[2] = mean_t, torch.tensor([[1.0, 0.5], [0.5, 1.0]]), 10
    m.mean[0], m.cov[0], m.count[0] = mean_h, 2 * torch.eye(2), 10  # class 0 is the only head seen: always drawn
    x = torch.stack([mean_t + tail_offsets, mean_h + head_offsets])  # (2 images, 4 positions, 2 channels)
    feats = x.transpose(1, 2).reshape(2, 2, 2, 2)
    out = smart(feats, torch.tensor([2, 0]), state())

    kappa = math.sqrt(4 / 1.34375)
    moved = mean_t + kappa * torch.stack([0.875 * math.sqrt(3) * e1, -0.875 * math.sqrt(3) * e1, 0.625 * e2, -0.625 * e2])
    torch.testing.assert_close(positions(out.feats)[0], moved, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved.var(0, unbiased=False).sum(), torch.tensor(4.0))  # tr Σ_h, the head's total
    assert torch.equal(out.feats[1], feats[1])
    torch.testing.assert_close(out.sample_weights, torch.tensor([1.4375, 1.0]))
    diagnostics = smart.epoch_diagnostics()
    assert diagnostics["kappa"] == pytest.approx(kappa, rel=1e-5)
    assert diagnostics["omega"] == pytest.approx(1.4375, rel=1e-6)


def test_normalized_transfer_gives_the_tail_class_the_head_total_variance_and_keeps_its_mean():
    gen = torch.Generator().manual_seed(4)
    mix_t, mix_h = torch.randn(3, 3, generator=gen), 3.0 * torch.randn(3, 3, generator=gen)
    tail_x = (torch.randn(4000, 3, generator=gen) @ mix_t + 5.0).view(1000, 4, 3)  # 1000 images x 4 positions
    head_x = (torch.randn(4000, 3, generator=gen) @ mix_h).view(1000, 4, 3)
    smart = make_smart(selection="fixed")
    smart.fixed_head.fill_(0)
    smart.moments.update(torch.cat([tail_x, head_x]), torch.tensor([3] * 1000 + [0] * 1000), None)
    labels = torch.full((1000,), 3)
    sigma_th = smart.transfer(labels, smart.fixed_head[labels])
    var_t = smart.whitening_variance(labels)
    gain = smart.gain(labels, smart.fixed_head[labels], sigma_th, var_t)
    moved = transfer_features(tail_x, smart.moments.mean[labels], var_t, sigma_th, gain).reshape(-1, 3)
    mean, cov = batch_stats(moved)
    torch.testing.assert_close(mean, smart.moments.mean[3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.trace(cov), torch.trace(smart.moments.cov[0]), rtol=1e-4, atol=1e-4)


def test_normalized_scale_is_invariant_to_the_feature_scale_and_literal_is_not():
    """The divergence's feedback loop: literal ω and displacement grow with s^4 and s^3 when features grow by s."""
    def step(scale: str, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        smart = make_smart(selection="fixed", scale=scale)
        gen = torch.Generator().manual_seed(1)
        smart.moments.update(positions(factor * torch.randn(8, 3, 2, 2, generator=gen).abs()), torch.arange(4).repeat(2), None)
        feats = factor * torch.randn(4, 3, 2, 2, generator=gen).abs()
        out = smart(feats, torch.tensor([2, 3, 0, 1]), state())
        return out.feats[:2] - feats[:2].mean((2, 3), keepdim=True), out.sample_weights[:2]

    (moved_1, omega_1), (moved_10, omega_10) = step("normalized", 1.0), step("normalized", 10.0)
    torch.testing.assert_close(moved_10, 10 * moved_1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(omega_10, omega_1)
    (_, literal_1), (_, literal_10) = step("literal", 1.0), step("literal", 10.0)
    assert (literal_10 > 1e3 * literal_1).all()


def test_a_channel_dead_in_the_moments_is_whitened_with_the_floor_not_with_epsilon():
    smart = make_smart(selection="fixed")
    warm(smart)
    smart.moments.cov[2, 1, :] = 0.0
    smart.moments.cov[2, :, 1] = 0.0  # channel 1 of class 2 never fired so far
    var = smart.whitening_variance(torch.tensor([2]))
    mean_var = smart.moments.variance(torch.tensor([2])).mean()
    torch.testing.assert_close(var[0, 1], VARIANCE_FLOOR * mean_var)
    feats = torch.randn(2, 3, 2, 2).abs() + 1.0  # ... but fires now
    out = smart(feats, torch.tensor([2, 0]), state())
    assert torch.isfinite(out.feats).all() and out.feats.abs().max() < 1e3


def test_tail_samples_are_untouched_until_a_head_class_has_been_seen():
    smart = make_smart()
    feats, labels = torch.randn(4, 3, 2, 2), torch.tensor([2, 3, 3, 2])
    out = smart(feats, labels, state())
    assert torch.equal(out.feats, feats) and torch.equal(out.sample_weights, torch.ones(4))
    assert int(smart.moments.count[2]) == 2  # ... but their moments are recorded


def test_append_keeps_the_real_batch_and_adds_the_replaced_features_of_the_moved_tail_samples():
    """`tail_features: append` = the batch untouched (weight 1) + exactly what `replace` puts in place of each
    moved tail sample (weight ω), in batch order; a tail sample with no head seen yet is not appended."""
    feats, labels = torch.randn(6, 3, 2, 2).abs(), torch.tensor([2, 3, 2, 0, 1, 3])
    outputs = {}
    for mode in ("replace", "append"):
        torch.manual_seed(0)  # the same fixed head per tail class
        smart = make_smart(selection="fixed", tau=0.5, tail_features=mode)
        warm(smart)
        outputs[mode] = smart(feats, labels, state())
    replaced, appended = outputs["replace"], outputs["append"]
    tail = torch.tensor([0, 1, 2, 5])
    assert torch.equal(appended.feats[:6], feats)
    assert torch.equal(appended.feats[6:], replaced.feats[tail])
    assert torch.equal(appended.labels, torch.cat([labels, labels[tail]]))
    assert torch.equal(appended.sample_weights, torch.cat([torch.ones(6), replaced.sample_weights[tail]]))
    assert (appended.sample_weights[6:] > 1).all()

    smart = make_smart(tail_features="append")  # a first batch of tail classes only: no head seen, nothing moves
    out = smart(feats[:3], labels[:3], state())
    assert torch.equal(out.feats, feats[:3]) and torch.equal(out.labels, labels[:3])


def test_append_without_weights_appends_unweighted():
    smart = make_smart(weights=False, tail_features="append")
    warm(smart)
    out = smart(torch.randn(4, 3, 2, 2), torch.tensor([3, 2, 1, 0]), state())
    assert out.sample_weights is None and out.feats.shape[0] == 6 and torch.equal(out.labels[4:], torch.tensor([3, 2]))


def test_weights_off_gives_no_sample_weights():
    smart = make_smart(weights=False)
    warm(smart)
    assert smart(torch.randn(4, 3, 2, 2), torch.tensor([3, 2, 1, 0]), state()).sample_weights is None


@pytest.mark.parametrize("source", ["head", "tail"])
def test_covariance_source_ablation(source):
    torch.manual_seed(0)
    smart = make_smart(selection="fixed", source=source)
    warm(smart)
    labels = torch.tensor([3])
    head = smart.fixed_head[labels]
    other = make_smart(selection="fixed")
    other.load_state_dict(smart.state_dict())
    cov = unit_covariance(smart.moments.cov[head if source == "head" else labels], diagonal=False)
    torch.testing.assert_close(smart.transfer(labels, head), transfer_full(cov, cov, 1.0))
    assert not torch.allclose(smart.transfer(labels, head), other.transfer(labels, head))


def test_full_and_diagonal_steps_agree_with_one_channel():
    full, diagonal = make_smart(channels=1), make_smart(channels=1, covariance="diagonal")
    warm(full)
    warm(diagonal)
    feats, labels = torch.randn(6, 1, 2, 2), torch.tensor([2, 3, 3, 0, 1, 2])
    torch.manual_seed(5)
    a = full(feats, labels, state())
    torch.manual_seed(5)
    b = diagonal(feats, labels, state())
    torch.testing.assert_close(a.feats, b.feats)
    torch.testing.assert_close(a.sample_weights, b.sample_weights)


def test_online_selection_follows_mean_similarity_sharpened_by_tau():
    def draws(tau: float, selection: str = "online") -> torch.Tensor:
        smart = make_smart(channels=2, tau=tau, selection=selection)
        means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, 1.0]])  # tail 2 resembles head 0
        smart.moments.mean.copy_(means)
        smart.moments.count.fill_(5)
        torch.manual_seed(0)
        return smart.choose_heads(torch.full((400,), 2))

    sharp, soft, uniform = draws(50.0), draws(1.0), draws(50.0, "random")
    assert (sharp == 0).all()
    share = float((soft == 0).float().mean())  # P(head 0) = e^{cos0}/(e^{cos0}+e^{cos1}) ≈ 0.69
    expected = 1 / (1 + math.exp(0.1 / math.hypot(0.9, 0.1) - 0.9 / math.hypot(0.9, 0.1)))
    assert abs(share - expected) < 0.07
    assert set(uniform.tolist()) == {0, 1} and abs(float((uniform == 0).float().mean()) - 0.5) < 0.08


def test_fixed_selection_is_one_head_per_tail_class_and_is_checkpointed():
    torch.manual_seed(3)
    smart = make_smart(selection="fixed")
    heads = smart.choose_heads(torch.tensor([2, 3, 2, 3]))
    assert torch.equal(heads[:2], heads[2:]) and smart.head_mask[heads].all()
    assert "fixed_head" in smart.state_dict()


# ---------------------------------------------------------------------------------- batch structure
def test_head_tail_sampler_gives_tail_half_then_head_half_and_only_the_tail_half_moves():
    smart = make_smart()
    assert smart.sampler(0) == "head_tail" and make_smart(start_epoch=2).sampler(1) is None
    labels = torch.repeat_interleave(torch.arange(4), COUNTS)
    indices = SAMPLERS.get(smart.sampler(0)).obj(labels, COUNTS, num_samples=32, batch_size=8,
                                                   generator=torch.Generator().manual_seed(0), head_mask=smart.head_mask)
    chunks = labels[indices].view(4, 8)
    assert not smart.head_mask[chunks[:, :4]].any() and smart.head_mask[chunks[:, 4:]].all()
    torch.manual_seed(0)
    for chunk in chunks:
        feats = torch.randn(8, 3, 2, 2).abs()
        out = smart(feats, chunk, state())
        assert torch.equal(out.feats[4:], feats[4:]) and torch.equal(out.sample_weights[4:], torch.ones(4))
        assert not torch.isclose(out.feats[:4], feats[:4]).all()


# ---------------------------------------------------------------------------------- gradients, state
def test_gradient_reaches_earlier_stages_through_eq6():
    torch.manual_seed(0)
    model, smart = tiny_backbone(), make_smart(channels=4, selection="fixed", hw=(8, 8))
    warm(smart)
    x, labels = torch.rand(4, 3, 8, 8), torch.tensor([2, 3, 0, 1])
    feats = model.forward_until(1, x)
    feats.retain_grad()
    out = smart(feats, labels, state(model))
    upstream = torch.randn_like(feats)
    (out.feats * upstream).sum().backward()
    assert model.stages[0][1].weight.grad.abs().sum() > 0
    heads = smart.fixed_head[labels[:2]]
    sigma_th = smart.transfer(labels[:2], heads)
    var_t = smart.whitening_variance(labels[:2])
    gain = smart.gain(labels[:2], heads, sigma_th, var_t)
    # d/dF of <F̃, G> = κ·(G·Σ_thᵀ)/sqrt(σ_t² + ε) for tail samples (statistics are constants), G for head samples
    std = torch.sqrt(var_t + EPS)
    expected = gain[:, None, None] * (positions(upstream[:2]) @ sigma_th.transpose(1, 2)) / std[:, None]
    torch.testing.assert_close(positions(feats.grad[:2]), expected)
    torch.testing.assert_close(feats.grad[2:], upstream[2:])
    assert not out.sample_weights.requires_grad


def test_state_dict_round_trip_restores_moments_and_the_next_step():
    smart = make_smart(selection="online")
    for feats, labels in stream():
        smart(feats[:, :, :2, :2].contiguous(), labels, state())
    restored = make_smart(selection="online")
    restored.load_state_dict(smart.state_dict())
    assert set(smart.state_dict()) == {"moments.mean", "moments.cov", "moments.count"}
    for key, value in smart.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    feats, labels = torch.randn(5, 3, 2, 2), torch.tensor([3, 2, 0, 1, 2])
    torch.manual_seed(9)
    a = smart(feats, labels, state())
    torch.manual_seed(9)
    b = restored(feats, labels, state())
    assert torch.equal(a.feats, b.feats) and torch.equal(a.sample_weights, b.sample_weights)


def test_idle_before_start_but_moments_stay_current():
    smart = make_smart(start_epoch=2)
    warm(smart)
    feats, labels = torch.randn(4, 3, 2, 2), torch.tensor([3, 2, 1, 0])
    out = smart(feats, labels, state(epoch=1))
    assert out.feats is feats and out.sample_weights is None
    assert int(smart.moments.count.sum()) == 12


def test_low_precision_features_keep_their_dtype_and_float32_moments():
    smart = make_smart()
    warm(smart)
    feats = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = smart(feats, torch.tensor([3, 2, 1, 0]), state())
    assert out.feats.dtype == torch.bfloat16 and smart.moments.cov.dtype == torch.float32
    assert torch.isfinite(out.feats.float()).all()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_resnet32_boundary_including_1x1(k):
    torch.manual_seed(0)
    model = create_backbone("resnet32", num_classes=4, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, labels = torch.rand(8, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    feats = model.forward_until(k, x)
    smart = make_smart(channels=feats.shape[1], hw=tuple(feats.shape[2:]))
    smart(feats.detach(), labels, state(model))  # first step: the head moments become known
    out = smart(feats, labels, state(model))
    assert out.feats.shape == feats.shape and (k < 4 or feats.shape[2:] == (1, 1))
    assert not torch.equal(out.feats[2:4], feats[2:4])
    logits = model.forward_from(k, out.feats)
    (logits.log_softmax(1).gather(1, labels[:, None]).squeeze(1) * out.sample_weights).sum().backward()
    assert torch.isfinite(logits).all() and model.stages[0][1].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- diagnostics
def test_diagnostics_count_transfers_and_average_omega_and_spread_over_transferred_samples_only():
    torch.manual_seed(0)
    smart = make_smart()
    assert smart.epoch_diagnostics() == {}
    smart(torch.randn(4, 3, 2, 2).abs(), torch.tensor([2, 3, 2, 3]), state())  # no head known yet: none moves
    smart(torch.randn(4, 3, 2, 2).abs(), torch.tensor([2, 3, 0, 0]), state())  # head 0 now known: both move
    feats, labels = torch.randn(4, 3, 2, 2).abs(), torch.tensor([2, 3, 1, 0])
    out = smart(feats, labels, state())
    values = smart.epoch_diagnostics()
    assert values["tail_samples"] == 8 and values["transferred"] == 4
    assert values["transferred_share"] == pytest.approx(0.5)
    # omega: mean/min/max over the 4 transferred tail samples (2 per moving step), never the head samples' 1
    assert values["omega"] > 1 and values["omega_min"] > 1 and values["omega_max"] >= values["omega"]
    mean_t = smart.moments.mean[labels[:2]]
    ratio = spread(positions(out.feats[:2]), mean_t) / spread(positions(feats[:2]), mean_t)
    assert values["spread_ratio_min"] <= float(ratio.min()) + 1e-5 and values["spread_ratio_max"] >= float(ratio.max()) - 1e-5
    assert {"spread_before", "spread_after", "kappa"} <= set(values) and not any(k.endswith("_sum") for k in values)
    assert smart.epoch_diagnostics() == {}  # reset after each epoch


def test_idle_epochs_report_no_diagnostics_and_an_epoch_without_transfers_reports_only_counts():
    smart = make_smart(start_epoch=2)
    smart(torch.randn(4, 3, 2, 2), torch.tensor([3, 2, 1, 0]), state(epoch=1))
    assert smart.epoch_diagnostics() == {}
    smart = make_smart()
    smart(torch.randn(2, 3, 2, 2), torch.tensor([3, 2]), state())  # no head class seen yet
    assert smart.epoch_diagnostics() == {"tail_samples": 2.0, "transferred": 0.0, "transferred_share": 0.0}


# ---------------------------------------------------------------------------------- real CIFAR-10
@pytest.mark.slow
@pytest.mark.cifar
def test_cifar10_resnet32_from_scratch_is_finite_and_reports_diagnostics(cifar_root):
    from ltsearch.config import load_run_config
    from ltsearch.engine import Trainer

    config = load_run_config(REPO_ROOT / "configs" / "cifar10_lt.yaml", [
        f"data.root={cifar_root}", "data.max_train_per_class=100", "data.max_eval_per_class=20", "train.epochs=2",
        "train.threads=1", "augmenter.name=smart", "augmenter.start_epoch=0", "optim.grad_clip=null"])
    trainer = Trainer(config, cache_dir=Path("/tmp/ltsearch-test-cache"))
    history = [result.metrics for result in trainer.run()]
    for metrics in history:
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/cls_loss"])
        assert metrics["aug/transferred_share"] > 0.9 and metrics["aug/transferred"] > 0
        assert 1.0 < metrics["aug/omega_min"] <= metrics["aug/omega"] <= metrics["aug/omega_max"] < 2.0
        assert 0.2 < metrics["aug/spread_ratio"] < 5.0 and math.isfinite(metrics["aug/spread_ratio_max"])
    assert history[0]["aug/omega"] != history[1]["aug/omega"]  # the moments, and with them ω, move
