"""`digits`: scikit-learn's bundled 8x8 handwritten digits, the embedded default (no download, seconds on CPU).

1,797 grey images (values 0..16, ~180 per class) are rescaled to uint8 0..255. The set has no official
test split, so a fixed 50 images per class (drawn once with a constant seed, independent of the
long-tail seed) are held out as the balanced test set; the other ~130 per class are the training pool
the long tail is cut from (ρ = 10 gives 124 -> 12 images per class). Augmentation is a 1-pixel padded
crop and no flip: a mirrored 2, 3 or 7 is not the same digit.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ltsearch.config import DataConfig
from ltsearch.data.dataset import AugmentSpec, SourceData
from ltsearch.data.splits import Split
from ltsearch.registry import DATASETS

TEST_PER_CLASS = 50
TEST_SPLIT_SEED = 0
# Mean and std of all 1,797 images after scaling to [0, 1].
MEAN = (0.3053,)
STD = (0.3759,)


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> SourceData:
    pixels, targets = read_digits()
    images = torch.from_numpy(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(targets.astype(np.int64))
    test_mask = torch.from_numpy(_balanced_test_mask(targets))
    ids = torch.arange(len(labels))
    train_ids, test_ids = ids[~test_mask], ids[test_mask]
    return SourceData(
        train=Split(images[train_ids], labels[train_ids], train_ids),
        test=Split(images[test_ids], labels[test_ids], test_ids),
        class_names=[str(digit) for digit in range(10)],
        in_chans=1, image_size=8, mean=MEAN, std=STD,
        augment=AugmentSpec(crop_padding=1, horizontal_flip=False),
        files=[f"sklearn.datasets.load_digits (scikit-learn bundled; {TEST_PER_CLASS}/class test, seed {TEST_SPLIT_SEED})"],
    )


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 0..16, targets (1797,) int): what `sklearn.datasets.load_digits()` returns.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, 64 pixels and the label
    per row), parsed as load_digits parses it, without importing scikit-learn: its import pulls in scipy
    (0.7-1.8 s on 2 cores) for one gzip'd CSV. Falls back to load_digits itself when the file is not there
    or does not hold 65 columns.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as handle:
                data = np.loadtxt(handle, delimiter=",")
            if data.ndim == 2 and data.shape[1] == 65:
                return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _balanced_test_mask(targets: np.ndarray) -> np.ndarray:
    """TEST_PER_CLASS images of every class, drawn once with TEST_SPLIT_SEED."""
    rng = np.random.RandomState(TEST_SPLIT_SEED)
    mask = np.zeros(len(targets), dtype=bool)
    for digit in np.unique(targets):
        mask[rng.choice(np.nonzero(targets == digit)[0], TEST_PER_CLASS, replace=False)] = True
    return mask
