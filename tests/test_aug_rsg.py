"""RSG (Wang et al. 2021): closed-form checks of Eq. 1-6, s_new, gradient routing (Algorithm 1), freezing, shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltsearch.augmenters.base import (AugmenterContext, FeatureSpec, TrainState, create_augmenter, resolve_insert_at,
                                      resolve_start_epoch)
from ltsearch.augmenters.rsg import (Rsg, RsgConfig, mean_of_conv3x3, mv_direction_term, mv_length_term,
                                     num_generated)
from ltsearch.config import AugmenterConfig, RunConfig, build, load_run_config
from ltsearch.engine import Trainer
from ltsearch.errors import ConfigError
from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.registry import AUGMENTERS

START = 3
ALL_TERMS = ("cesc_center", "cesc_contrastive", "mv_direction", "mv_length", "mv_contrastive")


def make_rsg(head_mask, *, channels=4, height=3, width=3, **rsg) -> Rsg:
    """An RSG built the way the engine builds it, with `head_mask` (True = frequent) given directly."""
    head_mask = torch.tensor(head_mask)
    counts = torch.where(head_mask, 10, 2)
    config = RunConfig(augmenter=build(AugmenterConfig, {"name": "rsg", "rsg": rsg}, "augmenter"))
    context = AugmenterContext(config=config, insert_at=1, start_epoch=START, head_ratio=0.5,
                               feature=FeatureSpec(channels, height, width), num_classes=len(head_mask),
                               class_counts=counts, head_mask=head_mask, device=torch.device("cpu"),
                               cache_dir=Path("unused"))
    augmenter = create_augmenter(context)
    assert isinstance(augmenter, Rsg)
    return augmenter


def state(epoch: int, model: nn.Module | None = None) -> TrainState:
    return TrainState(epoch=epoch, epochs=5, step=0, steps_per_epoch=1, model=model or nn.Identity())


def identity_transform(augmenter: Rsg, scale: float = 1.0) -> None:
    """T(z) = scale·z: centre tap of the 3x3 kernel is scale·I."""
    with torch.no_grad():
        augmenter.transform.weight.zero_()
        channels = augmenter.transform.weight.shape[0]
        augmenter.transform.weight[:, :, 1, 1] = scale * torch.eye(channels)


class FixedLogits(nn.Module):
    """Stands in for the contrastive module: records its inputs and answers fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.calls = []

    def forward(self, x1, x2):
        self.calls.append((x1.detach().clone(), x2.detach().clone()))
        return self.logits.expand(x1.shape[0], 2)


class Refuse(nn.Module):
    def forward(self, *args):
        raise AssertionError("the contrastive module ran although its terms have weight 0")


def tiny_backbone(num_classes: int = 3) -> Backbone:
    """Boundaries 0: 3x4x4, 1: 4x4x4, 2: 6x2x2, 3: 8x1x1 (a 1x1 map), like a ResNet's shrinking stages."""
    stages = [nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())]
    info = [FeatureInfo(3, 1, "input"), FeatureInfo(4, 1, "s0"), FeatureInfo(6, 2, "s1"), FeatureInfo(8, 4, "s2")]
    return Backbone(stages, nn.Linear(8, num_classes), info)


# ----------------------------------------------------------------------------------------- config
def test_defaults_are_the_papers():
    """K = 15, λ1 = 0.1, λ2 = 0.01, β = 1, 256-channel h, insertion before the 2nd-to-last down-sampling, T_th = 160/200."""
    cfg = RsgConfig()
    assert (cfg.num_centers, cfg.lambda_cesc, cfg.lambda_mv, cfg.transfer_strength) == (15, 0.1, 0.01, 1.0)
    assert (cfg.contrastive_channels, cfg.contrastive_first_kernel) == (256, 3)
    assert (cfg.mv_pair, cfg.mv_vectors, cfg.detach_inputs, cfg.add_to) == ("rare_displacement", "pixel", False, "sample")
    assert AUGMENTERS.get("rsg").meta["defaults"] == {"insert_at": -2, "start_fraction": 0.8, "head_ratio": 0.2}
    assert resolve_insert_at("rsg", None, 5, False) == 3  # ResNet-32: after layer2, before layer3's stride-2 block
    assert resolve_start_epoch("rsg", None, 200) == 160
    assert make_rsg([True, False]).loss_weights == pytest.approx(
        {"cesc_center": 0.1, "cesc_contrastive": 0.1, "mv_direction": 0.01, "mv_length": 0.01, "mv_contrastive": 0.01})


