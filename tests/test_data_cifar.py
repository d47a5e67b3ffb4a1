"""The real CIFAR-10 files: each paper's construction (ldam, rsg, m2m) on image ids, seed purity, val/test protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltsearch.config import DataConfig
from ltsearch.data.dataset import SourceData, assemble
from ltsearch.data.longtail import exp_counts
from ltsearch.registry import DATASETS

pytestmark = pytest.mark.cifar
REFERENCE_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def cifar_config(cifar_root) -> DataConfig:
    return DataConfig(name="cifar10", root=str(cifar_root), imbalance=100.0, construction="ldam", seed=0)


@pytest.fixture(scope="module")
def source(cifar_config) -> SourceData:
    """The six pickles, read once for the whole module."""
    return DATASETS.get("cifar10").obj(cifar_config)


def build(source: SourceData, cfg: DataConfig, **changes):
    return assemble(source, dataclasses.replace(cfg, **changes))


def ids(split) -> set[int]:
    return set(split.ids.tolist())


def test_real_files_have_the_cifar10_shape_and_statistics(source):
    assert source.train.images.shape == (50_000, 3, 32, 32) and len(source.test) == 10_000
    assert source.train.class_counts(10).tolist() == [5000] * 10
    assert source.class_names[:3] == ["airplane", "automobile", "bird"]
    # Channel-major rows decoded right reproduce LDAM-DRW's normalisation constants.
    mean = source.train.images.sum((0, 2, 3), dtype=torch.float64) / (50_000 * 32 * 32 * 255)
    assert mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-3)


def test_ldam_construction_gives_the_reference_counts(source, cifar_config):
    data = build(source, cifar_config)
    assert data.class_counts.tolist() == REFERENCE_COUNTS and len(data.train) == 12_406
    assert len(ids(data.train)) == 12_406


def first_in_file_order(source: SourceData, counts: list[int]) -> list[int]:
    """Ids of the first n_c training images of each class in file order (data_batch_1..5), class by class."""
    return [i for c, n in enumerate(counts) for i in torch.nonzero(source.train.labels == c).squeeze(1)[:n].tolist()]


def test_rsg_keeps_ldam_counts_but_the_first_images_in_file_order(source, cifar_config):
    ldam = build(source, cifar_config, construction="ldam")
    rsg = build(source, cifar_config, construction="rsg")
    assert rsg.class_counts.tolist() == REFERENCE_COUNTS
    assert ids(ldam.train) != ids(rsg.train)
    assert sorted(rsg.train.ids.tolist()) == sorted(first_in_file_order(source, REFERENCE_COUNTS))
    assert rsg.construction["seed"] is None  # nothing random: the seed does not pick images


@pytest.mark.parametrize("imbalance, total", [(50.0, 13_996), (100.0, 12_406), (10.0, 20_431)])
def test_m2m_construction_takes_the_exact_counts_and_the_first_images_in_file_order(source, cifar_config, imbalance, total):
    """M2m's μ^i is ρ^(−i/(C−1)): the exact counts, on every CPU (its float code drops to 13,995 at ρ = 50 on some).

    Its subset differs from LDAM's by the image pick only, and is RSG's (both codes take the first n_i in file order).
    """
    m2m = build(source, cifar_config, construction="m2m", imbalance=imbalance)
    ldam = build(source, cifar_config, construction="ldam", imbalance=imbalance)
    rsg = build(source, cifar_config, construction="rsg", imbalance=imbalance)
    assert len(m2m.train) == len(ldam.train) == total and m2m.class_counts.tolist() == ldam.class_counts.tolist()
    assert sorted(m2m.train.ids.tolist()) == sorted(first_in_file_order(source, m2m.class_counts.tolist()))
    assert ids(m2m.train) != ids(ldam.train) and torch.equal(m2m.train.ids, rsg.train.ids)
    if imbalance == 50.0:
        assert m2m.class_counts.tolist()[-1] == 100


@pytest.mark.parametrize("construction, imbalance, train", [("m2m", 50.0, "7f77679df66282b4"), ("ldam", 100.0, "b97057c68c3bdf93")])
def test_a_configs_fingerprints_are_the_same_on_every_machine(source, cifar_config, construction, imbalance, train):
    """Pinned literals: the counts are exact integers and the pick is file order or MT19937, so no machine differs
    (M2m at ρ = 50 is the subset that once lost an image on some CPUs)."""
    data = build(source, cifar_config, construction=construction, imbalance=imbalance)
    recorded = {name: data.construction[f"{name}_fingerprint"] for name in ("train", "val", "test")}
    assert recorded == {"train": train, "val": "f97f6c3437f6465f", "test": "5de0f6b0da0af85e"}


def test_ldam_construction_is_a_pure_function_of_the_seed(source, cifar_config):
    seed0, again = build(source, cifar_config, seed=0), build(source, cifar_config, seed=0)
    seed1 = build(source, cifar_config, seed=1)
    assert torch.equal(seed0.train.ids, again.train.ids)
    assert seed0.construction["train_fingerprint"] == again.construction["train_fingerprint"]
    assert ids(seed0.train) != ids(seed1.train) and seed1.class_counts.tolist() == REFERENCE_COUNTS


def test_val_from_test_is_the_first_tenth_of_each_class(source, cifar_config):
    data = build(source, cifar_config)
    assert data.val.class_counts(10).tolist() == [100] * 10 and data.test.class_counts(10).tolist() == [900] * 10
    assert not ids(data.val) & ids(data.test) and not ids(data.train) & (ids(data.val) | ids(data.test))
    first_hundred = [int(i) + 50_000 for i in torch.nonzero(source.test.labels == 3).squeeze(1)[:100]]
    assert data.val.ids[data.val.labels == 3].tolist() == first_hundred


def test_val_from_train_is_balanced_and_shrinks_img_max(source, cifar_config):
    data = build(source, cifar_config, val_source="train")
    assert data.val.class_counts(10).tolist() == [500] * 10 and len(data.test) == 10_000
    assert data.class_counts.tolist() == exp_counts(4500, 10, 100.0)
    assert not ids(data.train) & ids(data.val) and not (ids(data.train) | ids(data.val)) & ids(data.test)
