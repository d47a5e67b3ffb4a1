"""LCReg: closed-form checks of Eq. 1–9 on hand-made tensors, gradient routing, ablation switches, state,
diagnostics, and one short run on the real CIFAR-10 files (slow)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltsearch.augmenters.base import AugmenterContext, FeatureSpec, TrainState, create_augmenter, head_class_mask
from ltsearch.augmenters._lcreg_terms import (OnlineCovariance, assignment, assignment_entropy, implicit_augmentation_loss,
                                              latent_features, latent_perplexity, latents_won, reconstruction_chance,
                                              reconstruction_loss, similarity_logits, similarity_maps)
from ltsearch.augmenters.lcreg import Lcreg, LcregConfig
from ltsearch.config import AugmenterConfig, RunConfig, TrainConfig, build, load_run_config, read_yaml
from ltsearch.engine import Trainer, learning_rate
from ltsearch.errors import ConfigError
from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.registry import AUGMENTERS

NUM_CLASSES = 3
REPO = Path(__file__).resolve().parents[1]


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
    assert (cfg.assignment, cfg.aug_features, cfg.recon_reduction, cfg.recon_temperature) == ("logits", "latents", "sum", 0.1)


@pytest.mark.parametrize("key, value", [("latent_count", 0), ("latent_count", 2.5), ("aug_weight", -0.1),
                                        ("recon_weight", -1), ("cls_weight", 0.0), ("lambda0", -0.5),
                                        ("second_stage_epochs", -1), ("covariance", "low_rank"), ("latent_count", 1),
                                        ("assignment", "softmax"), ("aug_features", "pooled"),
                                        ("recon_reduction", "max"), ("recon_temperature", 0.0)])
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


def test_cifar_preset_turns_on_the_decoupled_second_stage_and_the_space_uses_it(tmp_path):
    """Sec. 3.4: the CIFAR recipe fine-tunes only the classifier, at lr 1e-3, after the 200-epoch first stage."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: [{REPO}/configs/cifar10_lt.yaml, {REPO}/configs/presets/lcreg_cifar.yaml]\n")
    config = load_run_config(recipe)
    assert config.augmenter.name == "lcreg" and config.augmenter.lcreg.second_stage_epochs == 10
    lr = [learning_rate(config.optim.schedule, config.optim.lr, epoch, config.train.epochs) for epoch in (199, 200, 209)]
    assert config.train.epochs == 210 and lr == pytest.approx([1e-5, 1e-3, 1e-3])
    space = read_yaml(REPO / "search_spaces" / "lcreg_latents.yaml")
    assert space["augmenter"]["lcreg"]["second_stage_epochs"] == 10 and space["train"]["epochs"] == 210


# ------------------------------------------------------------------------------------ Eq. 1–4
def test_similarity_maps_in_unit_interval_and_softmax_over_latents_sums_to_one():
    torch.manual_seed(0)
    encoded, flat = torch.randn(5, 6), torch.randn(2, 6, 7)
    sim = similarity_maps(encoded, flat)
    assert sim.shape == (2, 5, 7)
    assert bool(((sim > 0) & (sim < 1)).all())
    for mode in ("logits", "sigmoid"):
        torch.testing.assert_close(assignment(similarity_logits(encoded, flat), mode).sum(dim=1), torch.ones(2, 7))


def test_literal_eq2_softmax_over_sigmoid_cannot_commit_to_a_latent():
    """The root cause of the chance-level terms: softmax over S ∈ (0, 1) keeps every ratio below e.

    With M = 40 and logits as decisive as ±50, the literal Ŝ still has entropy > ln 40 − 0.3 and its
    largest weight is below e/(e + 39) ≈ 0.065; the default (softmax over the logits) picks the winner.
    """
    logits = torch.full((1, 40, 1), -50.0)
    logits[0, 7, 0] = 50.0
    literal, default = assignment(logits, "sigmoid"), assignment(logits, "logits")
    assert literal.max().item() <= math.e / (math.e + 39) + 1e-6
    assert assignment_entropy(literal).item() > math.log(40) - 0.3
    assert default[0, 7, 0].item() == pytest.approx(1.0) and assignment_entropy(default).item() < 1e-6
    torch.testing.assert_close(default, torch.softmax(logits, dim=1))


