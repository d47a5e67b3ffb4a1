"""SAFA (Hong et al., ECCV 2022): each loss against its equation, gradient routing, the appended batch,
insertion at every boundary (1 x 1 maps included), the same-class pair sampler, ablation switches,
config validation and checkpoint round-trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ltsearch.augmenters.base import AugmenterContext, FeatureSpec, TrainState, resolve_insert_at, resolve_start_epoch
from ltsearch.augmenters.safa import MODE_SEEKING_EPS, Safa, mode_seeking, same_class_pairs
from ltsearch.config import AugmenterConfig, RunConfig, build
from ltsearch.errors import ConfigError
from ltsearch.models.base import Backbone, FeatureInfo, Normalize, num_boundaries
from ltsearch.registry import AUGMENTERS, SAMPLERS

HEAD_MASK = torch.tensor([True, True, False, False])
COUNTS = torch.tensor([40, 20, 5, 2])
TERMS = {"lambda_recycle": ("recycle_delta", "recycle_feature"), "lambda_ms_tail": ("ms_tail",),
         "lambda_ms_head": ("ms_head",), "lambda_contrastive": ("contrastive",)}


class Fn(nn.Module):
    """A parameter-free stand-in module with a closed form, so losses can be checked by hand."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def make_safa(channels=3, height=2, width=2, **safa) -> Safa:
    augmenter = build(AugmenterConfig, {"name": "safa", "safa": safa}, "augmenter")
    context = AugmenterContext(config=RunConfig(augmenter=augmenter), insert_at=1, start_epoch=2, head_ratio=0.5,
                               feature=FeatureSpec(channels, height, width), num_classes=4, class_counts=COUNTS,
                               head_mask=HEAD_MASK, device=torch.device("cpu"), cache_dir=Path("."))
    return Safa(context)


def state(epoch: int = 2) -> TrainState:
    return TrainState(epoch=epoch, epochs=4, step=0, steps_per_epoch=1, model=None)


# -------------------------------------------------------------------------------- defaults, config
def test_registered_with_the_papers_defaults():
    assert AUGMENTERS.get("safa").meta["defaults"] == {"insert_at": -3, "start_fraction": 0.795, "head_ratio": 0.2}
    assert resolve_start_epoch("safa", None, 200) == 159  # T_th = 159 on CIFAR (Sec. 4.1)
    # "before the second-to-last down-sampling layer": ResNet-32 boundary 2 (layer1), whose next stage halves H, W
    k = resolve_insert_at("safa", None, num_boundaries("resnet32"), False)
    assert k == 2
    cfg = make_safa().cfg
    assert (cfg.lambda_recycle, cfg.lambda_ms_tail, cfg.lambda_ms_head, cfg.lambda_contrastive) == (100.0, 1e-2, 1e2, 1e-1)
    assert (cfg.recycle_distance, cfg.ms_guard, cfg.module_scale) == ("rms", 1.0, "input")


@pytest.mark.parametrize("key, value", [("lambda_recycle", -1.0), ("lambda_ms_head", -1e-3),
                                        ("kernel_size", 2), ("kernel_size", 0), ("hidden_channels", 0),
                                        ("recycle_distance", "l1"), ("ms_guard", -0.5), ("module_scale", "unit")])
def test_config_rejects_out_of_range_values(key, value):
    with pytest.raises(ConfigError) as error:
        build(AugmenterConfig, {"name": "safa", "safa": {key: value}}, "augmenter")
    assert error.value.key == f"augmenter.safa.{key}"


def test_loss_weights_and_sampler_follow_config_and_phase():
    safa = make_safa(lambda_recycle=3.0, lambda_ms_tail=0.5, lambda_ms_head=7.0, lambda_contrastive=0.25)
    assert safa.loss_weights == {"recycle_delta": 3.0, "recycle_feature": 3.0, "ms_tail": 0.5, "ms_head": 7.0,
                                 "contrastive": 0.25}
    assert safa.sampler(1) is None and safa.sampler(2) == "same_class_pairs"
    assert SAMPLERS.get("same_class_pairs").obj is same_class_pairs


