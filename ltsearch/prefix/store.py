"""Where prefixes live: `<root>/prefixes/<key>/`, mirrored in a content-addressed cache.

    <root>/prefixes/<key>/prefix.json      what the prefix is (method, trunk config, snapshots)
    <root>/prefixes/<key>/epoch-<T>.pt     the training state at fork epoch T (a full checkpoint)
    <root>/prefixes/<key>/trunk/           the trunk's rolling checkpoint, so an interrupted trunk resumes,
                                           and epoch.json, its epoch (read without loading the checkpoint)
    <cache>/prefixes/<key>/epoch-<T>.pt    the same snapshots, reused by later sweeps and ablations

`root` is the sweep or ablation directory (a filesystem every node mounts when the sweep spans
nodes); the cache is `$LTSEARCH_CACHE` (default ~/.cache/ltsearch), like M2m's reference classifier.
The key covers everything that trains the prefix, so a cached snapshot is the one this run would
train; it also covers the ltsearch and torch versions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltsearch.checkpoints import CHECKPOINT_FILE, link_or_copy, read_checkpoint, save_state
from ltsearch.errors import CheckpointError
from ltsearch.prefix import PREFIX_KEY
from ltsearch.results import write_json

if TYPE_CHECKING:
    from ltsearch.engine import Trainer
    from ltsearch.prefix.keys import Prefix

PREFIXES_DIR = "prefixes"
DESCRIPTION_FILE = "prefix.json"
TRUNK_DIR = "trunk"
TRUNK_EPOCH_FILE = "epoch.json"
_SNAPSHOT = re.compile(r"epoch-(\d+)\.pt$")


class PrefixStore:
    """Snapshots of shared prefixes in one run directory (and the cache); safe to use from any process."""

    def __init__(self, root: str | Path, cache: str | Path | None):
        self.root = Path(root) / PREFIXES_DIR
        self.cache = Path(cache) / PREFIXES_DIR if cache is not None else None

    def directory(self, key: str) -> Path:
        return self.root / key

    def snapshot(self, key: str, epoch: int) -> Path | None:
        """The state at `epoch`, from this directory or else from the cache (linked in); None if neither has it."""
        local = self.directory(key) / f"epoch-{epoch}.pt"
        if local.is_file():
            return local
        cached = self.cache / key / local.name if self.cache is not None else None
        if cached is None or not cached.is_file():
            return None
        link_or_copy(cached, local)
        return local

    def start_point(self, key: str, epoch: int) -> tuple[int, Path | None]:
        """Where a trunk that must reach `epoch` starts: the latest snapshot or trunk checkpoint at or before it."""
        best: tuple[int, Path | None] = (0, None)
        for folder in (self.directory(key), self.cache / key if self.cache is not None else None):
            if folder is None or not folder.is_dir():
                continue
            for path in folder.iterdir():
                match = _SNAPSHOT.match(path.name)
                if match and best[0] < int(match.group(1)) <= epoch:
                    best = (int(match.group(1)), path)
        trunk = self.directory(key) / TRUNK_DIR
        trunk_epoch = _trunk_epoch(trunk)
        if trunk_epoch is not None and best[0] < trunk_epoch <= epoch:
            best = (trunk_epoch, trunk / CHECKPOINT_FILE)
        return best

    def publish(self, trainer: "Trainer", prefix: "Prefix") -> Path:
        """Write the trainer's state as the snapshot at its epoch, as durably as a checkpoint, then into the cache;
        returns the local file. The cache keeps a snapshot it already has: the key fixes its content."""
        target = save_state(trainer.state_dict(), self.directory(prefix.key) / f"epoch-{trainer.epoch}.pt", "the prefix snapshot")
        self._describe(prefix, trainer.epoch)
        cached = self.cache / prefix.key / target.name if self.cache is not None else None
        if cached is not None and not cached.is_file():
            link_or_copy(target, cached)
        return target

    def save_trunk(self, trainer: "Trainer", key: str) -> None:
        """Checkpoint the trunk, then record its epoch beside it for `start_point` (see `_trunk_epoch`)."""
        folder = self.directory(key) / TRUNK_DIR
        checkpoint = trainer.save_checkpoint(folder)
        write_json({"epoch": trainer.epoch, "checkpoint": _identity(checkpoint)}, folder / TRUNK_EPOCH_FILE)

    def snapshots(self, key: str) -> list[int]:
        folder = self.directory(key)
        found = [_SNAPSHOT.match(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        return sorted(int(m.group(1)) for m in found if m)

    def _describe(self, prefix: "Prefix", epoch: int) -> None:
        path = self.directory(prefix.key) / DESCRIPTION_FILE
        known = _read_json(path) or {"key": prefix.key, "method": prefix.method, "trunk": prefix.trunk, "snapshots": []}
        known["snapshots"] = sorted(set(known["snapshots"]) | {epoch})
        write_json(known, path)


def fork_from(trainer: "Trainer", prefix: "Prefix", snapshot: Path) -> None:
    """Continue a run's fresh `trainer` from `prefix`'s snapshot at its fork epoch (`Trainer.load_prefix`); its shared
    epochs also carry the prefix key, which history and tracking read (MLflow logs them once, in the prefix's run)."""
    trainer.load_prefix(read_checkpoint(snapshot), method_trains_before_start=prefix.trains_before_start)
    trainer.history = [{**row, PREFIX_KEY: prefix.key} for row in trainer.history]


def _trunk_epoch(folder: Path) -> int | None:
    """The epoch of the trunk checkpoint in `folder`, None without a readable one.

    It comes from the record `save_trunk` writes when that record names the very file there now (a crash
    between the two writes leaves it naming the checkpoint before); otherwise, in a store from before the
    record or after such a crash, from the checkpoint itself, which means loading all of it.
    """
    checkpoint = folder / CHECKPOINT_FILE
    try:
        identity = _identity(checkpoint)
    except OSError:
        return None
    record = _read_json(folder / TRUNK_EPOCH_FILE)
    if isinstance(record, dict) and record.get("checkpoint") == identity and isinstance(record.get("epoch"), int):
        return record["epoch"]
    try:
        return read_checkpoint(checkpoint)["epoch"]
    except CheckpointError:
        return None


def _identity(path: Path) -> dict[str, int]:
    """Which file `path` is: a save writes a new file (inode) while the one it replaces still exists, so a record
    left from the save before never names the file there now."""
    stat = path.stat()
    return {"inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
