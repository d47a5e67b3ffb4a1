"""ImageNet-LT / iNaturalist backbones: torchvision's ResNet-50, ResNeXt-50 (32x4d) and ResNet-152.

The networks are torchvision's own constructors (weights=None, nothing is downloaded), cut into
[Normalize + conv1/bn1/relu/maxpool, layer1..layer4] so an augmenter can sit at any of the six
boundaries. `weights` is a local state-dict file in torchvision's key layout (e.g. a downloaded
`resnet50-*.pth`) or in this package's Backbone layout; its `fc` is used only when it fits the head.
With pretrained weights the data's mean/std should be the ones the weights were trained with.
`width` is not used: the channel plan is torchvision's. torchvision itself (~1 s of imports, torch._dynamo
among them) is imported when one of these networks is built, not when the backbones are registered.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.models.heads import create_classifier, load_backbone_weights, read_weights_file
from ltsearch.registry import BACKBONES

if TYPE_CHECKING:
    import torchvision

#: the architectures, each named as its torchvision.models constructor (looked up when a network is built)
ARCHITECTURES = ("resnet50", "resnext50_32x4d", "resnet152")
STAGE_NAMES = ("input", "stem", "layer1", "layer2", "layer3", "layer4")
STAGE_CHANNELS = (64, 256, 512, 1024, 2048)
STAGE_REDUCTIONS = (1, 4, 4, 8, 16, 32)


def input_conv(in_chans: int) -> nn.Conv2d:
    """torchvision's 7x7 stride-2 stem conv for `in_chans` channels, with its Kaiming fan-out init."""
    conv = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def split_into_stages(net: torchvision.models.ResNet, mean: tuple[float, ...], std: tuple[float, ...]) -> list[nn.Module]:
    stem = nn.Sequential(Normalize(mean, std), net.conv1, net.bn1, net.relu, net.maxpool)
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4]


def torchvision_key_aliases(net: torchvision.models.ResNet, model: Backbone) -> dict[str, str]:
    """torchvision state-dict key -> Backbone key, found by module identity (the stages share modules)."""
    names = {id(module): name for name, module in model.named_modules()}
    names[id(net.fc)] = "classifier"
    aliases = {}
    for key in net.state_dict():
        path, _, leaf = key.rpartition(".")
        aliases[key] = f"{names[id(net.get_submodule(path))]}.{leaf}"
    return aliases


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Spread the filters over `in_chans` inputs: summed over the file's channels, divided evenly.

    A grey image (every channel equal) then gets the same stem response as the pretrained network
    gave it, whatever the channel count.
    """
    return weight.sum(dim=1, keepdim=True).expand(-1, in_chans, -1, -1) / in_chans


def load_torchvision_weights(model: Backbone, net: torchvision.models.ResNet, path: str, in_chans: int) -> None:
    aliases = torchvision_key_aliases(net, model)
    state = {aliases.get(key, key): value for key, value in read_weights_file(path).items()}
    conv_key = aliases["conv1.weight"]
    if conv_key in state and state[conv_key].dim() == 4 and state[conv_key].shape[1] != in_chans:
        state[conv_key] = adapt_input_conv(state[conv_key], in_chans)
    load_backbone_weights(model, state, path)


def build_torchvision_resnet(*, arch: str, num_classes: int, in_chans: int, mean: tuple[float, ...],
                             std: tuple[float, ...], cosine_classifier: bool, width: int, weights: str | None) -> Backbone:
    import torchvision.models

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_chans != 3:
        net.conv1 = input_conv(in_chans)
    feature_info = [FeatureInfo(c, r, n) for c, r, n in zip((in_chans, *STAGE_CHANNELS), STAGE_REDUCTIONS, STAGE_NAMES)]
    classifier = create_classifier(net.fc.in_features, num_classes, cosine=True) if cosine_classifier else net.fc
    model = Backbone(split_into_stages(net, mean, std), classifier, feature_info)
    if weights is not None:
        load_torchvision_weights(model, net, weights, in_chans)
    return model


for _arch in ARCHITECTURES:
    BACKBONES.register(_arch, num_stages=5)(partial(build_torchvision_resnet, arch=_arch))
