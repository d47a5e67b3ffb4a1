"""Long-tail counts are exact integers, the same on every machine: pinned lists, an independent recomputation,
float-boundary cases, and the ρ rule (the decimal written, at most n_max)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from ltsearch.data.longtail import CONSTRUCTIONS, construct, exp_counts, imbalance_ratio, step_counts
from ltsearch.errors import ConfigError

CIFAR10 = {  # n_max 5000, C = 10
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
    20: [5000, 3584, 2569, 1842, 1320, 946, 678, 486, 348, 250],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    200: [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25],
}
CIFAR100 = {  # n_max 500, C = 100
    10: [500, 488, 477, 466, 455, 445, 434, 424, 415, 405, 396, 387, 378, 369, 361, 352, 344, 336, 328, 321,
        314, 306, 299, 292, 286, 279, 273, 266, 260, 254, 248, 243, 237, 232, 226, 221, 216, 211, 206, 201,
        197, 192, 188, 183, 179, 175, 171, 167, 163, 159, 156, 152, 149, 145, 142, 139, 135, 132, 129, 126,
        123, 121, 118, 115, 112, 110, 107, 105, 102, 100, 98, 95, 93, 91, 89, 87, 85, 83, 81, 79,
        77, 75, 74, 72, 70, 69, 67, 66, 64, 63, 61, 60, 58, 57, 56, 54, 53, 52, 51, 50],
    20: [500, 485, 470, 456, 442, 429, 416, 404, 392, 380, 369, 358, 347, 337, 327, 317, 308, 298, 290, 281,
        272, 264, 256, 249, 241, 234, 227, 220, 214, 207, 201, 195, 189, 184, 178, 173, 168, 163, 158, 153,
        149, 144, 140, 136, 132, 128, 124, 120, 116, 113, 110, 106, 103, 100, 97, 94, 91, 89, 86, 83,
        81, 78, 76, 74, 72, 69, 67, 65, 63, 61, 60, 58, 56, 54, 53, 51, 50, 48, 47, 45,
        44, 43, 41, 40, 39, 38, 37, 35, 34, 33, 32, 31, 30, 29, 29, 28, 27, 26, 25, 25],
    50: [500, 480, 462, 444, 426, 410, 394, 379, 364, 350, 336, 323, 311, 299, 287, 276, 265, 255, 245, 235,
        226, 218, 209, 201, 193, 186, 178, 172, 165, 158, 152, 146, 141, 135, 130, 125, 120, 115, 111, 107,
        102, 98, 95, 91, 87, 84, 81, 78, 75, 72, 69, 66, 64, 61, 59, 56, 54, 52, 50, 48,
        46, 44, 43, 41, 39, 38, 36, 35, 34, 32, 31, 30, 29, 27, 26, 25, 24, 23, 22, 22,
        21, 20, 19, 18, 18, 17, 16, 16, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 10],
    100: [500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237, 226, 216, 206,
        197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107, 102, 98, 93, 89, 85, 81,
        77, 74, 70, 67, 64, 61, 58, 56, 53, 51, 48, 46, 44, 42, 40, 38, 36, 35, 33, 32,
        30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 15, 14, 13, 13, 12,
        12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5],
    200: [500, 473, 449, 425, 403, 382, 362, 343, 325, 308, 292, 277, 263, 249, 236, 224, 212, 201, 190, 180,
        171, 162, 154, 146, 138, 131, 124, 117, 111, 105, 100, 95, 90, 85, 81, 76, 72, 69, 65, 62,
        58, 55, 52, 50, 47, 44, 42, 40, 38, 36, 34, 32, 30, 29, 27, 26, 24, 23, 22, 21,
        20, 19, 18, 17, 16, 15, 14, 13, 13, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7,
        6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2],
}


def exact_exp(img_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Independent recomputation from the definition: the largest k ≤ n_max with k^(C−1) · p^i ≤ n_max^(C−1) · q^i
    (a downward scan, no floor division, no root finding)."""
    rho = Fraction(str(imbalance))
    p, q, e = rho.numerator, rho.denominator, num_classes - 1
    counts = []
    for i in range(num_classes):
        k = img_max
        while k ** e * p ** i > img_max ** e * q ** i:
            k -= 1
        counts.append(k)
    return counts