# ------------------------------------------------------------------------------- closed-form losses
def closed_form_safa(**safa_cfg) -> Safa:
    """E(x) = 2x, D(concat(Δ, F)) = Δ, G(x) = 3x: every quantity of Eqs. 2-7 is then computable by hand.

    Literal forms by default (L2 over C x H x W, unguarded Eq. 7, unnormalised module outputs)."""
    literal = {"recycle_distance": "l2", "ms_guard": 0.0, "module_scale": "free"}
    safa = make_safa(channels=1, height=1, width=2, **{**literal, **safa_cfg})
    safa.extractor = Fn(lambda x: 2 * x)
    safa.delta_generator = Fn(lambda x: x[:, :1])
    safa.generator = Fn(lambda x: 3 * x)
    return safa


def test_losses_match_equations_2_to_7_on_hand_made_features():
    # pair 0: head class 0, F_h^i = [3, 1], F_h^j = [1, 1]; pair 1: tail class 2, F_t^i = [5, 2], F_t^j = [4, 0]
    feats = torch.tensor([[3.0, 1.0], [1.0, 1.0], [5.0, 2.0], [4.0, 0.0]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 0, 2, 2])
    out = closed_form_safa()(feats, labels, state())
    # Δ = E([2, 0]) = [4, 0]; F~ from F_t^i = 3([4, 0] + [5, 2]) = [27, 6]; from F_t^j = 3([4, 0] + [4, 0]) = [24, 0]
    assert torch.equal(out.feats[4:].flatten(1), torch.tensor([[27.0, 6.0], [24.0, 0.0]]))
    assert out.labels.tolist() == [0, 0, 2, 2, 2, 2]
    aux = out.aux_losses
    # Eq. 4: Δ^ = E([27, 6] - [5, 2]) = [44, 8]; ||[44, 8] - [4, 0]||_2
    assert aux["recycle_delta"].item() == pytest.approx(math.sqrt(40**2 + 8**2))
    # Eq. 5: F^_h^j = 3([44, 8] + [3, 1]) = [141, 27]; ||[141, 27] - [1, 1]||_2
    assert aux["recycle_feature"].item() == pytest.approx(math.sqrt(140**2 + 26**2))
    # Eq. 7 tail: ||[5, 2] - [4, 0]||_1 / ||[27, 6] - [24, 0]||_1 = 3 / 9
    assert aux["ms_tail"].item() == pytest.approx(1.5 / (4.5 + MODE_SEEKING_EPS))  # per-element L1: (3/2) / (9/2)
    # Eq. 7 head: F_t^i with Δ^ji = E([-2, 0]) gives 3([-4, 0] + [5, 2]) = [3, 6]; ||[2, 0]||_1 / ||[27, 6] - [3, 6]||_1
    assert aux["ms_head"].item() == pytest.approx(1 / (12 + MODE_SEEKING_EPS))  # (2/2) / (24/2)


def test_recycle_vanishes_when_modules_invert_each_other():
    """With E = id, D = take Δ, G = id the cycle of Fig. 4 closes: L_r^Δ = 0 and F^_h^j = 2F_h^i - F_h^j."""
    safa = closed_form_safa()
    safa.extractor, safa.generator = Fn(lambda x: x), Fn(lambda x: x)
    feats = torch.randn(4, 1, 1, 2)
    out = safa(feats, torch.tensor([1, 1, 3, 3]), state())
    assert out.aux_losses["recycle_delta"].item() == pytest.approx(0.0, abs=1e-6)
    expected = torch.linalg.vector_norm(2 * (feats[0] - feats[1])).item()
    assert out.aux_losses["recycle_feature"].item() == pytest.approx(expected, rel=1e-5)


