"""Empirical class frequencies of every sampler against p_c, and the head/tail batch structure."""

from __future__ import annotations

import pytest
import torch

from ltsearch.augmenters.base import head_class_mask
from ltsearch.registry import SAMPLERS

COUNTS = torch.tensor([400, 120, 40, 10, 0])  # class 4 has no images
LABELS = torch.repeat_interleave(torch.arange(5), COUNTS)[torch.randperm(570, generator=torch.Generator().manual_seed(3))]
DRAWS = 40_000


def draw(name: str, num_samples: int = DRAWS, batch_size: int = 8, seed: int = 0, head_mask=None) -> torch.Tensor:
    return SAMPLERS.get(name).obj(LABELS, COUNTS, num_samples=num_samples, batch_size=batch_size,
                                  generator=torch.Generator().manual_seed(seed), head_mask=head_mask)


def class_frequencies(indices: torch.Tensor) -> torch.Tensor:
    return torch.bincount(LABELS[indices], minlength=5).double() / len(indices)


def test_all_samplers_are_registered():
    assert {"instance", "class_balanced", "square_root", "reversed", "head_tail"} <= set(SAMPLERS.names())


def test_instance_sampler_is_a_permutation_per_pass():
    once = draw("instance", num_samples=570)
    assert sorted(once.tolist()) == list(range(570))
    twice = draw("instance", num_samples=2 * 570 + 5)
    visits = torch.bincount(twice, minlength=570)
    assert int(visits.min()) == 2 and int(visits.max()) == 3 and int((visits == 3).sum()) == 5


@pytest.mark.parametrize("name, weights", [
    ("class_balanced", [1.0, 1.0, 1.0, 1.0, 0.0]),
    ("square_root", [400 ** 0.5, 120 ** 0.5, 40 ** 0.5, 10 ** 0.5, 0.0]),
    ("reversed", [1 / 400, 1 / 120, 1 / 40, 1 / 10, 0.0]),
])
def test_class_frequencies_follow_the_sampler_law(name, weights):
    indices = draw(name)
    assert indices.dtype == torch.int64 and indices.shape == (DRAWS,)
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    assert torch.allclose(class_frequencies(indices), expected, atol=0.012)
    assert class_frequencies(indices)[4] == 0


def test_class_balanced_is_uniform_within_a_class():
    indices = draw("class_balanced")
    rare = indices[LABELS[indices] == 3]  # 10 images, ~10,000 draws
    per_image = torch.bincount(rare, minlength=570)[LABELS == 3].double() / len(rare)
    assert torch.allclose(per_image, torch.full((10,), 0.1, dtype=torch.float64), atol=0.015)


def test_samplers_are_pure_functions_of_the_generator():
    for name in ("instance", "class_balanced", "square_root", "reversed"):
        assert torch.equal(draw(name, seed=5), draw(name, seed=5))
        assert not torch.equal(draw(name, seed=5), draw(name, seed=6))


def test_head_tail_puts_tail_first_and_head_second_in_every_batch():
    head_mask = head_class_mask(COUNTS, 0.4)  # the two most frequent classes
    assert head_mask.tolist() == [True, True, False, False, False]
    num_samples, batch_size = 8_000 + 3, 8
    labels = LABELS[draw("head_tail", num_samples=num_samples, batch_size=batch_size, head_mask=head_mask)]
    full = labels[:8_000].view(-1, batch_size)
    assert bool((~head_mask[full[:, :4]]).all()) and bool(head_mask[full[:, 4:]].all())
    assert head_mask[labels[8_000:]].tolist() == [False, True, True]  # last chunk of 3: 3 // 2 = 1 tail sample
    tail = full[:, :4].flatten()
    assert torch.allclose(torch.bincount(tail, minlength=5)[2:4].double() / len(tail),
                          torch.tensor([0.5, 0.5], dtype=torch.float64), atol=0.02)
    head = full[:, 4:].flatten()
    assert torch.allclose(torch.bincount(head, minlength=5)[:2].double() / len(head),
                          torch.tensor([400 / 520, 120 / 520], dtype=torch.float64), atol=0.02)


def test_head_tail_with_batches_of_one_draws_only_head_images():
    head_mask = torch.tensor([True, True, False, False, False])
    assert bool(head_mask[LABELS[draw("head_tail", num_samples=50, batch_size=1, head_mask=head_mask)]].all())


def test_head_tail_requires_a_head_mask():
    with pytest.raises(ValueError, match="head_mask"):
        draw("head_tail")