def test_reconstruction_loss_on_a_hand_made_example():
    """Latents e1 = (1, 0), e2 = (0, 1); f at two positions (2, 0), (0, 2); literal Eq. 2 and dot-product C_f.

    S = [[σ(2), ½], [½, σ(2)]]; Ŝ^1 at position 1 is s = e^{σ(2)}/(e^{σ(2)} + e^{½}), so f̂_1 = (s, 1−s),
    f̂_2 = (1−s, s) and C_f = 2·[[s, 1−s], [1−s, s]]; each row's CE is softplus(2(1−s) − 2s), Eq. 4 sums
    the two rows, `mean` averages them.
    """
    encoded = torch.eye(2)
    flat = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])                # (N=1, D=2, P=2)
    assign = assignment(similarity_logits(encoded, flat), "sigmoid")
    a = 1 / (1 + math.exp(-2))
    s = math.exp(a) / (math.exp(a) + math.exp(0.5))
    row = math.log1p(math.exp(2 * (1 - s) - 2 * s))
    assert reconstruction_loss(encoded, assign, flat, "sum", None).item() == pytest.approx(2 * row, rel=1e-6)
    assert reconstruction_loss(encoded, assign, flat, "mean", None).item() == pytest.approx(row, rel=1e-6)


def test_cosine_reconstruction_on_a_hand_made_example_and_its_scale_invariance():
    """Same example with C_f = cos/τ: f̂_1 = (s, 1−s) has cosine s/√(s² + (1−s)²) with f_1 and (1−s)/√(…) with f_2.

    Scaling f or the latents by 10 leaves the cosine term unchanged (bounded logits, ±1/τ) but moves the
    dot-product one: that scale is what made the literal term's gradient blow the latents up on CIFAR-10.
    """
    encoded = torch.eye(2)
    flat = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    assign = assignment(similarity_logits(encoded, flat), "sigmoid")
    a = 1 / (1 + math.exp(-2))
    s = math.exp(a) / (math.exp(a) + math.exp(0.5))
    norm = math.hypot(s, 1 - s)
    row = math.log1p(math.exp(((1 - s) - s) / norm / 0.5))
    assert reconstruction_loss(encoded, assign, flat, "sum", 0.5).item() == pytest.approx(2 * row, rel=1e-6)
    torch.manual_seed(0)
    encoded, flat = torch.randn(4, 6), torch.rand(3, 6, 5)
    assign = assignment(similarity_logits(encoded, flat), "logits")
    cosine = reconstruction_loss(encoded, assign, flat, "sum", 0.1)
    torch.testing.assert_close(reconstruction_loss(10 * encoded, assign, 10 * flat, "sum", 0.1), cosine)
    dot = reconstruction_loss(encoded, assign, flat, "sum", None)
    assert abs(reconstruction_loss(10 * encoded, assign, 10 * flat, "sum", None).item() - dot.item()) > 1.0


def test_eq4_sums_over_positions_so_the_sum_is_hw_times_the_mean():
    torch.manual_seed(0)
    encoded, flat = torch.randn(4, 6), torch.rand(3, 6, 9)
    assign = assignment(similarity_logits(encoded, flat), "logits")
    torch.testing.assert_close(reconstruction_loss(encoded, assign, flat, "sum"),
                               9 * reconstruction_loss(encoded, assign, flat, "mean"))


