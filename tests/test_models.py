"""Backbones: stage splitting, boundary metadata, heads, option-A shortcuts, weight files, and a digits fit."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ltsearch.errors import ConfigError
from ltsearch.models import create_backbone, num_boundaries
from ltsearch.models.base import Normalize
from ltsearch.models.heads import NormedLinear, create_classifier
from ltsearch.models.resnet_cifar import ZeroPadShortcut
from ltsearch.models.torchvision_nets import adapt_input_conv
from ltsearch.registry import BACKBONES

CIFAR_RESNETS = {"resnet32": 5, "resnet56": 9, "resnet110": 18}
TORCHVISION_NETS = ("resnet50", "resnext50_32x4d", "resnet152")
MEAN3, STD3 = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


@functools.lru_cache(maxsize=None)
def built(name: str, in_chans: int = 3, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(name, num_classes=num_classes, in_chans=in_chans, mean=MEAN3[:in_chans],
                           std=STD3[:in_chans], width=8)


def input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """Smallest square input whose side every boundary's reduction divides twice over (>= 8)."""
    side = max(8, 2 * max(info.reduction for info in model.feature_info))
    return torch.rand(batch, model.feature_info[0].channels, side, side, generator=torch.Generator().manual_seed(1))


def test_all_backbones_are_registered_with_their_stage_count():
    expected = {"small_cnn", *CIFAR_RESNETS, *TORCHVISION_NETS}
    assert expected <= set(BACKBONES.names())
    assert BACKBONES.get("small_cnn").meta["num_stages"] == 3
    assert all(BACKBONES.get(n).meta["num_stages"] == 4 for n in CIFAR_RESNETS)
    assert all(BACKBONES.get(n).meta["num_stages"] == 5 for n in TORCHVISION_NETS)


@pytest.mark.parametrize("name", sorted({"small_cnn", *CIFAR_RESNETS, *TORCHVISION_NETS}))
def test_split_forward_and_feature_info_agree_with_the_network(name):
    model = built(name).eval()
    x = input_for(model)
    assert num_boundaries(name) == model.num_boundaries == len(model.stages) + 1 == len(model.feature_info)
    assert isinstance(model.stages[0][0], Normalize)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3)
        for k, info in enumerate(model.feature_info):
            h = model.forward_until(k, x)
            assert h.shape == (2, info.channels, x.shape[2] // info.reduction, x.shape[3] // info.reduction), (k, info)
            torch.testing.assert_close(model.forward_from(k, h), logits, rtol=1e-5, atol=1e-5)
    assert model.feature_dim == model.classifier.weight.shape[1]


@pytest.mark.parametrize("name", sorted({"small_cnn", *CIFAR_RESNETS, *TORCHVISION_NETS}))
def test_gradients_reach_every_parameter(name):
    model = built(name).train()
    model.zero_grad()
    model(input_for(model)).logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("name", ["small_cnn", "resnet32", "resnet50"])
def test_single_channel_8x8_inputs_are_accepted(name):
    model = create_backbone(name, num_classes=10, in_chans=1, mean=(0.3,), std=(0.2,)).eval()
    assert model.feature_info[0].channels == 1
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_normalize_is_the_first_op_of_stage_zero():
    model = built("resnet32")
    mean_image = torch.tensor(MEAN3).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.equal(model.stages[0][0](mean_image), torch.zeros(2, 3, 4, 4))
    one_std_above = mean_image + torch.tensor(STD3).view(1, 3, 1, 1)
    torch.testing.assert_close(model.stages[0][0](one_std_above), torch.ones(2, 3, 4, 4))


def test_cosine_head_gives_cosines_with_linear_weight_layout():
    torch.manual_seed(0)
    head = NormedLinear(6, 4)
    assert head.weight.shape == (4, 6) and head.bias is None
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(4))
    assert head.weight.abs().max() <= 1.0
    x = 10 * torch.randn(5, 6)
    logits = head(x)
    assert logits.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(logits, F.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=2))
    assert torch.allclose(head(x * 7.0), logits, atol=1e-6)  # scale-invariant in the features


def test_create_classifier_and_backbones_pick_the_head_kind():
    assert type(create_classifier(8, 3, cosine=False)) is nn.Linear
    assert type(create_classifier(8, 3, cosine=True)) is NormedLinear
    for name, dim in (("small_cnn", 16), ("resnet32", 64)):
        model = create_backbone(name, num_classes=5, in_chans=3, mean=MEAN3, std=STD3, cosine_classifier=True, width=8)
        assert isinstance(model.classifier, NormedLinear) and model.classifier.weight.shape == (5, dim)
        with torch.no_grad():
            assert model.eval()(torch.rand(2, 3, 8, 8)).abs().max() <= 1.0 + 1e-6


