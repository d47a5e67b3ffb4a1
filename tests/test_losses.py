"""Each loss against its formula on 2 samples x 3 classes, counts [100, 10, 1], written out with math.*."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltsearch.config import LossConfig, ReweightConfig, ResampleConfig, build
from ltsearch.errors import ConfigError, DataError
from ltsearch.losses import (FocalConfig, LdamConfig, LogitAdjustConfig, class_weights_for_epoch, create_loss,
                             sampler_for_epoch)
from ltsearch.registry import LOSSES

COUNTS = [100, 10, 1]
LOGITS = [[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]]
TARGETS = [2, 0]


def softmax_ce(row: list[float], target: int) -> float:
    """−z_y + log Σ_j exp(z_j), by hand."""
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def make_loss(name: str, **params):
    sections = {name: build(LOSSES.get(name).config, params, f"loss.{name}")} if params else {}
    return create_loss(LossConfig(name=name, sections=sections), torch.tensor(COUNTS))


def evaluate(loss, **weights) -> float:
    return loss(torch.tensor(LOGITS), torch.tensor(TARGETS), **weights).item()


# ------------------------------------------------------------------------------------------ CE
def test_ce_is_the_mean_softmax_cross_entropy():
    expected = (softmax_ce(LOGITS[0], 2) + softmax_ce(LOGITS[1], 0)) / 2
    assert evaluate(make_loss("ce")) == pytest.approx(expected, rel=1e-6)


def test_class_weights_reduce_like_torch_weighted_cross_entropy():
    weights = torch.tensor([1.0, 2.0, 3.0])
    expected = F.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), weight=weights).item()
    assert evaluate(make_loss("ce"), class_weights=weights) == pytest.approx(expected, rel=1e-6)
    # and by hand: (w_2·ce_0 + w_0·ce_1) / (w_2 + w_0)
    by_hand = (3.0 * softmax_ce(LOGITS[0], 2) + 1.0 * softmax_ce(LOGITS[1], 0)) / 4.0
    assert expected == pytest.approx(by_hand, rel=1e-6)


def test_sample_weights_scale_terms_but_only_class_weights_normalise():
    class_weights, sample_weights = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0])
    expected = (3.0 * 0.5 * softmax_ce(LOGITS[0], 2) + 1.0 * 2.0 * softmax_ce(LOGITS[1], 0)) / (3.0 + 1.0)
    got = evaluate(make_loss("ce"), class_weights=class_weights, sample_weights=sample_weights)
    assert got == pytest.approx(expected, rel=1e-6)
    only_samples = (0.5 * softmax_ce(LOGITS[0], 2) + 2.0 * softmax_ce(LOGITS[1], 0)) / 2
    assert evaluate(make_loss("ce"), sample_weights=sample_weights) == pytest.approx(only_samples, rel=1e-6)


def test_half_precision_logits_give_a_float32_loss_equal_to_the_float32_computation():
    loss = make_loss("ldam")
    half = torch.tensor(LOGITS, dtype=torch.float16)
    value = loss(half, torch.tensor(TARGETS))
    assert value.dtype == torch.float32
    assert value.item() == loss(half.float(), torch.tensor(TARGETS)).item()


def test_logits_with_the_wrong_number_of_classes_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        make_loss("ce")(torch.zeros(2, 4), torch.tensor(TARGETS))


# --------------------------------------------------------------------------------------- focal
def test_focal_with_gamma_zero_is_weighted_cross_entropy():
    weights = torch.tensor([1.0, 2.0, 3.0])
    focal, ce = make_loss("focal", gamma=0.0), make_loss("ce")
    assert evaluate(focal, class_weights=weights) == pytest.approx(evaluate(ce, class_weights=weights), rel=1e-6)


def test_focal_with_gamma_two_matches_the_formula():
    terms = []
    for row, target in zip(LOGITS, TARGETS):
        ce = softmax_ce(row, target)
        terms.append((1.0 - math.exp(-ce)) ** 2 * ce)
    assert evaluate(make_loss("focal", gamma=2.0)) == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_focal_default_gamma_is_ldam_drw_scripts_one():
    assert make_loss("focal").params.gamma == 1.0


def test_focal_gradient_is_finite_for_a_certain_sample_and_gamma_below_one():
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.5, 0.0]], requires_grad=True)
    make_loss("focal", gamma=0.5)(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------- LDAM
def test_ldam_margins_follow_inverse_quartic_root_with_max_m_on_the_rarest_class():
    margins = make_loss("ldam").margins
    assert margins[2].item() == 0.5  # the rarest class (n = 1) gets exactly max_m
    assert (margins[0] / margins[1]).item() == pytest.approx((10 / 100) ** 0.25, rel=1e-6)
    assert margins.tolist() == pytest.approx([0.5 * 100 ** -0.25, 0.5 * 10 ** -0.25, 0.5], rel=1e-6)


def test_ldam_margins_rescale_when_no_class_has_a_single_image():
    loss = create_loss(LossConfig(name="ldam", sections={"ldam": LdamConfig(max_m=0.3)}), [16, 81])
    assert loss.margins.tolist() == pytest.approx([0.3, 0.2], rel=1e-6)  # 16^-1/4 = 1/2, 81^-1/4 = 1/3


def test_ldam_subtracts_the_margin_from_the_true_logit_then_scales_by_s():
    s, m0 = 30.0, 0.5 * 100 ** -0.25
    row0 = [s * 0.2, s * -0.1, s * (0.4 - 0.5)]  # target 2, margin 0.5
    row1 = [s * (0.0 - m0), s * 0.3, s * -0.2]  # target 0, margin m0
    expected = (softmax_ce(row0, 2) + softmax_ce(row1, 0)) / 2
    loss = make_loss("ldam")
    assert evaluate(loss) == pytest.approx(expected, rel=1e-5)
    assert loss.needs_cosine_classifier and not make_loss("ce").needs_cosine_classifier


def test_ldam_with_drw_weights_equals_torch_weighted_cross_entropy_on_margin_logits():
    s, m0 = 10.0, 0.5 * 100 ** -0.25
    margin_logits = torch.tensor([[0.2, -0.1, 0.4 - 0.5], [0.0 - m0, 0.3, -0.2]])
    weights = torch.tensor([0.2, 0.8, 2.0])
    expected = F.cross_entropy(s * margin_logits, torch.tensor(TARGETS), weight=weights).item()
    assert evaluate(make_loss("ldam", s=s), class_weights=weights) == pytest.approx(expected, rel=1e-5)


def test_ldam_gradients_are_finite_and_reach_every_logit():
    logits = torch.tensor(LOGITS, requires_grad=True)
    make_loss("ldam")(logits, torch.tensor(TARGETS), class_weights=torch.tensor([0.5, 1.0, 1.5])).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad != 0).all()


def test_count_based_losses_refuse_a_class_without_training_images():
    with pytest.raises(DataError, match=r"classes \[1\]"):
        create_loss(LossConfig(name="ldam"), [5, 0, 3])


# ------------------------------------------------------------------- balanced softmax / logit adj
def test_balanced_softmax_is_cross_entropy_on_logits_plus_log_counts():
    shifted = [[z + math.log(n) for z, n in zip(row, COUNTS)] for row in LOGITS]
    expected = (softmax_ce(shifted[0], 2) + softmax_ce(shifted[1], 0)) / 2
    assert evaluate(make_loss("balanced_softmax")) == pytest.approx(expected, rel=1e-6)


def test_logit_adjustment_with_tau_zero_is_cross_entropy():
    assert evaluate(make_loss("logit_adjust", tau=0.0, mode="loss")) == pytest.approx(evaluate(make_loss("ce")), rel=1e-6)


def test_logit_adjustment_with_tau_half_uses_the_log_prior():
    total = sum(COUNTS)
    shifted = [[z + 0.5 * math.log(n / total) for z, n in zip(row, COUNTS)] for row in LOGITS]
    expected = (softmax_ce(shifted[0], 2) + softmax_ce(shifted[1], 0)) / 2
    assert evaluate(make_loss("logit_adjust", tau=0.5, mode="loss")) == pytest.approx(expected, rel=1e-6)


def test_logit_adjustment_loss_mode_with_tau_one_equals_balanced_softmax():
    assert evaluate(make_loss("logit_adjust", mode="loss")) == pytest.approx(evaluate(make_loss("balanced_softmax")), rel=1e-6)
    assert torch.equal(make_loss("logit_adjust", mode="loss").eval_logits(torch.tensor(LOGITS)), torch.tensor(LOGITS))


def test_posthoc_logit_adjustment_trains_with_ce_and_ranks_z_minus_tau_log_prior():
    """Eq. 9 of Menon et al.: the default mode changes the prediction, not the training loss."""
    loss = make_loss("logit_adjust", tau=0.5)
    assert loss.params.mode == "posthoc"
    assert evaluate(loss) == pytest.approx(evaluate(make_loss("ce")), rel=1e-6)
    total = sum(COUNTS)
    expected = [[z - 0.5 * math.log(n / total) for z, n in zip(row, COUNTS)] for row in LOGITS]
    torch.testing.assert_close(loss.eval_logits(torch.tensor(LOGITS)), torch.tensor(expected))
    # A head-class favourite flips to the rare class once the prior is divided out.
    row = torch.tensor([[2.0, 0.0, 0.5]])
    assert row.argmax(1).item() == 0 and make_loss("logit_adjust").eval_logits(row).argmax(1).item() == 2


# ------------------------------------------------------------------------ registry and config
def test_every_loss_is_registered_with_its_section():
    assert {"ce", "focal", "ldam", "balanced_softmax", "logit_adjust"} <= set(LOSSES.names())
    assert LOSSES.get("ldam").config is LdamConfig and LOSSES.get("ce").config is None
    assert LdamConfig() == LdamConfig(max_m=0.5, s=30.0)
    assert LogitAdjustConfig() == LogitAdjustConfig(tau=1.0, mode="posthoc")


@pytest.mark.parametrize("section, key, value", [
    (LdamConfig, "s", 0.0), (LdamConfig, "max_m", -0.1), (FocalConfig, "gamma", -1.0), (LogitAdjustConfig, "tau", -0.5),
    (LogitAdjustConfig, "mode", "prior"),
])
def test_section_validation_names_the_dotted_key(section, key, value):
    name = {LdamConfig: "ldam", FocalConfig: "focal", LogitAdjustConfig: "logit_adjust"}[section]
    with pytest.raises(ConfigError) as error:
        build(section, {key: value}, f"loss.{name}")
    assert error.value.key == f"loss.{name}.{key}"


def test_create_loss_validates_a_hand_built_section_and_the_name():
    with pytest.raises(ConfigError) as error:
        create_loss(LossConfig(name="ldam", sections={"ldam": LdamConfig(s=-1.0)}), COUNTS)
    assert error.value.key == "loss.ldam.s"
    with pytest.raises(ConfigError) as error:
        create_loss(LossConfig(name="no_such_loss"), COUNTS)
    assert error.value.key == "loss.name"


# ------------------------------------------------------------------------- deferred schedules
def test_effective_number_weights_match_the_closed_form_and_sum_to_c():
    config = build(ReweightConfig, {"kind": "effective_number", "beta": 0.9}, "loss.reweight")
    weights = class_weights_for_epoch(config, torch.tensor([3, 1]), epoch=0)
    # (1-0.9)/(1-0.9^3) = 100/271 and (1-0.9)/(1-0.9) = 1; scaled to sum to 2: 200/371, 542/371
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([200 / 371, 542 / 371], rel=1e-6)
    assert weights.sum().item() == pytest.approx(2.0, rel=1e-6)


def test_inverse_weights_are_one_over_counts_summing_to_c():
    config = ReweightConfig(kind="inverse")
    assert class_weights_for_epoch(config, [3, 1], epoch=0).tolist() == pytest.approx([0.5, 1.5], rel=1e-6)


def test_beta_zero_gives_uniform_weights():
    config = ReweightConfig(kind="effective_number", beta=0.0)
    assert class_weights_for_epoch(config, COUNTS, epoch=0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_drw_switches_on_at_the_zero_indexed_start_epoch():
    drw = ReweightConfig(kind="effective_number", beta=0.9999, start_epoch=160)
    assert class_weights_for_epoch(drw, COUNTS, epoch=159) is None
    switched = class_weights_for_epoch(drw, COUNTS, epoch=160)
    assert switched is not None and switched.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert switched[0] < switched[1] < switched[2]
    assert torch.equal(class_weights_for_epoch(drw, COUNTS, epoch=199), switched)
    assert class_weights_for_epoch(ReweightConfig(kind="none"), COUNTS, epoch=500) is None


def test_drs_switches_the_sampler_at_the_start_epoch():
    drs = ResampleConfig(sampler="class_balanced", start_epoch=160)
    assert sampler_for_epoch(drs, 0) == "instance"
    assert sampler_for_epoch(drs, 159) == "instance"
    assert sampler_for_epoch(drs, 160) == "class_balanced"
    assert sampler_for_epoch(ResampleConfig(sampler="instance"), 0) == "instance"
