"""The backbone contract: input normalisation + a list of stages + a classification head.

Boundary k is the tensor after k stages: k = 0 is the input image in [0, 1] (normalisation is the
first op of stage 0, so M2m can work and clamp in pixel space), k = len(stages) is the last feature
map before global pooling. `forward_from(k, h)` finishes the network from boundary k, so an
augmenter inserted at k can hand back an extended batch. `feature_info[k]` describes boundary k
(channels, spatial reduction) so insertion points are validated from data, not hard-coded (timm's
`feature_info` idea).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ltsearch.registry import BACKBONES


@dataclass(frozen=True)
class FeatureInfo:
    """Boundary k: `channels` and `reduction` (input side / feature side) of the tensor there."""

    channels: int
    reduction: int
    module: str


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so inputs stay in [0, 1] everywhere outside it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Backbone(nn.Module):
    """`stages[0]` starts with `Normalize`; `classifier` maps pooled features to logits (`.weight` is (C, D))."""

    def __init__(self, stages: list[nn.Module], classifier: nn.Module, feature_info: list[FeatureInfo]):
        super().__init__()
        if len(feature_info) != len(stages) + 1:
            raise ValueError(f"feature_info needs one entry per boundary ({len(stages) + 1}), got {len(feature_info)}")
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier
        self.feature_info = feature_info

    @property
    def num_boundaries(self) -> int:
        return len(self.stages) + 1

    @property
    def feature_dim(self) -> int:
        return self.feature_info[-1].channels

    def forward_until(self, k: int, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[:k]:
            x = stage(x)
        return x

    def pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled vector of the last feature map (the classifier's input)."""
        return torch.flatten(self.pool(feature_map), 1)

    def forward_from(self, k: int, h: torch.Tensor) -> torch.Tensor:
        for stage in self.stages[k:]:
            h = stage(h)
        return self.classifier(self.pooled(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, x)


def num_boundaries(name: str) -> int:
    """Number of stage boundaries of a registered backbone, without building it (for config checks)."""
    return BACKBONES.get(name).meta["num_stages"] + 1


def create_backbone(name: str, *, num_classes: int, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...],
                    cosine_classifier: bool = False, width: int = 32, weights: str | None = None) -> Backbone:
    """Build a registered backbone. `weights` is a local file (never downloaded)."""
    factory = BACKBONES.get(name).obj
    return factory(num_classes=num_classes, in_chans=in_chans, mean=mean, std=std,
                   cosine_classifier=cosine_classifier, width=width, weights=weights)