def test_uninformative_latents_give_exactly_the_chance_level():
    """Zero latents: f̂ = 0, every row of C_f is flat, so L_Recon = ln(H·W) per position (Eq. 4's chance)."""
    encoded, flat = torch.zeros(4, 6), torch.rand(2, 6, 9)
    assign = assignment(similarity_logits(encoded, flat), "logits")
    assert assignment_entropy(assign).mean().item() == pytest.approx(math.log(4))
    for reduction, chance in (("sum", 9 * math.log(9)), ("mean", math.log(9))):
        assert reconstruction_chance(9, reduction) == pytest.approx(chance)
        assert reconstruction_loss(encoded, assign, flat, reduction).item() == pytest.approx(chance, rel=1e-6)


def test_reconstruction_loss_vanishes_on_a_single_position():
    encoded, flat = torch.randn(3, 4), torch.randn(2, 4, 1)
    assign = assignment(similarity_logits(encoded, flat), "logits")
    assert reconstruction_loss(encoded, assign, flat).item() == 0.0
    assert reconstruction_chance(1, "sum") == 0.0


def test_assignment_usage_statistics():
    """Two positions won by latent 0 and 2 of M = 4: two latents won, perplexity 2, entropy 0 per position."""
    assign = torch.zeros(1, 4, 2)
    assign[0, 0, 0] = assign[0, 2, 1] = 1.0
    assert latents_won(assign).item() == 2.0
    assert latent_perplexity(assign).item() == pytest.approx(2.0)
    assert assignment_entropy(assign).abs().max().item() < 1e-6
    assert latent_perplexity(torch.full((3, 4, 5), 0.25)).item() == pytest.approx(4.0)


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
@pytest.mark.parametrize("aug_features, samples_per_step", [("latents", 1), ("image_parts", 3)])
def test_shapes_and_backward_at_every_boundary(insert_at, channels, size, aug_features, samples_per_step):
    model = tiny_backbone()
    aug = make_lcreg(insert_at, latent_count=5, aug_features=aug_features)
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
    assert aug.stats.count.item() == samples_per_step


def test_latent_augmentation_classifies_the_latents_themselves_with_their_own_weight_and_bias():
    """Eq. 7–9 (default): samples f'_m with pseudo label m, logits W f'_m + b of a D→M 1×1 conv; no image enters."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    with torch.no_grad():
        aug.latent_classifier.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    one = aug(torch.rand(3, 6, 2, 2), torch.tensor([0, 1, 2]), state(model, step=8)).aux_losses["latent_aug"]
    other = aug(5 * torch.rand(2, 6, 2, 2), torch.tensor([0, 1]), state(model, step=8)).aux_losses["latent_aug"]
    with torch.no_grad():
        expected = implicit_augmentation_loss(aug.latents, torch.arange(4), aug.latent_classifier.weight,
                                              aug.latent_classifier.bias, aug.stats.cov, 0.5 * 8 / 40)
    torch.testing.assert_close(other, expected)
    torch.testing.assert_close(one, expected)       # Σ: the same latents twice, so their spread is still 0
    other.backward()
    assert aug.latent_classifier.bias.grad.abs().sum() > 0 and aug.latents.grad.abs().sum() > 0


def test_latent_statistics_follow_each_latent_along_training():
    """Eq. 5–6 with one sample of f'_m per step: Σ_m is the (1/n) covariance of f'_m over the steps seen."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=3)
    seen = []
    for step in range(5):
        with torch.no_grad():
            aug.latents.add_(0.3 * torch.randn_like(aug.latents))
        seen.append(aug.latents.detach().clone())
        aug(torch.rand(2, 6, 2, 2), torch.tensor([0, 1]), state(model, step=step))
    trajectory = torch.stack(seen)                                 # (5, M, D)
    for m in range(3):
        torch.testing.assert_close(aug.stats.cov[m], torch.cov(trajectory[:, m].T, correction=0), atol=1e-5, rtol=1e-4)
    assert aug.stats.count.item() == 5