@pytest.mark.parametrize("key, value", [("num_centers", 0), ("num_centers", 1.5), ("contrastive_channels", 0),
                                        ("contrastive_first_kernel", 2), ("transfer_strength", 0.0),
                                        ("transfer_strength", 1.5), ("lambda_cesc", -0.1), ("mv_length", -1.0),
                                        ("mv_pair", "cosine"), ("mv_vectors", "rows")])
def test_bad_values_name_the_dotted_key(key, value):
    with pytest.raises(ConfigError) as error:
        build(AugmenterConfig, {"name": "rsg", "rsg": {key: value}}, "augmenter")
    assert error.value.key == f"augmenter.rsg.{key}"


# ------------------------------------------------------------------------------------------ s_new
@pytest.mark.parametrize("beta, s_freq, s_rare, expected", [
    (1.0, 6, 3, 6), (1.0, 7, 3, 6), (0.5, 6, 3, 3), (1.0, 100, 28, 84), (0.01, 100, 28, 28),
    (1.0, 2, 5, 5), (0.29, 100, 1, 29), (0.5, 9, 2, 4)])
def test_num_generated_matches_the_papers_formula(beta, s_freq, s_rare, expected):
    """s_new = max(⌊β·s_freq/s_rare⌋, 1)·s_rare, the floor taken on the exact decimal (0.29·100 = 29)."""
    assert num_generated(beta, s_freq, s_rare) == expected


# ------------------------------------------------------------------------------------------- CESC
@pytest.mark.parametrize("literal", [True, False])
def test_center_term_closed_form(literal):
    """Eq. 5, 1st term: one channel, pixels (1, 3), centres 0 and 2. Σ‖x−c‖² = 10 and 2, γ = (3/4, 1/4) gives 8.

    Without `cesc_literal` each sample's spread around its own mean, (1−2)² + (3−2)² = 2, is left out.
    """
    rsg = make_rsg([True, False], channels=1, height=1, width=2, num_centers=2, cesc_literal=literal)
    with torch.no_grad():
        rsg.center_estimation.weight.zero_()
        rsg.center_estimation.bias[1] = torch.tensor([math.log(3.0), 0.0])
        rsg.center_estimation.centers[1, :, 0] = torch.tensor([0.0, 2.0])
        rsg.center_estimation.bias[0] = 0.0  # class 0: γ = (1/2, 1/2), centres 0 -> (10 + 10)/2 = 10
    feats = torch.tensor([[[[1.0, 3.0]]], [[[1.0, 3.0]]]])
    out = rsg(feats, torch.tensor([1, 0]), state(0))
    assert out.aux_losses["cesc_center"].item() == pytest.approx((8.0 + 10.0) / 2 - (0.0 if literal else 2.0))


