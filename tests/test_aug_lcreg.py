"""LCReg: closed-form checks of Eq. 1–9 on hand-made tensors, gradient routing, ablation switches, state."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltsearch.augmenters.base import AugmenterContext, FeatureSpec, TrainState, create_augmenter, head_class_mask
from ltsearch.augmenters.lcreg import (Lcreg, LcregConfig, OnlineCovariance, implicit_augmentation_loss,
                                       latent_features, reconstruction_loss, similarity_maps)
from ltsearch.config import AugmenterConfig, RunConfig, TrainConfig, build
from ltsearch.errors import ConfigError
from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.registry import AUGMENTERS

NUM_CLASSES = 3


def tiny_backbone() -> Backbone:
    """Boundaries: 0 input 3×4×4, 1 -> 4×4×4, 2 -> 6×2×2, 3 -> 8×1×1 (the 1×1 case)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())]
    info = [FeatureInfo(3, 1, "input"), FeatureInfo(4, 1, "s0"), FeatureInfo(6, 2, "s1"), FeatureInfo(8, 4, "s2")]
    return Backbone(stages, nn.Linear(8, NUM_CLASSES), info)


def make_lcreg(insert_at: int = 2, *, epochs: int = 4, channels: int | None = None, size: int = 2,
               **section) -> Lcreg:
    augmenter = build(AugmenterConfig, {"name": "lcreg", "lcreg": section}, "augmenter")
    return make_from_config(augmenter, insert_at, epochs, channels or {1: 4, 2: 6, 3: 8}[insert_at], size)


def make_from_config(augmenter: AugmenterConfig, insert_at: int, epochs: int, channels: int, size: int) -> Lcreg:
    counts = torch.tensor([20, 6, 2])
    context = AugmenterContext(config=RunConfig(augmenter=augmenter, train=TrainConfig(epochs=epochs)),
                               insert_at=insert_at, start_epoch=0, head_ratio=0.5,
                               feature=FeatureSpec(channels, size, size), num_classes=NUM_CLASSES,
                               class_counts=counts, head_mask=head_class_mask(counts, 0.5),
                               device=torch.device("cpu"), cache_dir=Path("unused"))
    torch.manual_seed(1)
    return create_augmenter(context)


def state(model: nn.Module, *, epoch: int = 0, step: int = 0, epochs: int = 4, steps: int = 10) -> TrainState:
    return TrainState(epoch=epoch, epochs=epochs, step=step, steps_per_epoch=steps, model=model)


# ------------------------------------------------------------------------------------ config
def test_registered_with_paper_defaults():
    entry = AUGMENTERS.get("lcreg")
    assert entry.meta["defaults"] == {"insert_at": -1, "start_fraction": 0.0, "head_ratio": 0.5}
    cfg = build(AugmenterConfig, {"name": "lcreg"}, "augmenter").lcreg
    assert (cfg.latent_count, cfg.aug_weight, cfg.recon_weight, cfg.cls_weight) == (40, 0.1, 0.1, 1.0)
    assert cfg.second_stage_epochs == 0 and cfg.covariance == "full"


@pytest.mark.parametrize("key, value", [("latent_count", 0), ("latent_count", 2.5), ("aug_weight", -0.1),
                                        ("recon_weight", -1), ("cls_weight", 0.0), ("lambda0", -0.5),
                                        ("second_stage_epochs", -1), ("covariance", "low_rank")])
def test_out_of_range_values_name_the_dotted_key(key, value):
    with pytest.raises(ConfigError) as error:
        build(AugmenterConfig, {"name": "lcreg", "lcreg": {key: value}}, "augmenter")
    assert error.value.key == f"augmenter.lcreg.{key}"


def test_second_stage_must_leave_a_first_stage():
    augmenter = build(AugmenterConfig, {"name": "lcreg"}, "augmenter")
    augmenter.sections["lcreg"] = dataclasses.replace(augmenter.lcreg, second_stage_epochs=4)
    with pytest.raises(ConfigError) as error:
        make_from_config(augmenter, 2, epochs=4, channels=6, size=2)
    assert error.value.key == "augmenter.lcreg.second_stage_epochs"


# ------------------------------------------------------------------------------------ Eq. 1–4
def test_similarity_maps_in_unit_interval_and_softmax_over_latents_sums_to_one():
    torch.manual_seed(0)
    sim = similarity_maps(torch.randn(5, 6), torch.randn(2, 6, 7))
    assert sim.shape == (2, 5, 7)
    assert bool(((sim > 0) & (sim < 1)).all())
    torch.testing.assert_close(torch.softmax(sim, dim=1).sum(dim=1), torch.ones(2, 7))


