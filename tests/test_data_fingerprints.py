"""Every trial checks that its data has the fingerprints that were recorded for it, and fails naming both values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ltsearch.config import DataConfig
from ltsearch.data import LongTailData, build_dataset
from ltsearch.data.fingerprints import RECORD_FILE, check_trial_data, fingerprints, pin_run_data, record_fingerprints
from ltsearch.errors import DataError, DataMismatch
from ltsearch.tune.settings import Objective
from ltsearch.tune.trainable import TrialPlan, train_trial


@pytest.fixture(scope="module")
def digits() -> LongTailData:
    return build_dataset(DataConfig())


def drop_one_training_image(data: LongTailData) -> LongTailData:
    """The same data object, but holding other training images than the driver fingerprinted."""
    return dataclasses.replace(data, train=data.train.subset(range(1, len(data.train))))


def test_the_fingerprints_a_trial_hashes_are_the_ones_the_driver_recorded(digits):
    assert fingerprints(digits) == {name: digits.construction[f"{name}_fingerprint"] for name in ("train", "val", "test")}
    assert check_trial_data(digits) == fingerprints(digits)


def test_data_with_another_fingerprint_fails_naming_both_values(digits):
    other = drop_one_training_image(digits)
    expected, held = digits.construction["train_fingerprint"], other.train.fingerprint()
    with pytest.raises(DataMismatch) as caught:
        check_trial_data(other)
    message = str(caught.value)
    assert f"train: this trial holds {held}, expected {expected}" in message and "driver" in message
    assert message.startswith("the train split(s) of this trial") and isinstance(caught.value, DataError)


def test_a_resumed_trial_must_hold_the_images_its_checkpoint_was_trained_on(digits, tmp_path):
    record_fingerprints(digits, tmp_path)
    assert check_trial_data(digits, tmp_path) == fingerprints(digits)
    rebuilt = build_dataset(dataclasses.replace(digits.config, seed=1))  # same config on "another node", other images
    rebuilt = dataclasses.replace(rebuilt, config=digits.config)
    with pytest.raises(DataMismatch, match=f"this trial holds {rebuilt.train.fingerprint()}, expected {digits.train.fingerprint()}"):
        check_trial_data(rebuilt, tmp_path)


def test_a_record_for_another_data_config_is_not_compared(digits, tmp_path):
    """PBT may restore a checkpoint trained with perturbed data.* keys: other images on purpose."""
    record_fingerprints(digits, tmp_path)
    other = build_dataset(DataConfig(imbalance=20.0))
    assert check_trial_data(other, tmp_path) == fingerprints(other)


def test_an_unreadable_record_is_a_data_error(digits, tmp_path):
    (tmp_path / RECORD_FILE).write_text("{not json")
    with pytest.raises(DataError, match=RECORD_FILE):
        check_trial_data(digits, tmp_path)


def test_an_ablation_run_records_its_data_on_first_start_and_checks_it_after(digits, tmp_path):
    run = tmp_path / "runs" / "r1"
    pin_run_data(digits, run)
    assert json.loads((run / RECORD_FILE).read_text())["fingerprints"] == fingerprints(digits)
    pin_run_data(digits, run)  # resumed with the same data: fine
    moved = dataclasses.replace(build_dataset(dataclasses.replace(digits.config, seed=2)), config=digits.config)
    with pytest.raises(DataMismatch, match="this run's data config"):
        pin_run_data(moved, run)
    pin_run_data(None, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.filterwarnings("ignore:`get_checkpoint` is meant:UserWarning")  # called outside Tune: no checkpoint
def test_a_sweep_trial_given_other_data_fails_before_training(digits):
    """The real trainable: the check runs right after the trainer is built, before any epoch or report."""
    plan = TrialPlan(base={"train": {"epochs": 1}}, objective=Objective(metric="val/top1", mode="max"), checkpoint_every=1, threads=1)
    other = drop_one_training_image(digits)
    with pytest.raises(DataMismatch, match=f"holds {other.train.fingerprint()}, expected {digits.construction['train_fingerprint']}"):
        train_trial({}, plan, data=other)