def test_center_term_equals_the_direct_sum_over_channels_and_pixels():
    """The pooled decomposition used in the code equals ⟨Σ_i γ_i Σ_{d,j,k}(x − up(C_i))²⟩ on random data."""
    torch.manual_seed(0)
    rsg = make_rsg([True, False, False], channels=3, height=2, width=5, num_centers=4, cesc_literal=True)
    with torch.no_grad():
        rsg.center_estimation.centers.normal_()
    feats, labels = torch.randn(6, 3, 2, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    gamma = rsg.center_estimation.logits(feats.mean((2, 3)), labels).softmax(1)
    centers = rsg.center_estimation.centers[labels]  # (N, K, D)
    direct = ((feats[:, None] - centers[..., None, None]) ** 2).sum((2, 3, 4))
    expected = (gamma * direct).sum(1).mean()
    assert rsg(feats, labels, state(0)).aux_losses["cesc_center"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_leaving_out_the_spread_changes_no_gradient():
    """The spread is a constant of the detached maps: both values give the centres and the assignment the same gradients."""
    feats, labels = torch.randn(6, 3, 2, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    grads, values = [], []
    for literal in (True, False):
        torch.manual_seed(0)
        rsg = make_rsg([True, False, False], channels=3, height=2, width=5, num_centers=4, cesc_literal=literal)
        with torch.no_grad():
            rsg.center_estimation.centers.normal_()
        term = rsg(feats, labels, state(0)).aux_losses["cesc_center"]
        term.backward()
        values.append(term.item())
        grads.append([p.grad.clone() for p in rsg.center_estimation.parameters()])
    spread = (feats - feats.mean((2, 3), keepdim=True)).square().sum((1, 2, 3)).mean().item()
    assert values[0] - values[1] == pytest.approx(spread, rel=1e-5) and spread > 0
    for literal_grad, fit_grad in zip(*grads):
        torch.testing.assert_close(literal_grad, fit_grad)


def test_contrastive_term_closed_form():
    """Eq. 5, 2nd term: with a zero head, γ* = 1/2 and the term is log 2. With bias (0, b) and all pairs
    from one class, y = 1 and the term is −log σ(b)."""
    rsg = make_rsg([True, False])
    feats = torch.randn(6, 4, 3, 3)
    with torch.no_grad():
        rsg.contrastive.fc.weight.zero_()
        rsg.contrastive.fc.bias.zero_()
    assert rsg(feats, torch.tensor([0, 1, 0, 1, 1, 0]), state(0)).aux_losses["cesc_contrastive"].item() == pytest.approx(math.log(2))
    with torch.no_grad():
        rsg.contrastive.fc.bias[1] = 1.5
    value = rsg(feats, torch.zeros(6, dtype=torch.long), state(0)).aux_losses["cesc_contrastive"].item()
    assert value == pytest.approx(-math.log(torch.sigmoid(torch.tensor(1.5)).item()), rel=1e-6)


@pytest.mark.parametrize("height, width", [(5, 7), (1, 1), (2, 3)])
def test_fused_mean_of_conv_equals_conv_then_mean(height, width):
    """ave(conv3x3(x)) computed from the taps' window sums equals the plain conv followed by the mean."""
    torch.manual_seed(1)
    conv, x = nn.Conv2d(3, 5, 3, padding=1), torch.randn(4, 3, height, width)
    assert torch.allclose(mean_of_conv3x3(x, conv), conv(x).mean((2, 3)), atol=1e-5)


# --------------------------------------------------------------------------------------------- MV
def test_mv_direction_term_closed_form():
    """Eq. 6, 1st term: per-pixel |cos − 1| summed over pixels. Orthogonal 1, opposite 2, parallel 0 -> 3."""
    transformed = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)  # pixel vectors (1,0) (1,0) (1,1)
    rare = torch.tensor([[0.0, -2.0, 2.0], [1.0, 0.0, 2.0]]).view(1, 2, 1, 3)  # (0,1) (-2,0) (2,2)
    assert mv_direction_term(transformed, rare).item() == pytest.approx(3.0)
    both = torch.cat([transformed, transformed])
    assert mv_direction_term(both, torch.cat([rare, transformed])).item() == pytest.approx(1.5)  # mean over s_new


def test_mv_length_term_closed_form_and_reference_grouping():
    """Eq. 6, 2nd term: Σ_pixels |‖T‖ − ‖x_fd-freq‖|: pixel vectors (3,4),(0,0) vs (1,0),(0,2) -> 4 + 2 = 6.
    The reference's flat runs of C values, (3,0),(4,0) vs (1,0),(0,2), give 2 + 2 = 4 instead."""
    transformed = torch.tensor([[3.0, 0.0], [4.0, 0.0]]).view(1, 2, 1, 2)
    displacement = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 2, 1, 2)
    assert mv_length_term(transformed, displacement).item() == pytest.approx(6.0)
    assert mv_length_term(transformed, displacement, "flat").item() == pytest.approx(4.0)


def one_pair_batch():
    """One frequent (class 0) and one rare (class 1) sample: s_new = 1 and the pairing is forced."""
    freq = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).view(1, 2, 1, 2)
    rare = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    return torch.cat([freq, rare]), torch.tensor([0, 1])


