"""Shared prefixes for one run without Ray (`ltsearch train`): start from a cached trunk, publish its own.

Sweeps and ablations mirror every trunk snapshot in the content-addressed cache (`store`). A plain run whose
prefix key has a snapshot at its fork epoch T there continues from it exactly as a forked trial does
(`Trainer.load_prefix`), so `ltsearch train best.yaml` after a sweep repeats the best trial, bit for bit on CPU,
without its first T epochs. A run that trains [0, T) itself publishes its state at T: by the prefix key it is
the state every run of that key has at T (the exactness tests fork from such snapshots), so later sweeps,
ablations and runs start there. Nothing waits here: without a snapshot the run trains from epoch 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ltsearch.prefix.keys import Prefix, prefix_of
from ltsearch.prefix.store import PrefixStore, fork_from

if TYPE_CHECKING:
    from ltsearch.engine import Trainer


@dataclass(frozen=True)
class LocalSharing:
    """A run's prefix, where its snapshots go (`<run dir>/prefixes/` and the cache), and the snapshot it started from."""

    prefix: Prefix
    store: PrefixStore
    forked_from: Path | None

    def publish_if_due(self, trainer: "Trainer") -> Path | None:
        """After an epoch: the run's state at its fork epoch T, when it trained [0, T) itself; None otherwise."""
        if self.forked_from is not None or trainer.epoch != self.prefix.fork_epoch:
            return None
        return self.store.publish(trainer, self.prefix)

    def describe(self) -> str:
        """One line for the run's output: what it took from the cache, or what it will leave there."""
        epochs = self.prefix.fork_epoch
        if self.forked_from is not None:
            return (f"epochs 1-{epochs}: the shared prefix {self.prefix.label} from the cache ({self.forked_from}); "
                    "--no-share-prefix trains them")
        return f"epoch {epochs}: this run publishes the shared prefix {self.prefix.label} (for later sweeps, ablations and runs)"


def share_locally(trainer: "Trainer", root: str | Path, cache: str | Path) -> LocalSharing | None:
    """Set up sharing for a new run's `trainer` (at epoch 0), None when its config has no prefix.

    With a snapshot of the run's prefix at its fork epoch (in `root` or the cache, linked into `root`), the
    trainer continues from it; its epochs carry `prefix/shared` and the prefix key in the history.
    """
    prefix = prefix_of(trainer.config)
    if prefix is None:
        return None
    store = PrefixStore(root, cache)
    snapshot = store.snapshot(prefix.key, prefix.fork_epoch)
    if snapshot is not None:
        fork_from(trainer, prefix, snapshot)
    return LocalSharing(prefix, store, snapshot)
