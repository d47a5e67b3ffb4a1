"""Checkpoint files and prefix snapshots on disk: one durable write, one link-or-copy, the trunk's recorded epoch.

Fast unit tests with a stub trainer (the engine's own `save_checkpoint` over a tiny state); training
through these paths is covered by tests/test_engine.py (resume), tests/test_hardening_faults.py (torn
checkpoints) and tests/test_prefix_share.py (trunks, snapshots and the cache in real sweeps).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ltsearch.prefix.store as store_module
from ltsearch.checkpoints import (CHECKPOINT_FILE, CHECKPOINT_FORMAT, PREVIOUS_CHECKPOINT_FILE, STATE_KEYS, link_or_copy,
                                  read_checkpoint, read_latest_checkpoint, save_state)
from ltsearch.engine import Trainer
from ltsearch.epochs import EpochResult, scalars
from ltsearch.errors import StorageError
from ltsearch.prefix.store import TRUNK_DIR, TRUNK_EPOCH_FILE, PrefixStore
from ltsearch.tune.settings import Objective
from ltsearch.tune.trainable import _Reporter


class StubTrainer:
    """What the store needs of a Trainer: its epoch, its state, and the engine's own `save_checkpoint`."""

    save_checkpoint = Trainer.save_checkpoint

    def __init__(self, epoch: int):
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {**{key: {} for key in STATE_KEYS}, "format": CHECKPOINT_FORMAT, "epoch": self.epoch, "step": 10 * self.epoch,
                "history": [{"epoch": e} for e in range(self.epoch)], "model": {"w": torch.full((3,), float(self.epoch))}}


