"""`imagelist`: images on disk named by `relative/path label` lists, as ImageNet-LT, Places-LT and
iNaturalist 2018 ship them (`data.train_list`, `data.val_list`, `data.test_list`, relative to `data.root`).

The training list already is the long tail, so no construction is applied. Without a val list, val is
the first ceil(val_fraction · n_c) images of each class of the test list. Images stay on disk and are
decoded by DataLoader workers (torchvision.io), normalised with the ImageNet statistics.
An image's id is its path's first position over the lists (train, val, test), so a file listed twice
keeps one id; lists that share a file are refused (train, val and test must be disjoint).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

from ltsearch.config import DataConfig
from ltsearch.data.dataset import AugmentSpec, SourceData
from ltsearch.data.splits import Split
from ltsearch.errors import ConfigError, DataError
from ltsearch.registry import DATASETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


@DATASETS.register("imagelist")
def imagelist(cfg: DataConfig) -> SourceData:
    for key in ("train_list", "test_list"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"data.{key}", None, "a list file of 'relative/path label' lines (relative to data.root)")
    root = Path(cfg.root)
    list_files = {key: root / name for key in ("train_list", "val_list", "test_list") if (name := getattr(cfg, key))}
    splits = {key: read_list(root, path) for key, path in list_files.items()}
    _assign_ids(list(splits.values()))
    for first, second in itertools.combinations(splits, 2):
        _refuse_overlap(splits[first], splits[second], list_files[first], list_files[second])
    train, val, test = splits["train_list"], splits.get("val_list"), splits["test_list"]
    num_classes = 1 + max(int(split.labels.max()) for split in splits.values())
    return SourceData(
        train=train, val=val, test=test, class_names=[str(label) for label in range(num_classes)],
        in_chans=3, image_size=cfg.image_size or DEFAULT_IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        augment=AugmentSpec(horizontal_flip=True, random_resized_crop=True),
        files=[str(path) for path in list_files.values()], long_tail_given=True,
    )


def read_list(root: Path, list_file: Path) -> Split:
    """Parse `relative/path label` lines (blank lines skipped; the path may contain spaces)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"cannot read image list '{list_file}': {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"cannot read image list '{list_file}': not UTF-8 text (byte {error.start})") from None
    paths, labels = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{list_file}:{number}: expected 'relative/path label' with a label integer >= 0, got {line!r}")
        relative = parts[0].strip()
        if os.path.isabs(relative) or os.path.normpath(relative).split(os.sep)[0] == os.pardir:
            raise DataError(f"{list_file}:{number}: '{relative}' is not a path inside data.root ('{root}'); "
                            "list entries are relative paths below it")
        paths.append(str(root / relative))
        labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"image list '{list_file}' has no entries")
    return Split(paths, torch.tensor(labels, dtype=torch.int64))


def _assign_ids(splits: list[Split]) -> None:
    """id = first position of the image's path over all lists, so the same file has the same id everywhere."""
    first_seen: dict[str, int] = {}
    for split in splits:
        split.ids = torch.tensor([first_seen.setdefault(path, len(first_seen)) for path in split.images], dtype=torch.int64)


def _refuse_overlap(first: Split, second: Split, first_file: Path, second_file: Path) -> None:
    shared = set(first.ids.tolist()) & set(second.ids.tolist())
    if shared:
        example = second.images[second.ids.tolist().index(min(shared))]
        raise DataError(f"{len(shared)} image(s) are listed in both '{first_file}' and '{second_file}' (e.g. '{example}'); "
                        "train, val and test must not share images")