@pytest.mark.parametrize("mv_pair", ["rare_displacement", "frequent_sample"])
def test_mv_terms_through_the_augmenter(mv_pair):
    """With one centre at c and T = 2·I: x_fd-freq = x_freq − c and x_fd-rare = x_rare − c. The new sample is
    x_rare + 2·x_fd-freq, and each MV term equals its closed form. The contrastive term is −log softmax(logits)[0],
    on (T(x_fd-freq), x_fd-rare) as in Eq. 6, or on (x_freq, T(x_fd-freq)) as in the reference."""
    rsg = make_rsg([True, False], channels=2, height=1, width=2, num_centers=1, mv_pair=mv_pair)
    identity_transform(rsg, 2.0)
    center = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        rsg.center_estimation.centers[:, 0] = center
    rsg.contrastive = FixedLogits([0.3, -0.2])
    feats, labels = one_pair_batch()
    out = rsg(feats, labels, state(START))
    fd_freq, fd_rare = feats[0] - center.view(2, 1, 1), feats[1] - center.view(2, 1, 1)
    assert out.labels.tolist() == [0, 1, 1]
    assert torch.allclose(out.feats[2], feats[1] + 2 * fd_freq)
    cos = F.cosine_similarity(fd_freq.flatten(1).T, fd_rare.flatten(1).T, dim=1)
    assert out.aux_losses["mv_direction"].item() == pytest.approx((1 - cos).sum().item(), rel=1e-6)
    assert out.aux_losses["mv_length"].item() == pytest.approx(fd_freq.norm(dim=0).sum().item(), rel=1e-6)
    assert out.aux_losses["mv_contrastive"].item() == pytest.approx(-F.log_softmax(torch.tensor([0.3, -0.2]), 0)[0].item())
    (first, second), = rsg.contrastive.calls
    expected = (2 * fd_freq, fd_rare) if mv_pair == "rare_displacement" else (feats[0], 2 * fd_freq)
    assert torch.allclose(first[0], expected[0]) and torch.allclose(second[0], expected[1])


def test_table3_variants_direct_addition_and_rare_centres():
    """'Direct Addition': x_new = x_rare + x_fd-freq, with no T and no MV. 'Adding to Rare-class Centers':
    x_new = up(C_rare) + T(x_fd-freq)."""
    feats, labels = one_pair_batch()
    direct = make_rsg([True, False], channels=2, height=1, width=2, num_centers=1, vector_transform=False)
    out = direct(feats, labels, state(START))
    assert torch.allclose(out.feats[2], feats[1] + feats[0]) and not set(out.aux_losses) & {"mv_direction", "mv_length"}
    centres = make_rsg([True, False], channels=2, height=1, width=2, num_centers=1, add_to="center")
    identity_transform(centres, 1.0)
    with torch.no_grad():
        centres.center_estimation.centers[1, 0] = torch.tensor([5.0, 7.0])
    expected = torch.tensor([5.0, 7.0]).view(2, 1, 1) + feats[0]
    assert torch.allclose(centres(feats, labels, state(START)).feats[2], expected)