def test_rms_distance_is_the_l2_norm_per_feature_value():
    """recycle_distance 'rms' = Eq. 4-5's norm / sqrt(C·H·W); same hand-made features as above (C·H·W = 2)."""
    feats = torch.tensor([[3.0, 1.0], [1.0, 1.0], [5.0, 2.0], [4.0, 0.0]]).view(4, 1, 1, 2)
    aux = closed_form_safa(recycle_distance="rms")(feats, torch.tensor([0, 0, 2, 2]), state()).aux_losses
    assert aux["recycle_delta"].item() == pytest.approx(math.sqrt(40**2 + 8**2) / math.sqrt(2))
    assert aux["recycle_feature"].item() == pytest.approx(math.sqrt(140**2 + 26**2) / math.sqrt(2))


def test_mode_seeking_guard_floors_the_denominator_by_the_real_distance():
    real, fake = torch.full((1, 4), 2.0), torch.full((1, 4), 0.5)
    assert mode_seeking(real, fake, 0.0).item() == pytest.approx(2 / (0.5 + MODE_SEEKING_EPS))  # literal Eq. 7
    assert mode_seeking(real, fake, 1.0).item() == pytest.approx(2 / (0.5 + 2 + MODE_SEEKING_EPS))
    # collapsed generated pair: literal ratio ~2e5 with gradient ~-4e10; guarded: 1/ε and gradient -1/(ε^2 r)
    collapsed = torch.zeros(1, 4, requires_grad=True)
    guarded = mode_seeking(real, collapsed + 1e-9, 1.0)
    assert guarded.item() == pytest.approx(1.0, rel=1e-4)
    (grad,) = torch.autograd.grad(guarded, collapsed)
    assert grad.abs().sum().item() == pytest.approx(1 / 2, rel=1e-3)  # |d ratio / d mean|fake|| = 1/r
    far = mode_seeking(real, torch.full((1, 4), 200.0), 1.0).item()
    assert far == pytest.approx(mode_seeking(real, torch.full((1, 4), 200.0), 0.0).item(), rel=0.011)


def test_module_scale_input_gives_outputs_the_rms_of_their_reference_and_scale_invariance():
    torch.manual_seed(6)
    feats, labels = 3 * torch.randn(8, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    safa = make_safa()
    torch.manual_seed(7)
    out = safa(feats, labels, state())
    sources = feats[[4, 6, 5, 7]]  # F~ from F_t^i then from F_t^j, for the two tail pairs
    rms = lambda x: x.flatten(1).square().mean(1).sqrt()  # noqa: E731
    assert torch.allclose(rms(out.feats[8:].detach()), rms(sources), rtol=1e-5)
    with torch.no_grad():  # scaling G's and E's last convolutions changes nothing: the runaway direction is gone
        for module in (safa.generator, safa.extractor):
            module[-1].weight.mul_(10.0)
            module[-1].bias.mul_(10.0)
    torch.manual_seed(7)
    again = safa(feats, labels, state())
    assert torch.allclose(again.feats, out.feats, atol=1e-4)
    for name, term in out.aux_losses.items():
        assert again.aux_losses[name].item() == pytest.approx(term.item(), rel=1e-4), name


def test_diagnostics_count_generated_features_and_show_what_the_modules_do():
    safa = make_safa()
    labels = torch.tensor([0, 0, 2, 2, 3, 3, 1, 1, 2, 3, 3])  # 2 tail pairs, 2 head pairs
    for _ in range(2):
        safa(torch.randn(11, 3, 2, 2), labels, state())
    diag = safa.epoch_diagnostics()
    assert diag["generated"] == 8 and diag["pairs_tail"] == 4 and diag["pairs_head"] == 4
    assert diag["generated_scale"] == pytest.approx(1.0, rel=1e-4)  # module_scale: input
    assert 0 <= diag["q_accuracy"] <= 1 and diag["delta_rms"] > 0 and diag["tail_spread"] > 0
    assert {"recycle_gain", "recycle_gain_min", "recycle_gain_max"} <= set(diag)
    assert set(Safa.progress_keys) <= set(diag)
    assert safa.epoch_diagnostics() == {}  # reset after reading; idle epochs report nothing


def test_contrastive_is_bce_of_same_class_probability_over_half_the_batch():
    """Eq. 6 with a Q that reads the class from channel 0: right answers cost ~0, wrong ones ~10 nats per pair."""
    safa = make_safa(channels=1, height=1, width=1)
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3, 0, 1])
    feats = labels.float().view(-1, 1, 1, 1)
    seen = []

    def judge(sign):
        def q(pair):
            seen.append(pair.shape[0])
            return sign * (10.0 - 20.0 * (pair[:, 0] != pair[:, 1]).float()).view(-1, 1)
        return Fn(q)

    safa.contrast = judge(+1)
    assert safa.contrastive(feats, labels).item() == pytest.approx(math.log1p(math.exp(-10.0)), abs=1e-6)
    safa.contrast = judge(-1)
    assert safa.contrastive(feats, labels).item() == pytest.approx(math.log1p(math.exp(10.0)), rel=1e-4)
    assert seen == [4, 4]  # s = 9 -> s // 2 pairs


