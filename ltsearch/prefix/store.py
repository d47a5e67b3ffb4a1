"""Where prefixes live: `<root>/prefixes/<key>/`, mirrored in a content-addressed cache.

    <root>/prefixes/<key>/prefix.json      what the prefix is (method, trunk config, snapshots)
    <root>/prefixes/<key>/epoch-<T>.pt     the training state at fork epoch T (a full checkpoint)
    <root>/prefixes/<key>/trunk/           the trunk's rolling checkpoint, so an interrupted trunk resumes
    <cache>/prefixes/<key>/epoch-<T>.pt    the same snapshots, reused by later sweeps and ablations

`root` is the sweep or ablation directory (a filesystem every node mounts when the sweep spans
nodes); the cache is `$LTSEARCH_CACHE` (default ~/.cache/ltsearch), like M2m's reference classifier.
The key covers everything that trains the prefix, so a cached snapshot is the one this run would
train; it also covers the ltsearch and torch versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ltsearch.results import atomic_target, write_json

if TYPE_CHECKING:
    from ltsearch.engine import Trainer
    from ltsearch.prefix.keys import Prefix

PREFIXES_DIR = "prefixes"
DESCRIPTION_FILE = "prefix.json"
TRUNK_DIR = "trunk"
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
        _link_or_copy(cached, local)
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
        trunk = self.directory(key) / TRUNK_DIR / "checkpoint.pt"
        if trunk.is_file():
            trunk_epoch = _epoch_of(trunk)
            if trunk_epoch is not None and best[0] < trunk_epoch <= epoch:
                best = (trunk_epoch, trunk)
        return best

    def publish(self, trainer: "Trainer", prefix: "Prefix") -> Path:
        """Write the trainer's state as the snapshot at its epoch, then into the cache; returns the local file."""
        folder = self.directory(prefix.key)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"epoch-{trainer.epoch}.pt"
        with atomic_target(target, "the prefix snapshot") as tmp:
            torch.save(trainer.state_dict(), tmp)
        self._describe(prefix, trainer.epoch)
        if self.cache is not None:
            _link_or_copy(target, self.cache / prefix.key / target.name)
        return target

    def save_trunk(self, trainer: "Trainer", key: str) -> None:
        trainer.save_checkpoint(self.directory(key) / TRUNK_DIR)

    def snapshots(self, key: str) -> list[int]:
        folder = self.directory(key)
        found = [_SNAPSHOT.match(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        return sorted(int(m.group(1)) for m in found if m)

    def _describe(self, prefix: "Prefix", epoch: int) -> None:
        path = self.directory(prefix.key) / DESCRIPTION_FILE
        known = _read_json(path) or {"key": prefix.key, "method": prefix.method, "trunk": prefix.trunk, "snapshots": []}
        known["snapshots"] = sorted(set(known["snapshots"]) | {epoch})
        write_json(known, path)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link (same filesystem) or copy, written beside the target and renamed: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file():
        return
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _epoch_of(checkpoint: Path) -> int | None:
    from ltsearch.checkpoints import read_checkpoint
    from ltsearch.errors import CheckpointError

    try:
        return read_checkpoint(checkpoint)["epoch"]
    except CheckpointError:
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
