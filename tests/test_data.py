"""Long-tail profiles and constructions, validation rules, caps and the summary, on hand-made labels and digits."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ltsearch.config import DataConfig, build_run_config
from ltsearch.data import LongTailData, Split, build_dataset
from ltsearch.data.longtail import CONSTRUCTIONS, exp_counts, first_indices, ldam_indices, step_counts
from ltsearch.data.splits import cap_per_class, ceil_fraction, rank_within_class, take_first_per_class
from ltsearch.errors import ConfigError


# ----------------------------------------------------------------------------------------- profiles
def test_exp_profile_matches_the_ldam_drw_reference_counts():
    assert exp_counts(5000, 10, 100.0) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(exp_counts(5000, 10, 100.0)) == 12406
    assert sum(exp_counts(500, 100, 100.0)) == 10847


def test_exp_profile_follows_the_closed_form():
    counts = exp_counts(500, 100, 50.0)
    assert counts[0] == 500 and counts[-1] == 10
    # n_i = ⌊500 · 50^(−i/99)⌋: the largest k with k^99 · 50^i ≤ 500^99 (test_data_longtail.py pins every list)
    assert all(k ** 99 * 50 ** i <= 500 ** 99 < (k + 1) ** 99 * 50 ** i for i, k in enumerate(counts))
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_m2m_counts_are_the_exact_counts_on_every_cpu():
    """M2m's μ^i = (1/ρ)^(i/(C-1)) is the same real number, so its construction takes the exact counts:
    13,996 at CIFAR-10 ρ=50 and 10,847 at CIFAR-100 ρ=100 (its float code gives 13,995 / 10,846 on some CPUs)."""
    for img_max, num_classes, imbalance, total in [(5000, 10, 50.0, 13_996), (500, 100, 100.0, 10_847)]:
        counts = CONSTRUCTIONS["m2m"].counts["exp"](img_max, num_classes, imbalance)
        assert counts == exp_counts(img_max, num_classes, imbalance) and sum(counts) == total
    assert set(CONSTRUCTIONS["m2m"].counts) == {"exp"} and CONSTRUCTIONS["m2m"].pick is first_indices


def test_m2m_construction_refuses_the_step_profile():
    with pytest.raises(ConfigError, match="data.construction"):
        build_run_config({"data": {"construction": "m2m", "profile": "step"}})


def test_step_profile_halves_the_classes():
    assert step_counts(5000, 10, 10.0) == [5000] * 5 + [500] * 5
    assert step_counts(500, 100, 100.0) == [500] * 50 + [5] * 50
    assert step_counts(100, 5, 4.0) == [100, 100, 25, 25, 25]


# ------------------------------------------------------------------------------------ constructions
LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 1, 2, 0, 2])  # class sizes 6, 4, 4


def test_rank_within_class_counts_in_index_order():
    assert rank_within_class(LABELS).tolist() == [0, 0, 1, 0, 1, 2, 3, 1, 2, 4, 3, 2, 5, 3]


def test_first_construction_keeps_the_first_images_of_each_class():
    assert first_indices(LABELS, [3, 2, 1], seed=123).tolist() == [0, 1, 2, 3, 4, 5]


def test_ldam_construction_takes_the_requested_counts_and_depends_only_on_the_seed():
    labels = torch.arange(600) % 3
    counts = [200, 60, 20]
    picked = ldam_indices(labels, counts, seed=0)
    assert torch.bincount(labels[picked]).tolist() == counts
    assert len(set(picked.tolist())) == sum(counts)
    assert torch.equal(picked, ldam_indices(labels, counts, seed=0))
    assert not torch.equal(picked, ldam_indices(labels, counts, seed=1))
    assert set(picked.tolist()) != set(first_indices(labels, counts, seed=0).tolist())


# ------------------------------------------------------------------------------------ split helpers
def test_take_first_per_class_splits_without_overlap():
    split = Split(torch.zeros(len(LABELS), 1, 2, 2, dtype=torch.uint8), LABELS)
    taken, rest = take_first_per_class(split, torch.tensor([2, 1, 0]))
    assert taken.ids.tolist() == [0, 1, 2]
    assert sorted(taken.ids.tolist() + rest.ids.tolist()) == list(range(len(LABELS)))
    assert cap_per_class(split, 1, 3).ids.tolist() == [0, 1, 3]


def test_ceil_fraction_ignores_float_noise():
    assert 0.07 * 100 > 7
    assert ceil_fraction(0.07, torch.tensor([100, 50, 1, 0])).tolist() == [7, 4, 1, 0]


def test_path_splits_subset_like_tensor_splits():
    split = Split([f"img{i}.png" for i in range(len(LABELS))], LABELS)
    assert split.subset(torch.tensor([3, 0])).images == ["img3.png", "img0.png"]
    assert not split.in_memory


# ----------------------------------------------------------------------------------- digits dataset
@pytest.fixture(scope="module")
def digits() -> LongTailData:
    return build_dataset(DataConfig())


def _ids(split: Split) -> set[int]:
    return set(split.ids.tolist())


def test_digits_default_is_a_real_long_tail(digits):
    assert (digits.num_classes, digits.in_chans, digits.image_size) == (10, 1, 8)
    assert digits.train.images.dtype == torch.uint8 and int(digits.train.images.max()) == 255
    assert digits.class_counts.tolist() == exp_counts(124, 10, 10.0) == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]
    assert digits.augment.horizontal_flip is False and digits.augment.crop_padding == 1


def test_digits_are_read_exactly_as_sklearn_loads_them():
    """The source reads scikit-learn's digits file itself (no sklearn/scipy import); what it reads must be
    load_digits' arrays, bit for bit, and the fallback is load_digits itself."""
    from sklearn.datasets import load_digits

    from ltsearch.data.sources import digits as digits_source

    images, targets = digits_source.read_digits()
    reference = load_digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert targets.dtype == reference.target.dtype and np.array_equal(targets, reference.target)


