"""`cifar10` / `cifar100`: the python-pickle files torchvision's CIFAR classes read, from `data.root`.

Files are read directly (`pickle.load(f, encoding="latin1")`), with or without the `filenames` key and
without checksums, so rebuilt copies work as well as the originals. `download: true` fetches the
official archive with torchvision's downloader only when files are missing. Pixels stay uint8
(N, 3, 32, 32); train ids are 0..49999, test ids 50000..59999.
Normalisation: LDAM-DRW's CIFAR-10 statistics, and the usual CIFAR-100 training-set statistics.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from ltsearch.config import DataConfig
from ltsearch.data.dataset import AugmentSpec, SourceData
from ltsearch.data.splits import Split
from ltsearch.errors import DataError
from ltsearch.registry import DATASETS


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its arrays, labels and class names, and where to download it."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    archive: type

    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10_LAYOUT = CifarLayout(
    title="CIFAR-10", folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",), meta_file="batches.meta",
    label_key="labels", names_key="label_names",
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), archive=CIFAR10)
CIFAR100_LAYOUT = CifarLayout(
    title="CIFAR-100", folder="cifar-100-python", train_files=("train",), test_files=("test",), meta_file="meta",
    label_key="fine_labels", names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), archive=CIFAR100)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> SourceData:
    return load_cifar(CIFAR10_LAYOUT, cfg)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> SourceData:
    return load_cifar(CIFAR100_LAYOUT, cfg)


def load_cifar(layout: CifarLayout, cfg: DataConfig) -> SourceData:
    folder = Path(cfg.root) / layout.folder
    if _missing(layout, folder):
        _fetch_or_explain(layout, Path(cfg.root), folder, cfg.download)
    train_images, train_labels = _read_batches(folder, layout.train_files, layout.label_key)
    test_images, test_labels = _read_batches(folder, layout.test_files, layout.label_key)
    class_names = [str(name) for name in _read_pickle(folder / layout.meta_file)[layout.names_key]]
    train_ids = torch.arange(len(train_labels))
    return SourceData(
        train=Split(train_images, train_labels, train_ids),
        test=Split(test_images, test_labels, len(train_labels) + torch.arange(len(test_labels))),
        class_names=class_names, in_chans=3, image_size=32, mean=layout.mean, std=layout.std,
        augment=AugmentSpec(crop_padding=4, horizontal_flip=True),
        files=[str(folder / name) for name in layout.files()],
    )


def _missing(layout: CifarLayout, folder: Path) -> list[str]:
    return [name for name in layout.files() if not (folder / name).is_file()]


def _fetch_or_explain(layout: CifarLayout, root: Path, folder: Path, download: bool) -> None:
    """Download the official archive (torchvision's downloader), or say where the files must go."""
    expected = ", ".join(layout.files())
    if not download:
        raise DataError(f"{layout.title} files not found in '{folder}' (missing: {', '.join(_missing(layout, folder))}). "
                        f"Expected the python-pickle layout: {expected}. Put them there (or set data.root to the "
                        f"directory that contains '{layout.folder}'), or set data.download: true to fetch them.")
    archive = layout.archive
    try:
        download_and_extract_archive(archive.url, str(root), filename=archive.filename, md5=archive.tgz_md5)
    except (OSError, RuntimeError) as error:
        raise DataError(f"could not download {layout.title} into '{root}' ({type(error).__name__}: {error}); the "
                        f"machine may be offline. Copy {expected} into '{folder}' and set data.download: false.") from None
    if _missing(layout, folder):
        raise DataError(f"downloaded {layout.title} into '{root}', but '{folder}' still lacks {', '.join(_missing(layout, folder))}")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise DataError(f"cannot read CIFAR file '{path}': {error}") from None


def _read_batches(folder: Path, names: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the `data` (N x 3072, channel-major) and label arrays of `names` into (N, 3, 32, 32) uint8."""
    images, labels = [], []
    for name in names:
        batch = _read_pickle(folder / name)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"CIFAR file '{folder / name}' lacks the keys 'data' and '{label_key}' (found {sorted(batch)})")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR file '{folder / name}': 'data' has shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
