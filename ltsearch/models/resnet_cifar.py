"""ResNet-32/56/110 for 32x32 inputs (He et al. 2016, Sec. 4.2), the backbone of LDAM-DRW, M2m and SMART.

Depth 6n + 2: a 3x3 stem conv, three stages of n basic blocks with 16/32/64 channels (strides
1/2/2), global average pooling and the head. Shortcuts are the paper's option A (parameter-free):
subsample spatially and zero-pad the new channels, so ResNet-32 keeps its 0.46M parameters.
`width` is not used: the channel plan is the paper's.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.models.heads import create_classifier, load_backbone_weights, read_weights_file
from ltsearch.registry import BACKBONES

STAGE_CHANNELS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
BLOCKS_PER_STAGE = {"resnet32": 5, "resnet56": 9, "resnet110": 18}


def conv3x3(in_chans: int, out_chans: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A identity shortcut: keep every `stride`-th pixel, zero-pad channels equally on both sides."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_chans - in_chans
        self.channel_pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, *self.channel_pad))


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)) with two 3x3 convs (He et al. 2016, Fig. 2)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(in_chans, out_chans, stride)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = conv3x3(out_chans, out_chans)
        self.bn2 = nn.BatchNorm2d(out_chans)
        reshapes = stride != 1 or in_chans != out_chans
        self.shortcut = ZeroPadShortcut(in_chans, out_chans, stride) if reshapes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_chans: int, out_chans: int, stride: int, num_blocks: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chans, out_chans, stride)]
    blocks += [BasicBlock(out_chans, out_chans, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal (fan-in) weights on every Conv2d and Linear, as LDAM-DRW's CIFAR ResNets."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)


def build_resnet_cifar(*, blocks_per_stage: int, num_classes: int, in_chans: int, mean: tuple[float, ...],
                       std: tuple[float, ...], cosine_classifier: bool, width: int, weights: str | None) -> Backbone:
    """Stages [Normalize + stem, layer1, layer2, layer3]: boundaries 0..4 with reductions 1, 1, 1, 2, 4."""
    stem = nn.Sequential(Normalize(mean, std), conv3x3(in_chans, STAGE_CHANNELS[0]),
                         nn.BatchNorm2d(STAGE_CHANNELS[0]), nn.ReLU(inplace=True))
    stages, chans = [stem], STAGE_CHANNELS[0]
    for out_chans, stride in zip(STAGE_CHANNELS, STAGE_STRIDES):
        stages.append(make_stage(chans, out_chans, stride, blocks_per_stage))
        chans = out_chans
    feature_info = [FeatureInfo(in_chans, 1, "input"), FeatureInfo(16, 1, "stem"), FeatureInfo(16, 1, "layer1"),
                    FeatureInfo(32, 2, "layer2"), FeatureInfo(64, 4, "layer3")]
    model = Backbone(stages, create_classifier(chans, num_classes, cosine_classifier), feature_info)
    kaiming_init(model.stages)
    if not cosine_classifier:
        kaiming_init(model.classifier)
    if weights is not None:
        load_backbone_weights(model, read_weights_file(weights), weights)
    return model


for _name, _blocks in BLOCKS_PER_STAGE.items():
    BACKBONES.register(_name, num_stages=4, depth=6 * _blocks + 2)(partial(build_resnet_cifar, blocks_per_stage=_blocks))