PREFIX = SimpleNamespace(key="k", method="safa", trunk={"train": {"epochs": 9}})


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync is called on (files and directories), in order."""
    paths: list[str] = []
    real = os.fsync

    def record(descriptor: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def no_tmp_left(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ scalars
def test_scalars_are_the_numeric_metrics_of_a_row() -> None:
    row = {"epoch": 3, "val/top1": 51.5, "prefix/shared": 1, "flag": True, "test/per_class": [1.0, 2.0], "train/sampler": "cb", "x": None}
    assert scalars(row) == {"epoch": 3, "val/top1": 51.5, "prefix/shared": 1}
    assert EpochResult(epoch=3, metrics=row, is_best=False, trainer=None).scalars() == scalars(row)


def test_the_tune_reporter_sends_the_rows_scalars_and_its_counters() -> None:
    report = _Reporter(Objective(), start_epoch=2, node="n", counts=[5, 1], prefix_key="k")
    row = {"epoch": 3, "val/top1": 51.5, "flag": True, "test/per_class": [1.0, 2.0], "train/sampler": "cb"}
    metrics = report.metrics(row)
    assert {k: metrics[k] for k in scalars(row)} == scalars(row)
    assert "flag" not in metrics and "train/sampler" not in metrics
    assert metrics["test/per_class"] == [1.0, 2.0] and metrics["best/val/top1"] == 51.5 and metrics["prefix/key"] == "k"


# ----------------------------------------------------------------------------------- durable writes
def test_save_state_flushes_the_file_before_the_rename_and_the_directory_after(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "run" / CHECKPOINT_FILE
    assert save_state(StubTrainer(2).state_dict(), target, "the checkpoint") == target
    assert fsynced == [str(target) + ".tmp", str(target.parent)]
    assert read_checkpoint(target)["epoch"] == 2 and no_tmp_left(tmp_path)


def test_save_state_keeps_the_file_it_replaces(tmp_path: Path) -> None:
    target, previous = tmp_path / CHECKPOINT_FILE, tmp_path / PREVIOUS_CHECKPOINT_FILE
    save_state(StubTrainer(1).state_dict(), target, "the checkpoint", keep_previous=previous)
    assert not previous.exists()  # nothing to keep yet
    save_state(StubTrainer(2).state_dict(), target, "the checkpoint", keep_previous=previous)
    assert read_checkpoint(target)["epoch"] == 2 and read_checkpoint(previous)["epoch"] == 1 and no_tmp_left(tmp_path)


def test_a_failed_save_is_one_storage_error_and_leaves_the_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = StubTrainer(1)
    trainer.save_checkpoint(tmp_path)
    trainer.epoch = 2
    trainer.save_checkpoint(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    trainer.epoch = 3
    with pytest.raises(StorageError, match="could not write the checkpoint"):
        trainer.save_checkpoint(tmp_path)
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == 2
    assert read_checkpoint(tmp_path / PREVIOUS_CHECKPOINT_FILE)["epoch"] == 1 and no_tmp_left(tmp_path)


def test_link_or_copy_links_on_one_filesystem_and_copies_whole_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          fsynced: list[str]) -> None:
    source = tmp_path / "a.pt"
    source.write_bytes(b"state" * 1000)
    link_or_copy(source, tmp_path / "linked" / "a.pt")
    assert (tmp_path / "linked" / "a.pt").stat().st_ino == source.stat().st_ino

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    copied = tmp_path / "copied" / "a.pt"
    link_or_copy(source, copied)
    assert copied.read_bytes() == source.read_bytes() and copied.stat().st_ino != source.stat().st_ino
    assert fsynced == [str(copied.with_name(f"a.pt.{os.getpid()}.tmp"))]  # the copy reaches the disk before it is renamed in
    assert no_tmp_left(tmp_path)


def test_a_resume_falls_back_to_the_previous_checkpoint_and_says_so(tmp_path: Path) -> None:
    trainer = StubTrainer(1)
    trainer.save_checkpoint(tmp_path)
    trainer.epoch = 2
    trainer.save_checkpoint(tmp_path)
    state, loaded, note = read_latest_checkpoint(tmp_path)
    assert (state["epoch"], loaded, note) == (2, tmp_path / CHECKPOINT_FILE, None)
    checkpoint = tmp_path / CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    state, loaded, note = read_latest_checkpoint(tmp_path)
    assert (state["epoch"], loaded) == (1, tmp_path / PREVIOUS_CHECKPOINT_FILE)
    assert note.startswith("warning: cannot read checkpoint") and "(after epoch 1)" in note


# ------------------------------------------------------------------------------------- prefix store
def test_a_published_prefix_is_written_like_a_checkpoint_and_linked_into_the_cache(tmp_path: Path, fsynced: list[str]) -> None:
    store = PrefixStore(tmp_path / "sweep", tmp_path / "cache")
    snapshot = store.publish(StubTrainer(3), PREFIX)
    assert snapshot == store.directory("k") / "epoch-3.pt" and read_checkpoint(snapshot)["epoch"] == 3
    assert fsynced[:2] == [str(snapshot) + ".tmp", str(snapshot.parent)]
    cached = tmp_path / "cache" / "prefixes" / "k" / "epoch-3.pt"
    assert cached.stat().st_ino == snapshot.stat().st_ino and store.snapshots("k") == [3] and no_tmp_left(tmp_path)


def test_the_cache_keeps_a_snapshot_it_already_has(tmp_path: Path) -> None:
    cached = tmp_path / "cache" / "prefixes" / "k" / "epoch-3.pt"
    save_state(StubTrainer(3).state_dict(), cached, "the prefix snapshot")
    inode = cached.stat().st_ino
    PrefixStore(tmp_path / "sweep", tmp_path / "cache").publish(StubTrainer(3), PREFIX)
    assert cached.stat().st_ino == inode


def test_the_trunks_epoch_is_read_from_its_record_without_loading_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PrefixStore(tmp_path, None)
    store.save_trunk(StubTrainer(3), "k")
    trunk = store.directory("k") / TRUNK_DIR
    assert (trunk / TRUNK_EPOCH_FILE).is_file()

    def loaded(path):
        raise AssertionError(f"start_point loaded {path}")

    monkeypatch.setattr(store_module, "read_checkpoint", loaded)
    assert store.start_point("k", 5) == (3, trunk / CHECKPOINT_FILE)
    assert store.start_point("k", 2) == (0, None)  # past the epoch asked for: from scratch
    store.publish(StubTrainer(4), PREFIX)
    assert store.start_point("k", 5) == (4, store.directory("k") / "epoch-4.pt")  # a later snapshot wins


def test_a_record_that_names_an_older_checkpoint_is_not_believed(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, None)
    store.save_trunk(StubTrainer(3), "k")
    trunk = store.directory("k") / TRUNK_DIR
    StubTrainer(6).save_checkpoint(trunk)  # a crash between the checkpoint and its record
    assert store.start_point("k", 5) == (0, None)
    assert store.start_point("k", 6) == (6, trunk / CHECKPOINT_FILE)


def test_a_store_from_before_the_record_reads_the_checkpoint(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, None)
    trunk = store.directory("k") / TRUNK_DIR
    StubTrainer(4).save_checkpoint(trunk)
    assert not (trunk / TRUNK_EPOCH_FILE).exists()
    assert store.start_point("k", 4) == (4, trunk / CHECKPOINT_FILE)
    (trunk / CHECKPOINT_FILE).write_bytes(b"torn")
    assert store.start_point("k", 4) == (0, None)
