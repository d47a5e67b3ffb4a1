"""Long-tail construction: how many training images each class keeps, and which ones.

Profiles (Cao et al. 2019, "LDAM-DRW", Sec. 4; Buda et al. 2018 for `step`) map the imbalance factor
ρ = n_max / n_min to per-class counts, classes in label order:

    exp:  n_i = int(img_max · (1/ρ)^(i / (C-1)))
    step: n_i = img_max for the first C//2 classes, int(img_max · (1/ρ)) for the rest

`img_max` is the per-class size of the balanced pool (CIFAR: 50000 / C). The float expression is the
reference one (1/ρ raised to a power, not ρ^-x), so the counts match LDAM-DRW's bit for bit: CIFAR-10
ρ=100 gives [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and CIFAR-100 ρ=100 gives 10,847.

A construction is one paper's whole recipe, counts and images, offered by name and reproduced exactly:

    ldam  LDAM-DRW's: the counts above; numpy RandomState(seed), then class by class in label order,
          shuffle that class's indices and keep the first n_i (the community standard).
    rsg   RSG's code: the same counts, but its per-class shuffle is commented out, so the first n_i
          images of each class in file order.
    m2m   M2m's code: μ = (1/ρ)^(1/(C-1)) and n_i = int(n_max · μ^i), the first n_i in file order.
          μ^i rounds differently from (1/ρ)^(i/(C-1)): CIFAR-10 ρ=50 gives 13,995 images (LDAM: 13,996)
          and CIFAR-100 ρ=100 gives 10,846 (LDAM: 10,847). M2m's code has only the exp profile.

The same ρ therefore gives different subsets, which is why every run records the construction and seed.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def m2m_exp_counts(img_max: int, num_classes: int, imbalance: float) -> list[int]:
    """M2m's CIFAR-LT counts: μ = (1/ρ)^(1/(C-1)), n_i = int(img_max · μ^i) (one image fewer than LDAM in places).

    Computed with numpy's power, as M2m's code does: Python's `**` rounds μ one ulp differently, and
    that ulp decides int(99.99999999999994) = 99 versus int(100.0000000000001) = 100 at CIFAR-10 ρ = 50.
    """
    mu = np.power(1.0 / imbalance, 1.0 / (num_classes - 1))
    return [int(img_max * np.power(mu, i)) for i in range(num_classes)]


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
    """The first n_i images of each class in file order (RSG's and M2m's code; `seed` is unused by design)."""
    keep = rank_within_class(labels) < torch.tensor(counts, dtype=torch.int64)[labels]
    return torch.nonzero(keep).squeeze(1)


@dataclass(frozen=True)
class Construction:
    """One paper's long-tail recipe: per-profile count rules and the rule that picks the images."""

    counts: dict[str, Callable[[int, int, float], list[int]]]
    pick: Callable[[torch.Tensor, list[int], int], torch.Tensor]
    seeded: bool


PROFILES: dict[str, Callable[[int, int, float], list[int]]] = {"exp": exp_counts, "step": step_counts}
CONSTRUCTIONS: dict[str, Construction] = {
    "ldam": Construction(counts=PROFILES, pick=ldam_indices, seeded=True),
    "rsg": Construction(counts=PROFILES, pick=first_indices, seeded=False),
    "m2m": Construction(counts={"exp": m2m_exp_counts}, pick=first_indices, seeded=False),
}


def construct(labels: torch.Tensor, img_max: int, num_classes: int, profile: str, imbalance: float,
              construction: str, seed: int) -> tuple[torch.Tensor, list[int]]:
    """(indices kept from the pool, per-class counts) for the named construction; profiles are checked at config load."""
    recipe = CONSTRUCTIONS[construction]
    counts = recipe.counts[profile](img_max, num_classes, imbalance)
    return recipe.pick(labels, counts, seed), counts
