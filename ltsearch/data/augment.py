"""Batched, on-device augmentation for in-memory images (the airbench recipe, generalised).

The standard CIFAR recipe (LDAM-DRW, RSG, M2m) is RandomCrop(32, padding=4) + RandomHorizontalFlip on
each image. Here the random numbers for a whole epoch are drawn once from the loader's CPU generator
(so CPU and CUDA runs see the same crops), and each batch is cropped by one gather on the padded batch
and flipped by one `torch.where`: no per-sample Python.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each (C, H, W) image at `offsets[b] = (top, left)` of its copy zero-padded by `padding` per side.

    Offsets lie in [0, 2·padding]; offset (padding, padding) returns the image unchanged.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)
    index = torch.arange(batch, device=images.device)
    crops = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2)


def horizontal_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where `flip` (bool per image) is True."""
    return torch.where(flip[:, None, None, None], images.flip(3), images)


@functools.cache
def _unit_values(device: torch.device) -> torch.Tensor:
    """k / 255 for k = 0..255, divided on the CPU, held on `device`."""
    return torch.arange(256, dtype=torch.float32).div_(255.0).to(device)


def to_unit_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], resized (bilinear, antialiased) when `size` differs from the stored size.

    The values come from one table divided on the CPU, so a batch is bit-identical on every device: CUDA
    divides by a scalar as a multiply by its reciprocal, which rounds 16/255 and others one ulp away
    (seen on an H200: tests/test_data_loader.py::test_cuda_batches_equal_cpu_batches). Resizing is
    device arithmetic and agrees only to rounding.
    """
    images = _unit_values(images.device)[images.int()]  # keeps the layout: a cropped batch stays channels-last
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = images.clamp_(0.0, 1.0)
    return images