# ----------------------------------------------------------------------------------- generation
def test_generated_samples_carry_tail_labels_and_count_s_new():
    """5 frequent and 2 rare samples, β = 1: m = ⌊5/2⌋ = 2 per rare sample, s_new = 4. Each new sample is
    x_rare + (x_freq − c) with its own rare sample and a distinct frequent one."""
    torch.manual_seed(3)
    rsg = make_rsg([True, True, False, False], channels=3, height=2, width=2, num_centers=1, vector_transform=False)
    with torch.no_grad():
        rsg.center_estimation.centers.normal_()
    labels = torch.tensor([0, 2, 1, 0, 3, 1, 1])
    feats = torch.randn(7, 3, 2, 2)
    out = rsg(feats, labels, state(START))
    assert out.feats.shape == (11, 3, 2, 2) and torch.equal(out.feats[:7], feats)
    assert out.labels[:7].tolist() == labels.tolist() and sorted(out.labels[7:].tolist()) == [2, 2, 3, 3]
    rare_rows = [1, 4, 1, 4]  # each rare sample repeated m times, in batch order
    centers = rsg.center_estimation.centers[:, 0].detach()
    used = []
    for new, rare_row in zip(out.feats[7:], rare_rows):
        displacement = new - feats[rare_row]
        matches = [row for row in (0, 2, 3, 5, 6) if torch.allclose(displacement, feats[row] - centers[labels[row]].view(3, 1, 1), atol=1e-6)]
        assert len(matches) == 1
        used += matches
    assert len(set(used)) == 4


def test_no_generation_without_both_frequent_and_rare_samples():
    rsg = make_rsg([True, False])
    feats = torch.randn(4, 4, 3, 3)
    out = rsg(feats, torch.zeros(4, dtype=torch.long), state(START))
    assert out.feats is feats and set(out.aux_losses) == {"cesc_center"}


# ------------------------------------------------------------------------------ weights, routing
@pytest.mark.parametrize("term", ALL_TERMS)
def test_weight_zero_removes_the_term(term):
    rsg = make_rsg([True, False], **{term: 0.0})
    feats, labels = torch.randn(6, 4, 3, 3), torch.tensor([0, 0, 0, 1, 0, 1])
    seen = set(rsg(feats, labels, state(0)).aux_losses) | set(rsg(feats, labels, state(START)).aux_losses)
    assert seen == set(ALL_TERMS) - {term} and rsg.loss_weights[term] == 0


def test_lambdas_zero_skip_whole_losses_and_the_contrastive_module():
    rsg = make_rsg([True, False], lambda_cesc=0.0, mv_contrastive=0.0)
    rsg.contrastive = Refuse()
    feats, labels = torch.randn(6, 4, 3, 3), torch.tensor([0, 0, 0, 1, 0, 1])
    assert rsg(feats, labels, state(0)).aux_losses == {}
    assert set(rsg(feats, labels, state(START)).aux_losses) == {"mv_direction", "mv_length"}
    rsg = make_rsg([True, False], lambda_mv=0.0)
    assert set(rsg(feats, labels, state(START)).aux_losses) == {"cesc_center"}


def grads(module: nn.Module) -> dict[str, bool]:
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in module.named_parameters()}


def test_gradient_routing_follows_algorithm_1():
    """L_CESC -> centres, assignment, contrastive module; L_MV -> T only; L_cls on new samples -> T and backbone."""
    torch.manual_seed(4)
    rsg = make_rsg([True, False, False])
    labels = torch.tensor([0, 0, 0, 1, 2, 0, 0, 1])
    feats = torch.randn(8, 4, 3, 3, requires_grad=True)
    out = rsg(feats, labels, state(0))
    sum(out.aux_losses.values()).backward()
    moved = grads(rsg)
    assert feats.grad is None and not moved["transform.weight"]
    assert moved["center_estimation.centers"] and moved["center_estimation.weight"] and moved["contrastive.conv1.weight"]

    rsg.zero_grad(set_to_none=True)
    rsg.on_epoch_start(START)
    out = rsg(feats, labels, state(START))
    sum(v for k, v in out.aux_losses.items() if k.startswith("mv")).backward()
    moved = grads(rsg)
    assert feats.grad is None and moved["transform.weight"]
    assert {k for k, v in moved.items() if v} == {"transform.weight"}

    rsg.zero_grad(set_to_none=True)
    out = rsg(feats, labels, state(START))
    out.feats[8:].square().sum().backward()  # stands in for L_cls on the generated samples
    assert grads(rsg)["transform.weight"] and not grads(rsg)["center_estimation.centers"]
    assert feats.grad is not None and bool(feats.grad[labels != 0].abs().sum() > 0) and bool(feats.grad[labels == 0].abs().sum() > 0)