@pytest.mark.parametrize("imbalance", [10, 20, 50, 100, 200])
def test_cifar_counts_are_the_pinned_exact_integers(imbalance):
    """Every construction (ldam, rsg, m2m) takes these exp counts; they equal LDAM-DRW's usual float ones."""
    for pinned, img_max, num_classes in [(CIFAR10, 5000, 10), (CIFAR100, 500, 100)]:
        counts = pinned[imbalance]
        assert len(counts) == num_classes
        assert counts == exact_exp(img_max, num_classes, float(imbalance))
        for name, recipe in CONSTRUCTIONS.items():
            assert recipe.counts["exp"](img_max, num_classes, float(imbalance)) == counts, name
    assert [sum(CIFAR10[r]) for r in (10, 20, 50, 100, 200)] == [20_431, 17_023, 13_996, 12_406, 11_203]
    assert [sum(CIFAR100[r]) for r in (10, 20, 50, 100, 200)] == [19_573, 15_907, 12_608, 10_847, 9_502]


def test_counts_equal_the_exact_recomputation_across_many_shapes():
    for num_classes in (2, 3, 4, 5, 6, 7, 10):
        for img_max in range(1, 61):
            for imbalance in (1, 1.5, 2, 2.5, 3, 4, 7.3, 8, 9, 16, 25, 27, 32, 49, 60):
                if imbalance <= img_max:
                    assert exp_counts(img_max, num_classes, imbalance) == exact_exp(img_max, num_classes, imbalance), \
                        (img_max, num_classes, imbalance)
                    minor = img_max * Fraction(str(imbalance)).denominator // Fraction(str(imbalance)).numerator
                    assert step_counts(img_max, num_classes, imbalance)[-1] == minor


def test_exact_integer_boundaries_that_floats_round_the_wrong_way():
    """Where n_i is an exact integer a float lands one ulp below it on some or all machines; the floor must not."""
    assert 49 * (1 / 49) == 0.9999999999999999  # IEEE division and product, so int() gives 0 on every machine
    assert exp_counts(49, 2, 49.0) == [49, 1] and step_counts(49, 2, 49.0) == [49, 1]
    assert exp_counts(49, 5, 49.0) == exact_exp(49, 5, 49.0) == [49, 18, 7, 2, 1]
    # ρ = 2^5 over five steps halves each class; int(32 · (1/32) ** (i/5)) gave [32, 16, 7, 4, 1, 1] where this was written
    assert exp_counts(32, 6, 32.0) == exact_exp(32, 6, 32.0) == [32, 16, 8, 4, 2, 1]
    # M2m's float code: n_max · μ^9 is 99.99999999999994 on CPUs whose numpy power rounds μ^9 down (99), 100 on others
    assert exp_counts(5000, 10, 50.0)[-1] == 100


def test_counts_never_go_through_a_float(monkeypatch):
    """n_max beyond float range would overflow any float conversion; platform power functions are never called."""
    def refuse(*args, **kwargs):
        raise AssertionError("a float power function was called")

    monkeypatch.setattr(np, "power", refuse)
    monkeypatch.setattr(np, "float_power", refuse)
    huge = 10 ** 400
    assert exp_counts(huge, 3, 4.0) == [huge, huge // 2, huge // 4]
    assert exp_counts(huge, 5, 16.0) == [huge, huge // 2, huge // 4, huge // 8, huge // 16]
    assert step_counts(huge, 4, 3.0) == [huge, huge, huge // 3, huge // 3]
    assert exp_counts(5000, 10, 50.0) == CIFAR10[50]


def test_imbalance_is_the_decimal_the_config_wrote():
    """ρ = 1.1 is 11/10: 11 / 1.1 = 10 exactly. The binary float nearest 1.1 is a bit larger and would give 9."""
    assert imbalance_ratio(1.1) == Fraction(11, 10) and imbalance_ratio(100) == 100 and imbalance_ratio(33.3) == Fraction(333, 10)
    assert exp_counts(11, 2, 1.1) == [11, 10] and step_counts(11, 2, 1.1) == [11, 10]
    assert 11 // Fraction(1.1) == 9
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        imbalance_ratio(0.5)


def test_an_imbalance_above_n_max_is_refused_before_a_class_is_emptied():
    labels = torch.arange(30) % 3
    indices, counts = construct(labels, 10, 3, "exp", 10.0, "rsg", 0)
    assert counts == [10, 3, 1] and len(indices) == 14
    with pytest.raises(ConfigError, match=r"data.imbalance.*at most 10, the images per class"):
        construct(labels, 10, 3, "step", 10.5, "ldam", 0)