def test_reconstruction_loss_on_a_hand_made_example():
    """Latents e1 = (1, 0), e2 = (0, 1); f at two positions (2, 0), (0, 2).

    S = [[σ(2), ½], [½, σ(2)]]; Ŝ^1 at position 1 is s = e^{σ(2)}/(e^{σ(2)} + e^{½}), so f̂_1 = (s, 1−s),
    f̂_2 = (1−s, s) and C_f = 2·[[s, 1−s], [1−s, s]]; each row's CE is softplus(2(1−s) − 2s).
    """
    encoded = torch.eye(2)
    flat = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])                # (N=1, D=2, P=2)
    assign = torch.softmax(similarity_maps(encoded, flat), dim=1)
    a = 1 / (1 + math.exp(-2))
    s = math.exp(a) / (math.exp(a) + math.exp(0.5))
    expected = math.log1p(math.exp(2 * (1 - s) - 2 * s))
    assert reconstruction_loss(encoded, assign, flat).item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_vanishes_on_a_single_position():
    encoded, flat = torch.randn(3, 4), torch.randn(2, 4, 1)
    assign = torch.softmax(similarity_maps(encoded, flat), dim=1)
    assert reconstruction_loss(encoded, assign, flat).item() == 0.0


def test_latent_features_are_assignment_weighted_means():
    flat = torch.tensor([[[1.0, 3.0]]])                           # N=1, D=1, P=2
    assign = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])            # M=2
    torch.testing.assert_close(latent_features(assign, flat), torch.tensor([[[2.5], [2.0]]]))