def test_digits_fall_back_to_load_digits_without_the_file(monkeypatch):
    import importlib.util

    from ltsearch.data.sources import digits as digits_source

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    images, targets = digits_source.read_digits()
    assert images.shape == (1797, 8, 8) and targets.shape == (1797,)


def test_val_from_test_takes_the_first_tenth_of_each_test_class(digits):
    assert digits.val.class_counts(10).tolist() == [5] * 10
    assert digits.test.class_counts(10).tolist() == [45] * 10
    assert not _ids(digits.train) & _ids(digits.val)
    assert not _ids(digits.train) & _ids(digits.test)
    assert not _ids(digits.val) & _ids(digits.test)
    for cls in range(10):  # "first in index order": every val id of a class precedes every test id of it
        assert digits.val.ids[digits.val.labels == cls].max() < digits.test.ids[digits.test.labels == cls].min()


def test_val_from_train_is_balanced_and_held_out_before_the_long_tail():
    data = build_dataset(DataConfig(val_source="train", val_fraction=0.1))
    per_class = math.ceil(0.1 * 124)
    assert data.val.class_counts(10).tolist() == [per_class] * 10
    assert data.test.class_counts(10).tolist() == [50] * 10
    assert data.class_counts.tolist() == exp_counts(124 - per_class, 10, 10.0)
    assert not _ids(data.train) & _ids(data.val) and not _ids(data.val) & _ids(data.test)
    assert not _ids(data.train) & _ids(data.test)


def test_test_split_is_fixed_while_the_training_subset_follows_the_seed(digits):
    other = build_dataset(DataConfig(seed=1))
    assert torch.equal(other.test.ids, digits.test.ids) and torch.equal(other.val.ids, digits.val.ids)
    assert other.class_counts.tolist() == digits.class_counts.tolist()
    assert _ids(other.train) != _ids(digits.train)
    assert other.construction["train_fingerprint"] != digits.construction["train_fingerprint"]
    assert build_dataset(DataConfig(seed=0)).construction["train_fingerprint"] == digits.construction["train_fingerprint"]


def test_imbalance_one_keeps_the_pool_and_step_profile_applies():
    balanced = build_dataset(DataConfig(imbalance=1.0))
    assert len(balanced.train) == 1797 - 500 and balanced.construction["construction"] is None
    step = build_dataset(DataConfig(profile="step", imbalance=4.0))
    assert step.class_counts.tolist() == [124] * 5 + [31] * 5


def test_caps_shrink_train_and_eval_per_class():
    data = build_dataset(DataConfig(max_train_per_class=20, max_eval_per_class=3))
    assert data.class_counts.tolist() == [20, 20, 20, 20, 20, 20, 20, 20, 16, 12]
    assert data.val.class_counts(10).tolist() == [3] * 10 and data.test.class_counts(10).tolist() == [3] * 10


def test_summary_is_json_and_records_the_construction(digits):
    summary = json.loads(json.dumps(digits.summary()))
    assert summary["totals"] == {"train": 503, "val": 50, "test": 450}
    assert summary["counts"]["train"] == digits.class_counts.tolist()
    assert summary["observed_imbalance"] == pytest.approx(124 / 12)
    construction = summary["construction"]
    assert {key: construction[key] for key in ("profile", "imbalance", "construction", "seed", "val_source")} == \
        {"profile": "exp", "imbalance": 10.0, "construction": "ldam", "seed": 0, "val_source": "test"}
    assert construction["source_files"] and construction["img_max"] == 124


@pytest.mark.parametrize("change, key", [({"imbalance": 0.5}, "data.imbalance"), ({"name": "mnist"}, "data.name"),
                                         ({"val_fraction": 1.0}, "data.val_fraction")])
def test_bad_config_is_refused_with_its_key(change, key):
    with pytest.raises(ConfigError) as error:
        build_dataset(dataclasses.replace(DataConfig(), **change))
    assert error.value.key == key
