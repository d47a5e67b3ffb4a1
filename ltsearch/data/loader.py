"""Training and evaluation batches, always as (x float32 in [0, 1] on `device`, y int64 on `device`).

Two ways to get there, chosen by `data.placement`:

* resident (in-memory sources; `auto` picks it): the uint8 training set is copied once to the device
  (or kept on the host with `placement: loader`, or with `auto` when it would take more than half the
  free GPU memory); a batch is one index, one crop-gather, one flip and one conversion, all on the
  device (airbench's loader). No DataLoader, no workers.
* files (image lists): a torch DataLoader with `workers` processes decodes and transforms the files.

Every random number of an epoch (sampler indices, crop offsets, flips, per-image seeds) is drawn from
one CPU `torch.Generator`, seeded from the run seed, when `epoch()` is called. Its state is the whole
loader state, so a loader restored from `state_dict()` between epochs repeats the next epoch exactly,
and two loaders with one seed yield the same batches on CPU and on CUDA.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from ltsearch.config import DataConfig
from ltsearch.data._files import ImageFiles, file_transform
from ltsearch.data.augment import horizontal_flip, random_crop, to_unit_range
from ltsearch.data.dataset import LongTailData
from ltsearch.data.splits import Split
from ltsearch.errors import ConfigError
from ltsearch.registry import SAMPLERS

Batch = tuple[torch.Tensor, torch.Tensor]
_SEED_BOUND = 2**62


class TrainLoader(ABC):
    """Epochs of augmented training batches; `len()` is the number of steps per epoch, ceil(N / batch_size)."""

    def __init__(self, data: LongTailData, *, batch_size: int, device: torch.device, seed: int,
                 head_mask: torch.Tensor | None, augment: bool):
        self.data = data
        self.batch_size = batch_size
        self.device = device
        self.head_mask = head_mask
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.data.train) / self.batch_size)

    def epoch(self, sampler_name: str) -> Iterator[Batch]:
        """One epoch drawn with the registered sampler `sampler_name`, cut into consecutive batches.

        All of the epoch's random numbers are drawn here, before the first batch is built.
        """
        return self._batches(self._sample(sampler_name))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _sample(self, sampler_name: str) -> torch.Tensor:
        train = self.data.train
        sampler = SAMPLERS.get(sampler_name).obj
        indices = sampler(train.labels, self.data.class_counts, num_samples=len(train), batch_size=self.batch_size,
                          generator=self.generator, head_mask=self.head_mask)
        if indices.dtype != torch.int64 or indices.shape != (len(train),):
            raise ValueError(f"sampler '{sampler_name}' returned {indices.dtype} {tuple(indices.shape)}; "
                             f"expected int64 ({len(train)},)")
        return indices

    @abstractmethod
    def _batches(self, indices: torch.Tensor) -> Iterator[Batch]:
        """Draw the epoch's augmentation randomness now; return the batches for `indices`."""


class ResidentLoader(TrainLoader):
    """In-memory images kept on `storage` (the device, or the host); augmentation batched on the device."""

    def __init__(self, data: LongTailData, *, storage: torch.device, **kwargs: Any):
        super().__init__(data, **kwargs)
        self.images = data.train.images.to(storage)
        self.labels = data.train.labels.to(storage)
        if storage.type == "cpu" and self.device.type == "cuda":
            self.images = self.images.pin_memory()
        self.padding = data.augment.crop_padding if self.augment else 0
        self.flip = data.augment.horizontal_flip and self.augment

    def _batches(self, indices: torch.Tensor) -> Iterator[Batch]:
        count = len(indices)
        offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=self.generator) if self.padding else None
        flips = torch.rand(count, generator=self.generator) < 0.5 if self.flip else None
        return self._iterate(indices, offsets, flips)

    def _iterate(self, indices: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None) -> Iterator[Batch]:
        indices = indices.to(self.images.device)
        offsets = offsets.to(self.device) if offsets is not None else None
        flips = flips.to(self.device) if flips is not None else None
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start:start + self.batch_size]
            images = self.images[batch].to(self.device, non_blocking=True)
            if offsets is not None:
                images = random_crop(images, offsets[start:start + self.batch_size], self.padding)
            if flips is not None:
                images = horizontal_flip(images, flips[start:start + self.batch_size])
            yield to_unit_range(images, self.data.image_size), self.labels[batch].to(self.device, non_blocking=True)


class FileLoader(TrainLoader):
    """Images on disk, decoded by DataLoader workers; one seed per image keeps the crops reproducible."""

    def __init__(self, data: LongTailData, *, workers: int, **kwargs: Any):
        super().__init__(data, **kwargs)
        self.workers = workers
        spec = data.augment
        self.transform = file_transform(data.image_size, random_resized_crop=self.augment and spec.random_resized_crop,
                                        horizontal_flip=self.augment and spec.horizontal_flip)

    def _batches(self, indices: torch.Tensor) -> Iterator[Batch]:
        seeds = torch.randint(0, _SEED_BOUND, (len(indices),), generator=self.generator) if self.augment else None
        train = self.data.train
        files = ImageFiles(train.images, train.labels, indices, self.transform, seeds)
        return _file_batches(files, self.batch_size, self.workers, self.device)


def create_train_loader(data: LongTailData, cfg: DataConfig, *, batch_size: int, device: torch.device | str,
                        seed: int, head_mask: torch.Tensor | None = None) -> TrainLoader:
    """The loader `cfg.placement` asks for; `head_mask` (bool per class) is needed by the `head_tail` sampler."""
    device = torch.device(device)
    common = dict(batch_size=batch_size, device=device, seed=seed, head_mask=head_mask, augment=cfg.augment == "standard")
    if not data.in_memory:
        if cfg.placement == "device":
            raise ConfigError("data.placement", cfg.placement, "'auto' or 'loader' for this source",
                              hint=f"'{data.name}' keeps its images on disk; they are decoded by DataLoader workers.")
        return FileLoader(data, workers=cfg.workers, **common)
    return ResidentLoader(data, storage=_storage_device(data.train, cfg.placement, device), **common)


def eval_batches(data: LongTailData, split: str | Split, *, batch_size: int, device: torch.device | str) -> Iterator[Batch]:
    """Un-augmented batches of `split` ('train', 'val', 'test' or a Split) in index order."""
    split = data.split(split) if isinstance(split, str) else split
    device = torch.device(device)
    if split.in_memory:
        for start in range(0, len(split), batch_size):
            images = split.images[start:start + batch_size].to(device, non_blocking=True)
            yield to_unit_range(images, data.image_size), split.labels[start:start + batch_size].to(device)
        return
    transform = file_transform(data.image_size, random_resized_crop=False, horizontal_flip=False)
    files = ImageFiles(split.images, split.labels, torch.arange(len(split)), transform)
    yield from _file_batches(files, batch_size, data.config.workers, device)


def _storage_device(train: Split, placement: str, device: torch.device) -> torch.device:
    """`device` for placement device; the host for `loader`; `auto`: the device unless it would fill half its free memory."""
    if placement == "loader":
        return torch.device("cpu")
    if placement == "auto" and device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if train.images.numel() > free_bytes // 2:
            return torch.device("cpu")
    return device


def _file_batches(files: ImageFiles, batch_size: int, workers: int, device: torch.device) -> Iterator[Batch]:
    # The DataLoader gets its own generator so that starting workers never draws from torch's global RNG.
    loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