# ------------------------------------------------------------------------------------ Eq. 5–6
@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_online_covariance_equals_the_biased_covariance_of_the_whole_stream(mode):
    torch.manual_seed(0)
    stream = [torch.randn(n, 3, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 5.0 for n in (7, 1, 12, 3)]
    stats = OnlineCovariance(3, 4, mode)
    for batch in stream:
        stats.update(batch)
    seen = torch.cat(stream)                                       # (23, 3, 4)
    for m in range(3):
        cov = torch.cov(seen[:, m].T, correction=0)                # population (1/n) covariance
        torch.testing.assert_close(stats.cov[m], cov if mode == "full" else cov.diagonal(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.mean[m], seen[:, m].mean(0))
    assert stats.count.item() == 23


# ------------------------------------------------------------------------------------ Eq. 8–9
def test_isda_bound_is_plain_cross_entropy_at_zero_strength():
    torch.manual_seed(0)
    x, w, b, y = torch.randn(6, 3), torch.randn(4, 3), torch.randn(4), torch.tensor([0, 1, 2, 3, 0, 1])
    cov = torch.eye(3).expand(4, 3, 3)
    torch.testing.assert_close(implicit_augmentation_loss(x, y, w, b, cov, 0.0), F.cross_entropy(x @ w.T + b, y))


def test_isda_bound_on_a_hand_made_two_class_example():
    """D = 1, w = (1, 3), b = (0.5, 0), Σ_0 = 2, f = 1, y = 0: z_1 − z_0 = 3 − 1.5 = 1.5 and
    q = (3 − 1)²·2 = 8, so with λ = 0.25 the bound is log(1 + e^{1.5 + 0.125·8}) = softplus(2.5)."""
    loss = implicit_augmentation_loss(torch.tensor([[1.0]]), torch.tensor([0]), torch.tensor([[1.0], [3.0]]),
                                      torch.tensor([0.5, 0.0]), torch.tensor([[[2.0]], [[5.0]]]), 0.25)
    assert loss.item() == pytest.approx(math.log1p(math.exp(2.5)), rel=1e-6)


@pytest.mark.parametrize("strength, max_gap", [(1e-3, 1.5e-3), (1.0, None)])
def test_isda_bound_dominates_monte_carlo_expected_cross_entropy(strength, max_gap):
    """E_{f̃~N(f, λΣ_y)} CE <= bound (Jensen); the gap shrinks with λΣ (O(λ): 0.0008 at λ = 1e-3, 3.4 at λ = 1)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    w = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    root = torch.randn(3, 3, 3, generator=gen, dtype=torch.float64)
    cov = root @ root.transpose(1, 2) / 3                          # PSD per class
    draws = 100_000
    noise = torch.randn(draws, 4, 3, generator=gen, dtype=torch.float64)
    chol = torch.linalg.cholesky(strength * cov[y])               # (4, 3, 3)
    augmented = x + torch.einsum("sid,ied->sie", noise, chol)     # samples of N(x_i, λΣ_{y_i})
    ce = F.cross_entropy((augmented @ w.T + b).reshape(-1, 3), y.repeat(draws), reduction="none").view(draws, 4)
    monte_carlo = ce.mean(0).mean()
    stderr = ce.mean(1).std() / math.sqrt(draws)
    bound = implicit_augmentation_loss(x, y, w, b, cov, strength)
    assert bound >= monte_carlo - 4 * stderr
    if max_gap is not None:
        assert bound - monte_carlo <= max_gap
    else:
        assert bound - monte_carlo > 10 * stderr                   # strict for large λΣ: not the plain CE


def test_diagonal_covariance_matches_full_with_a_diagonal_matrix():
    torch.manual_seed(0)
    x, w, y = torch.randn(5, 3), torch.randn(4, 3), torch.tensor([0, 3, 2, 1, 1])
    var = torch.rand(4, 3)
    torch.testing.assert_close(implicit_augmentation_loss(x, y, w, None, var, 0.7),
                               implicit_augmentation_loss(x, y, w, None, torch.diag_embed(var), 0.7))


# ------------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("insert_at, channels, size", [(1, 4, 4), (2, 6, 2), (3, 8, 1)])
def test_shapes_and_backward_at_every_boundary(insert_at, channels, size):
    model = tiny_backbone()
    aug = make_lcreg(insert_at, latent_count=5)
    x, y = torch.rand(3, 3, 4, 4), torch.tensor([0, 1, 2])
    feats = model.forward_until(insert_at, x)
    assert feats.shape == (3, channels, size, size)
    out = aug(feats, y, state(model, step=5))
    assert out.feats.shape == feats.shape and torch.equal(out.labels, y)
    assert set(out.aux_losses) == {"recon", "latent_aug"} and all(v.dim() == 0 for v in out.aux_losses.values())
    logits = model.forward_from(insert_at, out.feats)
    assert logits.shape == (3, NUM_CLASSES)
    loss = aug.cls_weight * F.cross_entropy(logits, out.labels)
    loss = loss + sum(aug.loss_weights[name] * term for name, term in out.aux_losses.items())
    loss.backward()
    assert torch.isfinite(aug.latents.grad).all() and aug.latents.grad.abs().sum() > 0
    assert aug.stats.count.item() == 3


def test_lambda_ramps_with_progress():
    """λ = (t/T)·λ0: repeating a batch leaves Σ unchanged, so L_aug is the bound at λ0·t/T exactly."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, lambda0=2.0)
    feats = torch.rand(5, 6, 2, 2)
    total = 4 * 10
    values = [aug(feats, torch.zeros(5, dtype=torch.long), state(model, step=t)).aux_losses["latent_aug"].item()
              for t in (0, 20, 40)]
    with torch.no_grad():
        sim, encoded, flat = aug._similarity(feats)
        samples = latent_features(torch.softmax(sim, 1), flat).reshape(-1, 6)
        targets = torch.arange(4).repeat(5)
        expected = [implicit_augmentation_loss(samples, targets, encoded, None, aug.stats.cov, 2.0 * t / total).item()
                    for t in (0, 20, 40)]
        plain = F.cross_entropy(samples @ encoded.T, targets).item()
    assert values == pytest.approx(expected, rel=1e-5)
    assert values[0] == pytest.approx(plain, rel=1e-5)
    assert values[0] < values[1] < values[2]


def test_reconstruction_term_uses_the_maps_normalised_over_latents():
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    feats = torch.rand(3, 6, 2, 2)
    recon = aug(feats, torch.tensor([0, 1, 2]), state(model)).aux_losses["recon"]
    with torch.no_grad():
        sim, encoded, flat = aug._similarity(feats)
        torch.testing.assert_close(recon, reconstruction_loss(encoded, torch.softmax(sim, dim=1), flat))


@pytest.mark.parametrize("term", ["recon", "latent_aug"])
def test_latents_and_fc_get_gradient_from_each_auxiliary_term(term):
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    feats = torch.rand(3, 6, 2, 2, requires_grad=True)
    out = aug(feats, torch.tensor([0, 1, 2]), state(model, step=10))
    out.aux_losses[term].backward()
    for param in (aug.latents, aug.encode.weight, aug.encode.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert feats.grad.abs().sum() > 0                              # the encoder learns from the term too
    assert aug.decode.weight.grad is None                          # the decoder only serves L_cls


def test_classification_loss_trains_the_decoder_and_through_it_the_latents():
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    feats = model.forward_until(2, torch.rand(3, 3, 4, 4))
    F.cross_entropy(model.forward_from(2, aug(feats, torch.tensor([0, 1, 2]), state(model)).feats),
                    torch.tensor([0, 1, 2])).backward()
    assert aug.decode.weight.grad.abs().sum() > 0
    with torch.no_grad():
        aug.decode.weight.normal_()
    aug.zero_grad()
    F.cross_entropy(model.forward_from(2, aug(feats.detach(), torch.tensor([0, 1, 2]), state(model)).feats),
                    torch.tensor([0, 1, 2])).backward()
    assert aug.latents.grad.abs().sum() > 0


@pytest.mark.parametrize("section, present", [({"aug_weight": 0.0}, {"recon"}), ({"recon_weight": 0.0}, {"latent_aug"}),
                                              ({"aug_weight": 0.0, "recon_weight": 0.0}, set())])
def test_zero_weight_removes_the_term(section, present):
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, **section)
    out = aug(torch.rand(3, 6, 2, 2), torch.tensor([0, 1, 2]), state(model, step=3))
    assert set(out.aux_losses) == present
    assert aug.stats.count.item() == (3 if "latent_aug" in present else 0)   # statistics only when the term exists
    assert aug.loss_weights == {"latent_aug": section.get("aug_weight", 0.1), "recon": section.get("recon_weight", 0.1)}


def test_decoder_starts_as_identity_and_eval_transform_matches_training_features():
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    feats = torch.rand(3, 6, 2, 2)
    assert torch.equal(aug(feats, torch.tensor([0, 1, 2]), state(model)).feats, feats)
    with torch.no_grad():
        aug.decode.weight.normal_()
        aug.decode.bias.normal_()
    trained = aug(feats, torch.tensor([0, 1, 2]), state(model)).feats
    assert not torch.equal(trained, feats)
    torch.testing.assert_close(aug.eval_transform(feats), trained)


def test_statistics_stay_float32_under_autocast():
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(torch.rand(3, 6, 2, 2).bfloat16(), torch.tensor([0, 1, 2]), state(model, step=4))
    assert out.feats.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.aux_losses.values())
    assert aug.stats.cov.dtype == torch.float32 and aug.stats.cov.abs().sum() > 0


def test_state_dict_round_trip_reproduces_the_step():
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    feats, y = torch.rand(3, 6, 2, 2), torch.tensor([0, 1, 2])
    aug(feats, y, state(model, step=3))
    with torch.no_grad():
        aug.decode.weight.normal_()
    saved = {k: v.clone() for k, v in aug.state_dict().items()}
    assert {"latents", "encode.weight", "decode.weight", "stats.mean", "stats.cov", "stats.count"} <= set(saved)
    restored = make_lcreg(latent_count=4)
    restored.load_state_dict(saved)
    a, b = aug(2 * feats, y, state(model, step=7)), restored(2 * feats, y, state(model, step=7))
    assert torch.equal(a.feats, b.feats)
    assert all(torch.equal(a.aux_losses[k], b.aux_losses[k]) for k in a.aux_losses)
    assert torch.equal(aug.stats.cov, restored.stats.cov) and torch.equal(aug.stats.count, restored.stats.count)


def test_second_stage_trains_only_the_classifier_without_auxiliary_terms(monkeypatch):
    monkeypatch.setattr(LcregConfig, "validate", lambda self, where: None)   # the sampler registry is a colleague's
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, epochs=10, second_stage_epochs=2)
    feats, y = torch.rand(3, 6, 2, 2), torch.tensor([0, 1, 2])
    assert aug.trainable_parameters_filter(7) is None and aug.sampler(7) is None
    assert set(aug(feats, y, state(model, epoch=7, epochs=10)).aux_losses) == {"recon", "latent_aug"}
    keep = aug.trainable_parameters_filter(8)
    assert [n for n, _ in model.named_parameters() if keep(n)] == ["classifier.weight", "classifier.bias"]
    assert aug.sampler(9) == "class_balanced"
    aug.on_epoch_start(8)
    assert not any(p.requires_grad for p in aug.parameters())
    count = aug.stats.count.clone()
    out = aug(feats, y, state(model, epoch=8, epochs=10))
    assert out.aux_losses == {} and torch.equal(out.feats, aug.eval_transform(feats))
    assert torch.equal(aug.stats.count, count)
