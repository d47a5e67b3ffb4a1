"""benchmarks.export_npz: the file a GPU machine trains on holds exactly the run's long-tailed training split."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.export_npz import export
from ltsearch.config import load_run_config
from ltsearch.data import build_dataset

DIGITS = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")


def test_the_exported_split_reads_back_as_the_same_images_labels_and_normalisation(tmp_path):
    path = tmp_path / "digits_lt.npz"
    sizes = export(DIGITS, ["data.imbalance=10"], eval_per_class=7, out=path)
    original = build_dataset(load_run_config(DIGITS, ["data.imbalance=10"]).data)
    copy = build_dataset(load_run_config(DIGITS, ["data.name=npz", f"data.path={path}", "data.imbalance=1"]).data)

    assert sizes == {"train": len(original.train), "val": 70, "test": 70}
    assert torch.equal(copy.train.images, original.train.images) and torch.equal(copy.train.labels, original.train.labels)
    assert copy.class_counts.tolist() == original.class_counts.tolist()  # the long tail itself, not re-made
    assert (copy.mean, copy.std) == (original.mean, original.std)
    assert copy.augment == original.augment  # digits: padded crop, never flipped
    assert copy.class_names == original.class_names
    assert torch.equal(copy.val.images, original.val.images[_first_per_class(original.val.labels, 7)])


def _first_per_class(labels: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        keep[torch.nonzero(labels == label).squeeze(1)[:count]] = True
    return keep
