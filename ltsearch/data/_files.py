"""Images that stay on disk (ImageNet-LT, Places-LT, iNaturalist lists): decoding and torchvision transforms.

Train: RandomResizedCrop(size) + horizontal flip; eval: Resize(size·256/224) + CenterCrop(size), the
standard ImageNet protocol. Each training image gets its own seed, drawn with the epoch's indices from
the loader's generator, so the crops depend neither on the number of workers nor on which worker
decodes which file, and a resumed run repeats them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from ltsearch.errors import DataError

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torchvision (~1 s of imports, torch._dynamo among them) is imported by the functions that decode and
# transform, not here: the data layer imports this module, and a process handed a built in-memory dataset
# (a Ray trial worker unpickling it) never decodes a file.


def read_image(path: str) -> torch.Tensor:
    """Decode a file to uint8 (3, H, W) RGB (grey and RGBA files are converted)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise DataError(f"cannot decode image '{path}': {error}") from None


def file_transform(image_size: int, *, random_resized_crop: bool, horizontal_flip: bool) -> v2.Transform:
    """uint8 image -> float32 (3, size, size) in [0, 1]; random only when a random flag is set."""
    from torchvision.transforms import v2

    if random_resized_crop:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True)]
    else:
        geometry = [v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    flip = [v2.RandomHorizontalFlip()] if horizontal_flip else []
    return v2.Compose([*geometry, *flip, v2.ToDtype(torch.float32, scale=True)])


class ImageFiles(Dataset):
    """Position p of a plan -> (transformed image `indices[p]`, its label), seeded by `seeds[p]` if given."""

    def __init__(self, paths: list[str], labels: torch.Tensor, indices: torch.Tensor, transform: v2.Transform,
                 seeds: torch.Tensor | None = None):
        self.paths = paths
        self.labels = labels
        self.indices = indices
        self.transform = transform
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.indices[position])
        image = read_image(self.paths[index])
        if self.seeds is None:
            return self.transform(image), self.labels[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seeds[position]))
            return self.transform(image), self.labels[index]
