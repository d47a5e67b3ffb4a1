"""`cifar10` / `cifar100`: the python-pickle files torchvision's CIFAR classes read, from `data.root`.

Files are read directly, with or without the `filenames` key and without checksums, so rebuilt copies
work as well as the originals, through a restricted unpickler (`SafeUnpickler`): it builds the builtin
containers, bytes, strings and numbers, and numpy arrays through the reconstruction functions the format
uses, and refuses any other global, so a crafted file cannot run code. `download: true` fetches the
official archive with torchvision's downloader only when files are missing (torchvision is imported only
then: registering and reading this source do not import it). Pixels stay uint8
(N, 3, 32, 32); train ids are 0..49999, test ids 50000..59999.
Normalisation: LDAM-DRW's CIFAR-10 statistics, and the usual CIFAR-100 training-set statistics.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    archive: str  # the torchvision.datasets class whose url, filename and tgz_md5 name the official archive

    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10_LAYOUT = CifarLayout(
    title="CIFAR-10", folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",), meta_file="batches.meta",
    label_key="labels", names_key="label_names",
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), archive="CIFAR10")
CIFAR100_LAYOUT = CifarLayout(
    title="CIFAR-100", folder="cifar-100-python", train_files=("train",), test_files=("test",), meta_file="meta",
    label_key="fine_labels", names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), archive="CIFAR100")


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
    meta = _read_pickle(folder / layout.meta_file)
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"CIFAR file '{folder / layout.meta_file}' lacks the list '{layout.names_key}' of class names (found {sorted(map(str, meta))})")
    class_names = [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]
    for split, split_labels in (("train", train_labels), ("test", test_labels)):
        if len(split_labels) and (int(split_labels.min()) < 0 or int(split_labels.max()) >= len(class_names)):
            raise DataError(f"{layout.title} {split} labels in '{folder}' fall outside 0..{len(class_names) - 1} "
                            f"(the {len(class_names)} classes of {layout.meta_file})")
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
    import torchvision.datasets

    archive = getattr(torchvision.datasets, layout.archive)
    try:
        download_and_extract_archive(archive.url, str(root), filename=archive.filename, md5=archive.tgz_md5)
    except (OSError, RuntimeError) as error:
        raise DataError(f"could not download {layout.title} into '{root}' ({type(error).__name__}: {error}); the "
                        f"machine may be offline. Copy {expected} into '{folder}' and set data.download: false.") from None
    if _missing(layout, folder):
        raise DataError(f"downloaded {layout.title} into '{root}', but '{folder}' still lacks {', '.join(_missing(layout, folder))}")


def download_and_extract_archive(url: str, download_root: str, *, filename: str, md5: str) -> None:
    """torchvision's downloader, imported on first use."""
    from torchvision.datasets.utils import download_and_extract_archive as download

    download(url, download_root, filename=filename, md5=md5)


#: the only globals a CIFAR pickle may name: numpy's array reconstruction (numpy 1.x and 2.x module names,
#: pickle protocols 2 to 5); everything else (os.system, builtins.eval, any class) is refused unbuilt
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol 2, limited to that one use."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not part of the CIFAR format")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for data files: builtin containers, bytes/str/int/float/bool/None, and numpy arrays only."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a data file")


def safe_unpickle(handle, *, encoding: str = "latin1"):
    """Unpickle `handle` with `SafeUnpickler`, then refuse object arrays (they could carry anything)."""
    value = SafeUnpickler(handle, encoding=encoding).load()
    _refuse_object_arrays(value)
    return value


def _refuse_object_arrays(value, depth: int = 0) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects is not part of the CIFAR format")
    if depth < 4 and isinstance(value, dict):
        for item in value.values():
            _refuse_object_arrays(item, depth + 1)
    elif depth < 4 and isinstance(value, (list, tuple)) and value and isinstance(value[0], (np.ndarray, dict, list, tuple)):
        for item in value:
            _refuse_object_arrays(item, depth + 1)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            value = safe_unpickle(handle)
    except pickle.UnpicklingError as error:
        if "not allowed" in str(error) or "not part of" in str(error):
            raise DataError(f"refusing CIFAR file '{path}': {error}; it was not written as a CIFAR batch (or was altered) "
                            "and nothing in it was run") from None
        raise DataError(f"cannot read CIFAR file '{path}': truncated or corrupt ({error})") from None
    except OSError as error:
        raise DataError(f"cannot read CIFAR file '{path}': {error.strerror or error}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read CIFAR file '{path}': truncated or corrupt ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(value, dict):
        raise DataError(f"CIFAR file '{path}' holds a {type(value).__name__}, expected a dict of arrays")
    return value


def _read_batches(folder: Path, names: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the `data` (N x 3072, channel-major) and label arrays of `names` into (N, 3, 32, 32) uint8."""
    images, labels = [], []
    for name in names:
        batch = _read_pickle(folder / name)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"CIFAR file '{folder / name}' lacks the keys 'data' and '{label_key}' (found {sorted(batch)})")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as error:
            raise DataError(f"CIFAR file '{folder / name}': 'data' or '{label_key}' is not numeric ({error})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR file '{folder / name}': 'data' has shape {data.shape}, expected (N, 3072)")
        if batch_labels.shape != (data.shape[0],):
            raise DataError(f"CIFAR file '{folder / name}': {batch_labels.size} labels for {data.shape[0]} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
