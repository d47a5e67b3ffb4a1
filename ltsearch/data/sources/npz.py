"""`npz`: arrays in one NumPy file (`data.path`), for any small in-memory image set.

Required: x_train, y_train, x_test, y_test, with x uint8 (N, H, W, C), (N, C, H, W) or (N, H, W) and
integer labels 0..C-1. Optional: x_val / y_val (an official val split), class_names, and the per-source
properties mean, std (per channel, in [0, 1] units), crop_padding and horizontal_flip. Without them,
mean and std are measured on x_train, the crop pads H // 8 pixels (4 for 32 px, as on CIFAR) and
images are flipped. The long-tail construction applies to the training arrays unless imbalance is 1.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ltsearch.config import DataConfig
from ltsearch.data.dataset import AugmentSpec, SourceData
from ltsearch.data.splits import Split
from ltsearch.errors import ConfigError, DataError
from ltsearch.registry import DATASETS

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


@DATASETS.register("npz")
def npz(cfg: DataConfig) -> SourceData:
    if cfg.path is None:
        raise ConfigError("data.path", None, "the path of an .npz file with x_train, y_train, x_test, y_test")
    path = Path(cfg.path)
    arrays = _read(path)
    names = ["train", "test"] + (["val"] if "x_val" in arrays else [])
    images = {name: _images(arrays, name, path) for name in names}
    labels = {name: _labels(arrays, name, path, len(images[name])) for name in names}
    num_classes = len(arrays["class_names"]) if "class_names" in arrays else 1 + max(int(y.max()) for y in labels.values() if len(y))
    _check_labels(labels, num_classes, path)
    shapes = {tuple(x.shape[1:]) for x in images.values()}
    if len(shapes) != 1:
        raise DataError(f"'{path}': image shapes differ between splits: {sorted(shapes)}")
    in_chans, height, width = shapes.pop()
    offsets = np.cumsum([0] + [len(images[name]) for name in names])
    splits = {name: Split(images[name], labels[name], int(offsets[i]) + torch.arange(len(images[name])))
              for i, name in enumerate(names)}
    mean, std = _statistics(arrays, images["train"], path)
    return SourceData(
        train=splits["train"], test=splits["test"], val=splits.get("val"),
        class_names=[str(name) for name in arrays["class_names"]] if "class_names" in arrays else [str(c) for c in range(num_classes)],
        in_chans=in_chans, image_size=height, mean=mean, std=std,
        augment=AugmentSpec(crop_padding=int(arrays.get("crop_padding", height // 8)),
                            horizontal_flip=bool(arrays.get("horizontal_flip", True))),
        files=[str(path)],
    )


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file '{path}' not found (data.path)" if not path.exists() else f"data.path '{path}' is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:  # object arrays (pickles) are refused by numpy itself
            if not hasattr(archive, "files"):
                raise DataError(f"'{path}' is a single .npy array, not an .npz archive of named arrays")
            arrays = {key: archive[key] for key in archive.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise DataError(f"cannot read npz file '{path}': truncated, corrupt or not an npz archive ({type(error).__name__}: {detail})") from None
    missing = [key for key in REQUIRED if key not in arrays]
    if missing or ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"npz file '{path}' lacks {missing or ['x_val/y_val (give both or neither)']}; "
                        f"it holds {sorted(arrays)} and needs {list(REQUIRED)} (+ optional x_val, y_val, class_names)")
    return arrays


def _images(arrays: dict[str, np.ndarray], split: str, path: Path) -> torch.Tensor:
    """uint8 images in any of the accepted layouts -> (N, C, H, W); channels are 1 or 3."""
    x = arrays[f"x_{split}"]
    if x.dtype != np.uint8:
        raise DataError(f"'{path}': x_{split} has dtype {x.dtype}; expected uint8 pixels 0..255")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise DataError(f"'{path}': x_{split} has shape {arrays[f'x_{split}'].shape}; expected square images "
                        "(N, H, W, C), (N, C, H, W) or (N, H, W) with C in (1, 3)")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(arrays: dict[str, np.ndarray], split: str, path: Path, count: int) -> torch.Tensor:
    y = arrays[f"y_{split}"]
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(f"'{path}': y_{split} must be {count} integer labels (one per image), got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _check_labels(labels: dict[str, torch.Tensor], num_classes: int, path: Path) -> None:
    for split, y in labels.items():
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"'{path}': y_{split} has labels outside 0..{num_classes - 1}")


def _statistics(arrays: dict[str, np.ndarray], train_images: torch.Tensor, path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units: given in the file, else measured on the training images."""
    channels = train_images.shape[1]
    if "mean" in arrays and "std" in arrays:
        mean, std = tuple(float(v) for v in arrays["mean"]), tuple(float(v) for v in arrays["std"])
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"'{path}': mean and std need {channels} values (one per channel)")
        return mean, std
    pixels = train_images.double().div(255.0).transpose(0, 1).reshape(channels, -1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp(min=1e-3).tolist())
