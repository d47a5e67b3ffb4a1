"""Training samplers: the indices one epoch visits, drawn on the CPU from the loader's one generator.

Every sampler has the signature of the `SAMPLERS` registry,

    fn(labels, class_counts, *, num_samples, batch_size, generator, head_mask) -> LongTensor[num_samples]

and is fully vectorised (no per-sample Python), so a resampling schedule costs nothing per step.
`instance` is a permutation; the class-level samplers draw a class c with probability p_c, then an
image of c uniformly, with replacement:

    instance        every image once per pass                            (p_c ∝ n_c in effect)
    class_balanced  Kang et al. 2020 ("Decoupling"), M2m's oversampler   p_c ∝ 1
    square_root     Mahajan et al. 2018; Kang et al. 2020                p_c ∝ sqrt(n_c)
    reversed        BBN's reversed sampler (Zhou et al. 2020)            p_c ∝ 1 / n_c
    head_tail       per batch: first half from tail classes (class-balanced), second half from head
                    images (instance), the pairing that RSG-style methods transfer head variation over
"""

from __future__ import annotations

import torch

from ltsearch.registry import SAMPLERS


def cycled_permutation(size: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """`num_samples` positions in [0, size): whole random permutations back to back, the last one cut."""
    passes = -(-num_samples // size)
    if passes == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.randperm(size, generator=generator) for _ in range(passes)])[:num_samples]


def draw_by_class(labels: torch.Tensor, class_weights: torch.Tensor, num_samples: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Class c with probability ∝ class_weights[c] (classes without images get 0), then a uniform instance of c."""
    if num_samples == 0:  # e.g. the tail half of a batch of one
        return torch.empty(0, dtype=torch.int64)
    members = torch.bincount(labels, minlength=class_weights.numel())
    weights = class_weights.double() * (members > 0)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(members, 0) - members
    classes = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    offsets = (torch.rand(num_samples, generator=generator, dtype=torch.float64) * members[classes]).long()
    return order[starts[classes] + offsets]


@SAMPLERS.register("instance")
def instance(labels: torch.Tensor, class_counts: torch.Tensor, *, num_samples: int, batch_size: int,
             generator: torch.Generator, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Plain ERM sampling: a random permutation of the training set (repeated if num_samples > N)."""
    return cycled_permutation(len(labels), num_samples, generator)


@SAMPLERS.register("class_balanced")
def class_balanced(labels: torch.Tensor, class_counts: torch.Tensor, *, num_samples: int, batch_size: int,
                   generator: torch.Generator, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Every class equally likely, p_c = 1/C: the tail is oversampled, the head undersampled."""
    return draw_by_class(labels, torch.ones_like(class_counts, dtype=torch.float64), num_samples, generator)


@SAMPLERS.register("square_root")
def square_root(labels: torch.Tensor, class_counts: torch.Tensor, *, num_samples: int, batch_size: int,
                generator: torch.Generator, head_mask: torch.Tensor | None) -> torch.Tensor:
    """p_c ∝ sqrt(n_c): halfway (in log space) between instance and class-balanced sampling."""
    return draw_by_class(labels, class_counts.double().sqrt(), num_samples, generator)


@SAMPLERS.register("reversed")
def reversed_sampler(labels: torch.Tensor, class_counts: torch.Tensor, *, num_samples: int, batch_size: int,
                     generator: torch.Generator, head_mask: torch.Tensor | None) -> torch.Tensor:
    """BBN's reversed sampler: p_c ∝ 1/n_c, so rarer classes are drawn more often than frequent ones."""
    counts = class_counts.double()
    return draw_by_class(labels, torch.where(counts > 0, 1.0 / counts.clamp(min=1), 0.0), num_samples, generator)


@SAMPLERS.register("head_tail", reads_head_mask=True)
def head_tail(labels: torch.Tensor, class_counts: torch.Tensor, *, num_samples: int, batch_size: int,
              generator: torch.Generator, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Each consecutive chunk of `batch_size` (the loader's batches): its first len//2 positions come from
    tail classes, class-balanced among them, the rest from head-class images, instance-sampled.

    `head_mask[c]` (True = head) is the caller's split, e.g. `head_class_mask(counts, γ)`.
    """
    if head_mask is None:
        raise ValueError("the 'head_tail' sampler needs head_mask (True for head classes)")
    head_mask = head_mask.to(torch.bool).cpu()
    positions = torch.arange(num_samples)
    within = positions % batch_size
    chunk_length = (num_samples - (positions - within)).clamp(max=batch_size)
    from_tail = within < chunk_length // 2
    head_images = torch.nonzero(head_mask[labels]).squeeze(1)
    tail_classes = (~head_mask).double() * (class_counts > 0)
    if len(head_images) == 0 or not bool(tail_classes.any()):
        raise ValueError("the 'head_tail' sampler needs training images in at least one head and one tail class")
    picks = torch.empty(num_samples, dtype=torch.int64)
    picks[from_tail] = draw_by_class(labels, tail_classes, int(from_tail.sum()), generator)
    picks[~from_tail] = head_images[cycled_permutation(len(head_images), int((~from_tail).sum()), generator)]
    return picks
