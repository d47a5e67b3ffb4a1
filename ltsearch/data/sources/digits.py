"""`digits`: scikit-learn's bundled 8x8 handwritten digits, the embedded default (no download, seconds on CPU).

1,797 grey images (values 0..16, ~180 per class) are rescaled to uint8 0..255. The set has no official
test split, so a fixed 50 images per class (drawn once with a constant seed, independent of the
long-tail seed) are held out as the balanced test set; the other ~130 per class are the training pool
the long tail is cut from (ρ = 10 gives 124 -> 12 images per class). Augmentation is a 1-pixel padded
crop and no flip: a mirrored 2, 3 or 7 is not the same digit.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

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
    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    test_mask = torch.from_numpy(_balanced_test_mask(bunch.target))
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


def _balanced_test_mask(targets: np.ndarray) -> np.ndarray:
    """TEST_PER_CLASS images of every class, drawn once with TEST_SPLIT_SEED."""
    rng = np.random.RandomState(TEST_SPLIT_SEED)
    mask = np.zeros(len(targets), dtype=bool)
    for digit in np.unique(targets):
        mask[rng.choice(np.nonzero(targets == digit)[0], TEST_PER_CLASS, replace=False)] = True
    return mask