# ---------------------------------------------------------------------------------- batch contract
def test_appends_one_generated_feature_per_real_tail_sample_with_its_label():
    torch.manual_seed(0)
    safa = make_safa()
    # pairs: (0,0) head, (2,2) tail, (3,3) tail, (1,1) head, (2,3) not a pair, then one unpaired sample
    labels = torch.tensor([0, 0, 2, 2, 3, 3, 1, 1, 2, 3, 3])
    feats = torch.randn(11, 3, 2, 2)
    out = safa(feats, labels, state())
    assert out.feats.shape == (15, 3, 2, 2) and out.labels.tolist() == labels.tolist() + [2, 3, 2, 3]
    assert torch.equal(out.feats[:11], feats)
    assert out.sample_weights is None
    assert set(out.aux_losses) == {"recycle_delta", "recycle_feature", "ms_tail", "ms_head", "contrastive"}
    assert all(term.dim() == 0 and term.dtype == torch.float32 and torch.isfinite(term) for term in out.aux_losses.values())


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 0, 1], [2, 2, 3, 3], [0, 1, 2, 3]])
def test_identity_without_both_head_and_tail_pairs(labels):
    feats = torch.randn(len(labels), 3, 2, 2)
    out = make_safa()(feats, torch.tensor(labels), state())
    assert out.feats is feats and out.aux_losses == {}


def test_idle_before_start_epoch():
    feats = torch.randn(4, 3, 2, 2)
    out = make_safa()(feats, torch.tensor([0, 0, 2, 2]), state(epoch=1))
    assert out.feats is feats and out.aux_losses == {}


def module_grads(safa: Safa, term: torch.Tensor, feats: torch.Tensor) -> dict[str, bool]:
    """Which of E, D, G, Q and the backbone features `term` sends a non-zero gradient to."""
    parts = {"E": safa.extractor, "D": safa.delta_generator, "G": safa.generator, "Q": safa.contrast}
    names = list(parts)
    params = [list(parts[name].parameters()) for name in names]
    grads = torch.autograd.grad(term, [feats] + sum(params, []), retain_graph=True, allow_unused=True)
    reached = {"backbone": grads[0] is not None and bool(grads[0].abs().sum() > 0)}
    start = 1
    for name, group in zip(names, params):
        chunk = grads[start:start + len(group)]
        reached[name] = any(g is not None and bool(g.abs().sum() > 0) for g in chunk)
        start += len(group)
    return reached


def test_gradient_routing():
    """Aux losses train SAFA's modules only (real features are read detached); generated features carry
    the classification gradient back into E, D, G; Q is trained by L_c alone."""
    torch.manual_seed(1)
    safa = make_safa()
    feats = torch.randn(8, 3, 2, 2, requires_grad=True)
    out = safa(feats, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), state())
    generator_path = {"backbone": False, "E": True, "D": True, "G": True, "Q": False}
    for name in ("recycle_delta", "recycle_feature", "ms_tail", "ms_head"):
        assert module_grads(safa, out.aux_losses[name], feats) == generator_path, name
    assert module_grads(safa, out.aux_losses["contrastive"], feats) == {**generator_path, "Q": True}
    assert module_grads(safa, out.feats[8:].square().sum(), feats) == generator_path
    assert module_grads(safa, out.feats[:8].square().sum(), feats) == {"backbone": True, "E": False, "D": False,
                                                                        "G": False, "Q": False}


