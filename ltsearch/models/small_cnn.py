"""A three-stage CNN sized for 8x8 digits, the default backbone: trials and tests run in seconds on CPU.

Stages [Normalize + conv(in->w), conv(w->w), conv(w->2w, stride 2)], each conv 3x3 + BN + ReLU, so
the last map of an 8x8 digit is 4x4 with 2w channels (a 32x32 image gives 16x16). It exposes the
same boundaries as the ResNets (input, stem, two stages), so every augmenter can be tried on it.
"""

from __future__ import annotations

from torch import nn

from ltsearch.models.base import Backbone, FeatureInfo, Normalize
from ltsearch.models.heads import create_classifier, load_backbone_weights, read_weights_file
from ltsearch.registry import BACKBONES


def conv_bn_relu(in_chans: int, out_chans: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True)]


@BACKBONES.register("small_cnn", num_stages=3)
def small_cnn(*, num_classes: int, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...],
              cosine_classifier: bool, width: int, weights: str | None) -> Backbone:
    """`width` channels in the first two stages, 2·width in the last (the pooled feature size)."""
    stages = [nn.Sequential(Normalize(mean, std), *conv_bn_relu(in_chans, width)),
              nn.Sequential(*conv_bn_relu(width, width)),
              nn.Sequential(*conv_bn_relu(width, 2 * width, stride=2))]
    feature_info = [FeatureInfo(in_chans, 1, "input"), FeatureInfo(width, 1, "stem"),
                    FeatureInfo(width, 1, "stage1"), FeatureInfo(2 * width, 2, "stage2")]
    model = Backbone(stages, create_classifier(2 * width, num_classes, cosine_classifier), feature_info)
    if weights is not None:
        load_backbone_weights(model, read_weights_file(weights), weights)
    return model