def test_image_parts_option_keeps_the_earlier_reading_of_eq7_9():
    """`aug_features: image_parts`: u_{i,m} classified as m by w_j = FC(f'_j), no bias."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, aug_features="image_parts")
    assert not hasattr(aug, "latent_classifier")
    feats = torch.rand(5, 6, 2, 2)
    loss = aug(feats, torch.zeros(5, dtype=torch.long), state(model, step=20)).aux_losses["latent_aug"]
    with torch.no_grad():
        logits, encoded, flat = aug._similarity(feats)
        samples = latent_features(assignment(logits, "logits"), flat).reshape(-1, 6)
        expected = implicit_augmentation_loss(samples, torch.arange(4).repeat(5), encoded, None, aug.stats.cov, 0.5 * 20 / 40)
    torch.testing.assert_close(loss, expected)


def test_lambda_ramps_with_progress():
    """λ = (t/T)·λ0: with Σ fixed (a long stream, one more identical sample), L_aug is the bound at λ0·t/T."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, lambda0=2.0)
    root = torch.randn(4, 6, 6)
    aug.stats.cov.copy_(root @ root.transpose(1, 2))
    aug.stats.mean.copy_(aug.latents.detach())
    aug.stats.count.fill_(1e9)
    feats, total = torch.rand(5, 6, 2, 2), 4 * 10
    values = [aug(feats, torch.zeros(5, dtype=torch.long), state(model, step=t)).aux_losses["latent_aug"].item()
              for t in (0, 20, 40)]
    with torch.no_grad():
        weight, bias = aug.latent_classifier.weight, aug.latent_classifier.bias
        expected = [implicit_augmentation_loss(aug.latents, torch.arange(4), weight, bias, aug.stats.cov, 2.0 * t / total).item()
                    for t in (0, 20, 40)]
        plain = F.cross_entropy(F.linear(aug.latents, weight, bias), torch.arange(4)).item()
    assert values == pytest.approx(expected, rel=1e-5)
    assert values[0] == pytest.approx(plain, rel=1e-5)
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("section, mode, temperature", [({}, "logits", 0.1),
                                                        ({"assignment": "sigmoid", "recon_temperature": None}, "sigmoid", None)])
def test_reconstruction_term_uses_the_configured_reading_of_eq2_and_eq4(section, mode, temperature):
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, **section)
    feats = torch.rand(3, 6, 2, 2)
    recon = aug(feats, torch.tensor([0, 1, 2]), state(model)).aux_losses["recon"]
    with torch.no_grad():
        logits, encoded, flat = aug._similarity(feats)
        torch.testing.assert_close(recon, reconstruction_loss(encoded, assignment(logits, mode), flat, "sum", temperature))


@pytest.mark.parametrize("term, aug_features, reaches_backbone", [("recon", "latents", True), ("latent_aug", "latents", False),
                                                                 ("latent_aug", "image_parts", True)])
