"""A split of images with labels, and the per-class slicing rules every protocol here is built from.

Held-out sets are cut "first k of each class in index order" (M2m's val/test protocol), so a rule is a
pure function of the files and the fraction: two runs, two machines, two seeds of the long-tail
construction all evaluate on the same images. Each image carries a source-wide `id` so provenance and
the disjointness of train/val/test can be checked and fingerprinted, not just assumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

Images = torch.Tensor | list[str]


@dataclass
class Split:
    """`images`: uint8 (N, C, H, W) tensor for in-memory sources, or a list of file paths (image lists).

    `ids` identify each image within its source (unique across the source's train and test files);
    they default to 0..N-1 for hand-made splits.
    """

    images: Images
    labels: torch.Tensor
    ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.ids is None:
            self.ids = torch.arange(len(self.labels))
        if len(self.images) != len(self.labels) or len(self.ids) != len(self.labels):
            raise ValueError(f"split sizes disagree: {len(self.images)} images, {len(self.labels)} labels, {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    def subset(self, indices: torch.Tensor) -> "Split":
        indices = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[indices] if self.in_memory else [self.images[i] for i in indices.tolist()]
        return Split(images, self.labels[indices], self.ids[indices])

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes)

    def fingerprint(self) -> str:
        """Short digest of the image ids in order: equal fingerprints mean the very same subset."""
        return hashlib.sha1(self.ids.numpy().astype("<i8").tobytes()).hexdigest()[:16]


def rank_within_class(labels: torch.Tensor) -> torch.Tensor:
    """Position of each sample among the samples of its class, in index order (0 = first of its class)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    return rank


def ceil_fraction(fraction: float, counts: torch.Tensor) -> torch.Tensor:
    """ceil(fraction · n) per entry, blind to float noise: 0.07 · 100 = 7.000000000000001 must give 7, not 8."""
    return torch.ceil(torch.round(fraction * counts.double(), decimals=6)).long()


def take_first_per_class(split: Split, per_class: torch.Tensor) -> tuple[Split, Split]:
    """Split into (first `per_class[c]` images of each class c in index order, the rest)."""
    taken = rank_within_class(split.labels) < per_class[split.labels]
    return split.subset(torch.nonzero(taken).squeeze(1)), split.subset(torch.nonzero(~taken).squeeze(1))


def cap_per_class(split: Split, limit: int | None, num_classes: int) -> Split:
    """Keep at most `limit` images of each class (the first ones in index order); None keeps all."""
    if limit is None:
        return split
    return take_first_per_class(split, torch.full((num_classes,), limit, dtype=torch.int64))[0]
