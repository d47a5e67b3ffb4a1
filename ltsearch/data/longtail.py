"""Long-tail construction: how many training images each class keeps, and which ones.

Profiles (Cao et al. 2019, "LDAM-DRW", Sec. 4; Buda et al. 2018 for `step`) map the imbalance factor
ρ = n_max / n_min to per-class counts, classes in label order:

    exp:  n_i = int(img_max · (1/ρ)^(i / (C-1)))
    step: n_i = img_max for the first C//2 classes, int(img_max · (1/ρ)) for the rest

`img_max` is the per-class size of the balanced pool (CIFAR: 50000 / C). The float expression is the
reference one (1/ρ raised to a power, not ρ^-x), so the counts match LDAM-DRW's bit for bit: CIFAR-10
ρ=100 gives [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and CIFAR-100 ρ=100 gives 10,847.

Constructions pick which images: `ldam` (the community standard) seeds numpy's legacy RandomState and,
class by class in label order, shuffles that class's indices and keeps the first n_i; `first` keeps the
first n_i of each class in file order (RSG's and M2m's code). The same counts therefore give different
subsets, which is why every run records the construction and its seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ltsearch.data.splits import rank_within_class


def exp_counts(img_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Exponential profile (LDAM-DRW's CIFAR-LT): n_i = int(img_max · (1/ρ)^(i/(C-1)))."""
    ratio = 1.0 / imbalance
    return [int(img_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def step_counts(img_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Step profile: the first C//2 classes keep img_max, the others int(img_max · (1/ρ))."""
    minor = int(img_max * (1.0 / imbalance))
    return [img_max if i < num_classes // 2 else minor for i in range(num_classes)]


def ldam_indices(labels: torch.Tensor, counts: list[int], seed: int) -> torch.Tensor:
    """LDAM-DRW's subset: RandomState(seed); per class in label order, shuffle its indices, keep the first n_i."""
    labels_np = labels.numpy()
    rng = np.random.RandomState(seed)
    chosen = []
    for cls, count in enumerate(counts):
        members = np.nonzero(labels_np == cls)[0]
        rng.shuffle(members)
        chosen.append(members[:count])
    return torch.from_numpy(np.concatenate(chosen).astype(np.int64))


def first_indices(labels: torch.Tensor, counts: list[int], seed: int) -> torch.Tensor:
    """RSG's and M2m's subset: the first n_i images of each class in file order (`seed` is unused by design)."""
    keep = rank_within_class(labels) < torch.tensor(counts, dtype=torch.int64)[labels]
    return torch.nonzero(keep).squeeze(1)


PROFILES: dict[str, Callable[[int, int, float], list[int]]] = {"exp": exp_counts, "step": step_counts}
CONSTRUCTIONS: dict[str, Callable[[torch.Tensor, list[int], int], torch.Tensor]] = {
    "ldam": ldam_indices,
    "first": first_indices,
}