def test_detach_inputs_keeps_generated_samples_off_the_backbone():
    rsg = make_rsg([True, False, False], detach_inputs=True)
    feats = torch.randn(8, 4, 3, 3, requires_grad=True)
    out = rsg(feats, torch.tensor([0, 0, 0, 1, 2, 0, 0, 1]), state(START))
    (out.feats[8:].square().sum() + sum(out.aux_losses.values())).backward()
    assert not feats.grad.any() and grads(rsg)["transform.weight"]  # zero: only the cat of the real rows reaches feats


def test_contrastive_module_frozen_after_t_th():
    """SGD with momentum and weight decay: the contrastive module moves before T_th, then never again."""
    torch.manual_seed(5)
    rsg = make_rsg([True, False, False])
    optimizer = torch.optim.SGD(rsg.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    feats, labels = torch.randn(8, 4, 3, 3), torch.tensor([0, 0, 0, 1, 2, 0, 0, 1])

    def step(epoch):
        optimizer.zero_grad()
        out = rsg(feats, labels, state(epoch))
        sum(w * out.aux_losses[k] for k, w in rsg.loss_weights.items() if k in out.aux_losses).backward()
        optimizer.step()

    initial = {k: v.clone() for k, v in rsg.state_dict().items()}
    rsg.on_epoch_start(0)
    step(0)
    after_warm = {k: v.clone() for k, v in rsg.state_dict().items()}
    assert not torch.equal(after_warm["contrastive.conv1.weight"], initial["contrastive.conv1.weight"])
    rsg.on_epoch_start(START)
    assert all(not p.requires_grad and p.grad is None for p in rsg.contrastive.parameters())
    step(START)
    final = rsg.state_dict()
    assert all(torch.equal(final[k], after_warm[k]) for k in final if k.startswith("contrastive."))
    assert not torch.equal(final["transform.weight"], after_warm["transform.weight"])
    assert not torch.equal(final["center_estimation.centers"], after_warm["center_estimation.centers"])


# ------------------------------------------------------------------------------- shapes, state
@pytest.mark.parametrize("boundary", [1, 2, 3])
def test_every_boundary_of_a_small_backbone_including_1x1_maps(boundary):
    torch.manual_seed(6)
    model = tiny_backbone()
    channels = model.feature_info[boundary].channels
    size = 4 // model.feature_info[boundary].reduction
    rsg = make_rsg([True, False, False], channels=channels, height=size, width=size)
    x, labels = torch.rand(8, 3, 4, 4), torch.tensor([0, 0, 0, 1, 2, 0, 0, 1])
    for epoch in (0, START):
        rsg.on_epoch_start(epoch)
        feats = model.forward_until(boundary, x)
        out = rsg(feats, labels, state(epoch, model))
        logits = model.forward_from(boundary, out.feats)
        assert logits.shape == (out.labels.numel(), 3)
        loss = F.cross_entropy(logits, out.labels) + sum(rsg.loss_weights[k] * v for k, v in out.aux_losses.items())
        assert torch.isfinite(loss)
        loss.backward()
    assert out.labels.numel() == 8 + num_generated(1.0, 5, 3)


def test_state_dict_round_trip_reproduces_the_outputs():
    feats, labels = torch.randn(8, 4, 3, 3), torch.tensor([0, 0, 0, 1, 2, 0, 0, 1])
    torch.manual_seed(7)
    source = make_rsg([True, False, False])
    torch.manual_seed(8)
    target = make_rsg([True, False, False])
    target.load_state_dict(source.state_dict())
    assert {"center_estimation.centers", "transform.weight", "contrastive.fc.weight"} <= set(source.state_dict())
    outputs = []
    for module in (source, target):
        torch.manual_seed(9)
        outputs.append((module(feats, labels, state(0)), module(feats, labels, state(START))))
    for before, after in zip(*outputs):
        assert torch.equal(before.feats, after.feats) and torch.equal(before.labels, after.labels)
        assert before.aux_losses.keys() == after.aux_losses.keys()
        assert all(torch.equal(before.aux_losses[k], after.aux_losses[k]) for k in before.aux_losses)


def test_losses_are_float32_under_autocast():
    rsg = make_rsg([True, False, False])
    feats, labels = torch.randn(8, 4, 3, 3), torch.tensor([0, 0, 0, 1, 2, 0, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = nn.functional.conv2d(feats, torch.randn(4, 4, 1, 1))
        out = rsg(half, labels, state(START))
    assert half.dtype == torch.bfloat16 and out.feats.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.aux_losses.values())


@pytest.mark.parametrize("first_kernel", [1, 3])
def test_contrastive_module_equals_eq2_on_the_concatenated_pair(first_kernel):
    """The split first conv and the fused pool give exactly fc(ave(conv2(relu(conv1(cat[x1, x2]))))) (Eq. 2)."""
    rsg = make_rsg([True, False], channels=3, height=2, width=5, contrastive_channels=6,
                   contrastive_first_kernel=first_kernel)
    module, x1, x2 = rsg.contrastive, torch.randn(4, 3, 2, 5), torch.randn(4, 3, 2, 5)
    expected = module.fc(module.conv2(F.relu(module.conv1(torch.cat([x1, x2], 1)))).mean((2, 3)))
    assert torch.allclose(module(x1, x2), expected, atol=1e-5)


def test_resnet32_at_the_papers_default_boundary():
    """ResNet-32 with insert_at = -2: RSG sees layer2's 32-channel maps. Generated samples go through layer3
    and the head, and L_cls on them reaches layer2 (end-to-end, Sec. 1)."""
    from ltsearch.models.base import create_backbone

    torch.manual_seed(10)
    model = create_backbone("resnet32", num_classes=3, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    boundary = resolve_insert_at("rsg", None, model.num_boundaries, False)
    assert model.feature_info[boundary].channels == 32 and model.feature_info[boundary].module == "layer2"
    rsg = make_rsg([True, False, False], channels=32, height=8, width=8)
    x, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 0, 2, 0, 0])
    rsg.on_epoch_start(START)
    feats = model.forward_until(boundary, x)
    out = rsg(feats, labels, state(START, model))
    assert out.feats.shape == (6 + num_generated(1.0, 4, 2), 32, 8, 8)
    F.cross_entropy(model.forward_from(boundary, out.feats[6:]), out.labels[6:]).backward()
    assert model.stages[boundary - 1][-1].conv2.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ real CIFAR-10
@pytest.mark.slow
@pytest.mark.cifar
def test_cifar10_slice_trains_both_phases_and_reports(cifar_root: Path, tmp_path: Path):
    """ResNet-32 on a tiny CIFAR-10-LT slice, no grad clip: epoch 0 learns centres and the contrastive
    module (L_CESC), epoch 1 generates (L_MV); every loss finite, the terms move, generation is counted."""
    repo = Path(__file__).resolve().parents[1]
    config = load_run_config(repo / "configs" / "cifar10_lt.yaml", [
        f"data.root={cifar_root}", "data.max_train_per_class=100", "data.max_eval_per_class=20", "train.epochs=2",
        "train.threads=1", "train.device=cpu", "optim.schedule.warmup_epochs=0", "augmenter.name=rsg",
        "augmenter.start_epoch=1"])
    assert config.optim.grad_clip is None
    first, second = (result.metrics for result in Trainer(config, cache_dir=tmp_path).run())
    for metrics in (first, second):
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/cls_loss"])
        assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("train/aux/"))
    assert {"train/aux/cesc_center", "train/aux/cesc_contrastive"} <= set(first) and "aug/generated" not in first
    assert {"train/aux/mv_direction", "train/aux/mv_length", "train/aux/mv_contrastive"} <= set(second) and "train/aux/cesc_contrastive" not in second
    assert second["train/aux/cesc_center"] != first["train/aux/cesc_center"]
    assert second["aug/generated"] > 0 and second["aug/generating_share"] > 0
    assert second["aug/displacement_norm"] > 0 and second["aug/transformed_norm"] > 0