@pytest.mark.parametrize("key", list(TERMS))
def test_zero_weight_removes_and_skips_the_term(key):
    safa = make_safa(**{key: 0.0})
    batches: dict[str, list[int]] = {"E": [], "Q": []}
    safa.extractor.register_forward_hook(lambda m, i, o: batches["E"].append(i[0].shape[0]))
    safa.contrast.register_forward_hook(lambda m, i, o: batches["Q"].append(i[0].shape[0]))
    out = safa(torch.randn(8, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), state())
    expected = {name for names in TERMS.values() for name in names} - set(TERMS[key])
    assert set(out.aux_losses) == expected
    n = 2  # tail pairs
    extractor_calls = {"lambda_recycle": [2 * n], "lambda_ms_head": [n, n]}.get(key, [2 * n, n])
    assert batches["E"] == extractor_calls  # Δ^ij (+ Δ^ji for L_ms^h), then Δ^ (recycle)
    assert batches["Q"] == ([] if key == "lambda_contrastive" else [6])  # (8 real + 4 generated) / 2 pairs
    assert out.feats.shape[0] == 12


# --------------------------------------------------------------------------------- insertion points
def tiny_backbone() -> Backbone:
    """Boundaries 1, 2, 3 = 4 x 4 x 4, 6 x 2 x 2, 8 x 1 x 1 on 4 x 4 inputs."""
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    stages = [nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), *block(3, 4, 1)), nn.Sequential(*block(4, 6, 2)),
              nn.Sequential(*block(6, 8, 2))]
    info = [FeatureInfo(3, 1, "input"), FeatureInfo(4, 1, "s0"), FeatureInfo(6, 2, "s1"), FeatureInfo(8, 4, "s2")]
    return Backbone(stages, nn.Linear(8, 4), info)


@pytest.mark.parametrize("k, spec", [(1, (4, 4, 4)), (2, (6, 2, 2)), (3, (8, 1, 1))])
def test_every_insertion_point_trains_end_to_end(k, spec):
    torch.manual_seed(2)
    model = tiny_backbone()
    safa = make_safa(*spec)
    labels = torch.tensor([0, 0, 2, 2, 1, 1])  # one tail pair: 1-sample batches inside SAFA on 1 x 1 maps
    feats = model.forward_until(k, torch.rand(6, 3, 4, 4))
    assert feats.shape[1:] == spec
    out = safa(feats, labels, TrainState(epoch=2, epochs=4, step=0, steps_per_epoch=1, model=model))
    logits = model.forward_from(k, out.feats)
    assert logits.shape == (8, 4)
    loss = nn.functional.cross_entropy(logits, out.labels)
    loss = loss + sum(safa.loss_weights[name] * term for name, term in out.aux_losses.items())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in safa.generator.parameters())
    assert safa.contrast[-1].weight.grad is not None


def test_bfloat16_autocast_keeps_loss_terms_in_float32():
    safa = make_safa()
    feats = torch.randn(8, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = safa(feats, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), state())
    assert out.feats.dtype == feats.dtype
    assert all(term.dtype == torch.float32 and torch.isfinite(term) for term in out.aux_losses.values())


