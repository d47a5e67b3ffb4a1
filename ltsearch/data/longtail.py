"""Long-tail construction: how many training images each class keeps, and which ones.

Profiles (Cao et al. 2019, "LDAM-DRW", Sec. 4; Buda et al. 2018 for `step`) map the imbalance factor
ρ = n_max / n_min to per-class counts, classes in label order:

    exp:  n_i = ⌊n_max · ρ^(−i/(C−1))⌋
    step: n_i = n_max for the first C//2 classes, ⌊n_max / ρ⌋ for the rest

`n_max` is the per-class size of the balanced pool (CIFAR: 50000 / C). The floors are exact, computed on
integers only: with ρ = p/q in lowest terms, n_i is the largest integer k with
k^(C−1) · p^i ≤ n_max^(C−1) · q^i, so the counts are the same on every machine. A float
`int(n_max * (1/ρ) ** (i/(C-1)))` is not: its last bit depends on the platform's `pow` (numpy picks a
SIMD kernel per CPU), and where n_i is an exact integer one ulp below decides k − 1 versus k — even
49 · (1/49) is 0.9999999999999999. ρ is the decimal number the config wrote, Fraction(str(ρ)):
`imbalance: 33.3` is 333/10, not the binary float nearest to it. It must satisfy 1 ≤ ρ ≤ n_max, so
that the rarest class keeps at least one image.

At CIFAR-10 (n_max 5000) and CIFAR-100 (n_max 500), ρ ∈ {10, 20, 50, 100, 200}, the exact counts equal
LDAM-DRW's float ones: CIFAR-10 ρ=100 gives [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
(12,406), ρ=50 13,996, and CIFAR-100 ρ=100 gives 10,847.

A construction is one paper's whole recipe, counts and images, offered by name:

    ldam  LDAM-DRW's: the counts above; numpy RandomState(seed), then class by class in label order,
          shuffle that class's indices and keep the first n_i (the community standard).
    rsg   RSG's code: the same counts, but its per-class shuffle is commented out, so the first n_i
          images of each class in file order.
    m2m   M2m's code: μ = (1/ρ)^(1/(C−1)), n_i = int(n_max · μ^i), the first n_i in file order, exp only.
          μ^i is the same real number as ρ^(−i/(C−1)), so ltsearch uses the exact counts above; the
          subset then equals rsg's (exp). M2m's own float code is CPU-dependent: on CPUs whose `pow`
          rounds μ^i down it keeps 13,995 images at CIFAR-10 ρ=50 and 10,846 at CIFAR-100 ρ=100 (one
          image fewer in a few classes); on others 13,996 and 10,847, the exact counts.

The same ρ therefore gives different subsets under ldam and rsg/m2m, which is why every run records
the construction and seed (and fingerprints of the image ids, `dataset.assemble`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import torch

from ltsearch.data.splits import rank_within_class
from ltsearch.errors import ConfigError


def imbalance_ratio(imbalance: float) -> Fraction:
    """ρ as the decimal the config wrote (Fraction(str(ρ))), so exact counts follow what the user typed, not float noise."""
    rho = Fraction(str(imbalance))
    if rho < 1:
        raise ValueError(f"imbalance must be >= 1 (n_max / n_min), got {imbalance!r}")
    return rho


def exp_counts(img_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Exponential profile (LDAM-DRW's CIFAR-LT), exactly: n_i = ⌊n_max · ρ^(−i/(C−1))⌋.

    n_i is the largest k with k^(C−1) ≤ n_max^(C−1) · q^i / p^i for ρ = p/q; as k^(C−1) is an integer,
    the right side may be floored first, leaving an integer (C−1)-th root.
    """
    rho, degree = imbalance_ratio(imbalance), num_classes - 1
    top = img_max ** degree
    return [_floor_root(top * rho.denominator ** i // rho.numerator ** i, degree, img_max) for i in range(num_classes)]


def step_counts(img_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Step profile: the first C//2 classes keep n_max, the others ⌊n_max / ρ⌋ (exact: n_max · q // p)."""
    rho = imbalance_ratio(imbalance)
    minor = img_max * rho.denominator // rho.numerator
    return [img_max if i < num_classes // 2 else minor for i in range(num_classes)]


def _floor_root(value: int, degree: int, high: int) -> int:
    """The largest integer k in [0, high] with k^degree ≤ value (bisection on integers: no float, no platform pow)."""
    low, high = 0, high + 1  # invariant: low^degree <= value < high^degree, or high is past the range
    while high - low > 1:
        mid = (low + high) // 2
        if mid ** degree <= value:
            low = mid
        else:
            high = mid
    return low


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
    "m2m": Construction(counts={"exp": exp_counts}, pick=first_indices, seeded=False),  # M2m's μ^i, exactly
}


def construct(labels: torch.Tensor, img_max: int, num_classes: int, profile: str, imbalance: float,
              construction: str, seed: int) -> tuple[torch.Tensor, list[int]]:
    """(indices kept from the pool, per-class counts) for the named construction; profiles are checked at config load.

    ρ ≥ 1 is checked at config load too; ρ ≤ n_max needs the pool, so it is checked here.
    """
    if imbalance_ratio(imbalance) > img_max:
        raise ConfigError("data.imbalance", imbalance, f"at most {img_max}, the images per class of this pool (ρ = n_max / n_min)",
                          hint=f"A larger ρ leaves the rarest class ⌊{img_max} / ρ⌋ = 0 images; lower data.imbalance.")
    recipe = CONSTRUCTIONS[construction]
    counts = recipe.counts[profile](img_max, num_classes, imbalance)
    return recipe.pick(labels, counts, seed), counts