def test_gradient_routing_of_each_auxiliary_term(term, aug_features, reaches_backbone):
    """L_Recon trains latents, FC and the encoder; the default L_latent_aug trains the latents and its own
    classifier only (image-independent), the image_parts reading also the FC and the encoder."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4, aug_features=aug_features)
    feats = torch.rand(3, 6, 2, 2, requires_grad=True)
    out = aug(feats, torch.tensor([0, 1, 2]), state(model, step=10))
    out.aux_losses[term].backward()
    assert aug.latents.grad is not None and aug.latents.grad.abs().sum() > 0
    uses_fc = term == "recon" or aug_features == "image_parts"
    assert (aug.encode.weight.grad is not None and aug.encode.weight.grad.abs().sum() > 0) == uses_fc
    assert (feats.grad is not None and feats.grad.abs().sum() > 0) == reaches_backbone
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
    assert aug.stats.count.item() == (1 if "latent_aug" in present else 0)   # statistics only when the term exists
    assert aug.loss_weights == {"latent_aug": section.get("aug_weight", 0.1), "recon": section.get("recon_weight", 0.1)}
    assert {f"{t}_term" for t in ("aug", "recon")} & set(aug.epoch_diagnostics()) == {
        {"latent_aug": "aug_term", "recon": "recon_term"}[t] for t in present}


def test_diagnostics_report_each_term_against_its_chance_level():
    """Zero latents and classifier: both terms sit exactly at chance (ratio 1), Ŝ is uniform (entropy ln M)."""
    model = tiny_backbone()
    aug = make_lcreg(latent_count=4)
    assert aug.epoch_diagnostics() == {}                           # idle: nothing recorded
    with torch.no_grad():
        for param in (aug.latents, aug.encode.weight, aug.encode.bias, aug.latent_classifier.weight, aug.latent_classifier.bias):
            param.zero_()
    for step in range(2):
        aug(torch.rand(3, 6, 2, 2), torch.tensor([0, 1, 2]), state(model, step=step))
    values = aug.epoch_diagnostics()
    assert values["recon_chance"] == pytest.approx(4 * math.log(4)) and values["aug_chance"] == pytest.approx(math.log(4))
    assert values["recon_term"] == pytest.approx(4 * math.log(4), rel=1e-5) and values["recon_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert values["aug_term"] == pytest.approx(math.log(4), rel=1e-5) and values["aug_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert values["assign_entropy"] == pytest.approx(math.log(4), rel=1e-5) and values["assign_entropy_ratio"] == pytest.approx(1.0)
    assert values["latent_perplexity"] == pytest.approx(4.0, rel=1e-5)
    assert values["isda_lambda"] == pytest.approx(0.5 * 0.5 / 40) and values["isda_lambda_max"] == pytest.approx(0.5 / 40)
    assert values["decoder_gain"] == 0.0
    assert set(Lcreg.progress_keys) <= set(values)
    assert aug.epoch_diagnostics() == {}                           # read once, then reset


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
    aug = make_lcreg(latent_count=4, aug_features="image_parts")
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
        aug.latents.add_(0.1)
    aug(feats, y, state(model, step=4))
    saved = {k: v.clone() for k, v in aug.state_dict().items()}
    assert {"latents", "encode.weight", "decode.weight", "latent_classifier.weight", "latent_classifier.bias",
            "stats.mean", "stats.cov", "stats.count"} <= set(saved)
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


# ------------------------------------------------------------------------------------ real CIFAR-10
@pytest.mark.slow
@pytest.mark.cifar
def test_cifar10_slice_trains_finite_and_the_auxiliary_terms_learn(cifar_root, tmp_path):
    """ResNet-32 at the paper defaults, from scratch, no gradient clipping: finite every epoch, L_Recon
    falls below its chance level and moves, L_latent_aug moves, the latents are used (diagnostics)."""
    config = load_run_config(REPO / "configs" / "cifar10_lt.yaml", [
        f"data.root={cifar_root}", "data.max_train_per_class=100", "data.max_eval_per_class=20",
        "train.epochs=2", "train.threads=1", "train.device=cpu", "augmenter.name=lcreg", "augmenter.start_epoch=0"])
    assert config.optim.grad_clip is None
    history = [result.metrics for result in Trainer(config, cache_dir=tmp_path).run()]
    for metrics in history:
        assert all(math.isfinite(metrics[key]) for key in ("train/loss", "train/aux/recon", "train/aux/latent_aug"))
        for name in ("recon_term", "aug_term", "latent_perplexity", "latents_won", "decoder_gain", "isda_lambda"):
            assert metrics[f"aug/{name}"] > 0, name
    first, last = history
    assert last["aug/recon_ratio"] < 0.9 and last["train/aux/recon"] < first["train/aux/recon"]
    assert last["train/aux/latent_aug"] != first["train/aux/latent_aug"]
    assert last["aug/assign_entropy_ratio"] < 0.9 and last["aug/latents_won"] > 2