# -------------------------------------------------------------------------------------------- sampler
def check_pairs(order: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
    for start in range(0, order.numel(), batch_size):
        batch = labels[order[start:start + batch_size]]
        pairs = batch[: 2 * (batch.numel() // 2)].view(-1, 2)
        assert torch.equal(pairs[:, 0], pairs[:, 1])


@pytest.mark.parametrize("num_samples, batch_size", [(20, 4), (20, 5), (13, 6), (40, 8)])
def test_pair_sampler_puts_same_class_pairs_at_2j_2j1_of_every_batch(num_samples, batch_size):
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] + [3] * 2)
    order = same_class_pairs(labels, torch.bincount(labels), num_samples=num_samples, batch_size=batch_size,
                             generator=torch.Generator().manual_seed(0), head_mask=HEAD_MASK)
    assert order.dtype == torch.int64 and order.shape == (num_samples,)
    assert int(order.min()) >= 0 and int(order.max()) < labels.numel()
    check_pairs(order, labels, batch_size)


def test_pair_sampler_anchors_cover_the_data_and_partners_are_other_samples():
    labels = torch.tensor([0] * 5 + [1] * 4 + [2])
    order = same_class_pairs(labels, torch.bincount(labels), num_samples=20, batch_size=10,
                             generator=torch.Generator().manual_seed(3), head_mask=None)
    anchors, partners = order[0::2], order[1::2]
    assert sorted(anchors.tolist()) == list(range(10))  # instance distribution: each image once as an anchor
    singleton = anchors == 9
    assert torch.equal(partners[singleton], anchors[singleton])  # a class of one pairs with itself
    assert bool((partners[~singleton] != anchors[~singleton]).all())


def test_pair_sampler_partner_is_uniform_over_the_other_members():
    labels = torch.zeros(4, dtype=torch.long)
    order = same_class_pairs(labels, torch.tensor([4]), num_samples=4000, batch_size=100,
                             generator=torch.Generator().manual_seed(0), head_mask=None)
    anchors, partners = order[0::2], order[1::2]
    hits = torch.bincount(partners[anchors == 0], minlength=4)
    assert hits[0] == 0 and hits[1:].min() > 0.25 * hits.sum()  # each of the 3 others ~1/3


def test_pair_sampler_is_reproducible():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    def draw(seed):
        return same_class_pairs(labels, torch.bincount(labels), num_samples=12, batch_size=4,
                                generator=torch.Generator().manual_seed(seed), head_mask=None)
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


# ------------------------------------------------------------------------------------- checkpointing
def test_state_dict_round_trip_reproduces_the_step():
    torch.manual_seed(4)
    trained, fresh = make_safa(), make_safa()
    feats, labels = torch.randn(8, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    trained(feats, labels, state())  # moves BatchNorm running statistics
    fresh.load_state_dict(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert any("running_mean" in key for key in trained.state_dict())
    torch.manual_seed(5)
    a = trained(feats, labels, state())
    torch.manual_seed(5)
    b = fresh(feats, labels, state())
    assert torch.equal(a.feats, b.feats)
    assert all(torch.equal(a.aux_losses[name], b.aux_losses[name]) for name in a.aux_losses)


# ---------------------------------------------------------------------------------- real CIFAR-10
@pytest.mark.slow
@pytest.mark.cifar
def test_cifar10_resnet32_from_scratch_is_finite_and_reports_diagnostics(cifar_root):
    """Paper defaults (λ, boundary, γ), active from step 0 at the warmup lr, no gradient clipping: the
    literal forms reached inf within ~6 steps here."""
    from ltsearch.config import load_run_config
    from ltsearch.engine import Trainer

    config = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10_lt.yaml", [
        f"data.root={cifar_root}", "data.max_train_per_class=100", "data.max_eval_per_class=20", "train.epochs=2",
        "train.threads=1", "augmenter.name=safa", "augmenter.start_epoch=0", "optim.grad_clip=null"])
    trainer = Trainer(config, cache_dir=Path("/tmp/ltsearch-test-cache"))
    history = [result.metrics for result in trainer.run()]
    terms = ("recycle_delta", "recycle_feature", "ms_tail", "ms_head", "contrastive")
    for metrics in history:
        assert math.isfinite(metrics["train/loss"]) and metrics["train/cls_loss"] < 10
        assert all(math.isfinite(metrics[f"train/aux/{name}"]) for name in terms)
        assert metrics["aug/generated"] > 0 and metrics["aug/generated"] == 2 * metrics["aug/pairs_tail"]
        assert metrics["aug/generated_scale"] == pytest.approx(1.0, rel=1e-3)  # generated features on the real scale
        assert metrics["aug/delta_rms"] > 0 and metrics["aug/tail_spread"] > 0 and metrics["aug/q_accuracy"] > 0
    assert all(history[0][f"train/aux/{name}"] != history[1][f"train/aux/{name}"] for name in terms)  # they move