def test_option_a_shortcut_subsamples_and_zero_pads_channels_equally():
    block = built("resnet32").stages[2][0]  # layer2's first block: 16 -> 32 channels, stride 2
    assert isinstance(block.shortcut, ZeroPadShortcut)
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 4, 4)) and torch.equal(out[:, 24:], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert isinstance(built("resnet32").stages[2][1].shortcut, nn.Identity)


def test_resnet32_parameter_count_and_depth_6n_plus_2():
    model = create_backbone("resnet32", num_classes=10, in_chans=3, mean=MEAN3, std=STD3)
    # stem conv 3*16*9 + BN 2*16 = 464
    # layer1: 5 blocks x (2 * 16*16*9 + 2 * 2*16) = 23,360
    # layer2: (16*32*9 + 32*32*9 + 4*32) + 4 x (2 * 32*32*9 + 4*32) = 13,952 + 74,240 = 88,192
    # layer3: (32*64*9 + 64*64*9 + 4*64) + 4 x (2 * 64*64*9 + 4*64) = 55,552 + 295,936 = 351,488
    # head 64*10 + 10 = 650; option-A shortcuts add nothing.  Total 464,154 (the paper's "0.46M").
    assert sum(p.numel() for p in model.parameters()) == 464_154
    for name, n in CIFAR_RESNETS.items():
        weighted = [m for m in built(name).modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(weighted) == 6 * n + 2 == BACKBONES.get(name).meta["depth"]


@pytest.mark.parametrize("name", ["small_cnn", "resnet32"])
def test_weights_file_round_trips_and_ignores_a_foreign_head(name, tmp_path):
    source = create_backbone(name, num_classes=10, in_chans=1, mean=(0.3,), std=(0.2,), width=8)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    copy = create_backbone(name, num_classes=10, in_chans=1, mean=(0.3,), std=(0.2,), width=8, weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(copy.eval()(x), source.eval()(x))

    other_task = create_backbone(name, num_classes=4, in_chans=1, mean=(0.3,), std=(0.2,), width=8,
                                 cosine_classifier=True, weights=str(path))
    loaded = other_task.state_dict()
    trunk = [key for key in source.state_dict() if not key.startswith("classifier.")]
    assert all(torch.equal(loaded[key], source.state_dict()[key]) for key in trunk)
    assert other_task.classifier.weight.shape == (4, source.feature_dim)
    assert not torch.equal(loaded["classifier.weight"][:4], source.state_dict()["classifier.weight"][:4])


def test_weights_file_for_another_architecture_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "resnet32.pt"
    torch.save(built("resnet32").state_dict(), path)
    with pytest.raises(ConfigError) as info:
        create_backbone("resnet56", num_classes=3, in_chans=3, mean=MEAN3, std=STD3, weights=str(path))
    assert info.value.key == "model.weights" and str(path) in str(info.value)
    assert "missing stages.1.5.conv1.weight" in str(info.value)
    with pytest.raises(ConfigError) as info:
        create_backbone("small_cnn", num_classes=3, in_chans=3, mean=MEAN3, std=STD3, weights=str(path))
    assert info.value.key == "model.weights"
    garbage = tmp_path / "not_weights.pt"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match="not_weights.pt"):
        create_backbone("small_cnn", num_classes=3, in_chans=3, mean=MEAN3, std=STD3, weights=str(garbage))


def test_torchvision_weights_file_loads_into_the_stages(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, num_classes=7).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial running stats, so eval mode is checked too
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50-test.pth"
    torch.save(reference.state_dict(), path)

    same_task = create_backbone("resnet50", num_classes=7, in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3,
                                weights=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same_task(x), reference(x), rtol=1e-4, atol=1e-5)

    grey = create_backbone("resnet50", num_classes=3, in_chans=1, mean=(0.0,), std=(1.0,), weights=str(path)).eval()
    assert torch.equal(grey.stages[3][0].conv1.weight, reference.layer3[0].conv1.weight)
    assert grey.classifier.weight.shape == (3, 2048)
    g = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(grey.stages[0][1](g), reference.conv1(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_adapted_input_conv_keeps_the_response_to_grey_images():
    weight = torch.randn(4, 3, 3, 3)
    grey = torch.rand(1, 1, 5, 5)
    for in_chans in (1, 2, 5):
        adapted = adapt_input_conv(weight, in_chans)
        assert adapted.shape == (4, in_chans, 3, 3)
        torch.testing.assert_close(F.conv2d(grey.expand(-1, in_chans, -1, -1), adapted),
                                   F.conv2d(grey.expand(-1, 3, -1, -1), weight))


def test_small_cnn_fits_balanced_digits_above_90_percent_balanced_accuracy():
    datasets = pytest.importorskip("sklearn.datasets")
    images, labels = datasets.load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(labels)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, test = order[:1200], order[1200:]
    torch.manual_seed(0)
    model = create_backbone("small_cnn", num_classes=10, in_chans=1, mean=(x[train].mean().item(),),
                            std=(x[train].std().item(),))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    for _ in range(3):
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = model.eval()(x[test]).argmax(dim=1)
    recall = torch.stack([(predictions[y[test] == c] == c).float().mean() for c in range(10)])
    assert recall.mean() > 0.90
