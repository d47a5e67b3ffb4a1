"""The prefix board: one Ray actor per sweep or ablation that hands each prefix to exactly one trainer.

A run that needs the snapshot of prefix `key` at epoch T calls `claim(key, T)`. The first caller is
told to train the trunk (it does so in its own process, on its own CPUs/GPU, so a waiting run never
holds resources the trunk needs); every later caller for the same key waits inside the actor (an
asyncio condition, no polling from the run) until the snapshot is published, and a caller whose T the
running trunk has not passed yet adds T to the epochs the trunk stops to snapshot. When the trunk
fails, every waiter gets its error. When the trunk's trainer dies without a word (killed, out of memory, its
node lost), the board hears it from Ray within a second: it watches the state Ray's GCS keeps of the trainer's
actor, and the next waiter, or the run itself when Tune retries it, takes the trunk over. A trainer that stops
beating without dying (hung) loses the trunk after `stall_s`. Either way the trunk resumes from its own latest
snapshot or checkpoint, so nothing saved is trained again.

The board only coordinates; the snapshots are files (`PrefixStore`), so a resumed sweep with a new
board finds what the old one published.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

READY, TRAIN, FAILED = "ready", "train", "failed"
#: seconds between two looks at the state of a trunk trainer's actor
WATCH_S = 1.0


@dataclass
class _Entry:
    """What the board knows of one prefix key."""

    owner: str | None = None
    claimant: str | None = None  # the run (Tune trial id) the owner trains for
    position: int = 0  # epochs the owner's trunk has trained
    target: int = 0
    wanted: set[int] = field(default_factory=set)
    ready: set[int] = field(default_factory=set)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)
    beat: float = 0.0
    slowest_epoch_s: float = 0.0
    epochs_trained: int = 0
    forks: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


@ray.remote(num_cpus=0, max_concurrency=1000)
class PrefixBoard:
    """Coordination of shared prefixes (an async actor: its waits cost no thread and no CPU)."""

    def __init__(self, stall_s: float = 600.0):
        self.stall_s = stall_s
        self.entries: dict[str, _Entry] = {}

    def _entry(self, key: str) -> _Entry:
        return self.entries.setdefault(key, _Entry())

    async def claim(self, key: str, epoch: int, claimant: str | None = None, trainer: str | None = None) -> dict[str, Any]:
        """READY (the snapshot at `epoch` is published), TRAIN (with a token: the caller trains the trunk) or FAILED.

        `claimant` names the run asking (its Tune trial id); a run that asks again while the board still
        counts it as the trunk's owner has been restarted, so it takes the trunk back without waiting for a stall.
        `trainer` is the caller's actor id (hex): granted the trunk, that actor's death hands the trunk on (`_watch`).
        """
        entry = self._entry(key)
        async with entry.changed:
            while True:
                if epoch in entry.ready:
                    return {"status": READY}
                if epoch in entry.failed:
                    return {"status": FAILED, **entry.failed[epoch]}
                if entry.owner is None or self._stalled(entry) or (claimant is not None and claimant == entry.claimant):
                    entry.owner, entry.claimant, entry.target, entry.wanted = uuid.uuid4().hex, claimant, epoch, {epoch}
                    entry.beat, entry.position = time.monotonic(), 0
                    if trainer is not None:
                        asyncio.get_running_loop().create_task(self._watch(key, entry.owner, trainer))
                    return {"status": TRAIN, "token": entry.owner}
                if entry.position <= epoch:  # the trunk has not passed `epoch`: it stops there for this run too
                    entry.wanted.add(epoch)
                    entry.target = max(entry.target, epoch)
                try:
                    await asyncio.wait_for(entry.changed.wait(), timeout=self._patience(entry))
                except asyncio.TimeoutError:
                    pass

    async def progress(self, key: str, token: str, epoch: int, epoch_s: float | None) -> dict[str, Any]:
        """The trunk's heartbeat: at its start (`epoch_s` None) and after each epoch it trained; returns where
        it must go and where it must stop to snapshot."""
        entry = self._entry(key)
        async with entry.changed:
            if entry.owner != token:
                return {"target": -1, "wanted": []}  # taken over after a stall: this trainer stops
            entry.position, entry.beat = epoch, time.monotonic()
            if epoch_s is not None:
                entry.slowest_epoch_s = max(entry.slowest_epoch_s, epoch_s)
                entry.epochs_trained += 1
            return {"target": entry.target, "wanted": sorted(entry.wanted)}

    async def forked(self, key: str) -> None:
        self._entry(key).forks += 1

    async def published(self, key: str, token: str, epoch: int) -> None:
        entry = self._entry(key)
        async with entry.changed:
            entry.ready.add(epoch)
            entry.changed.notify_all()

    async def release(self, key: str, token: str, error: dict[str, Any] | None = None) -> None:
        """The trunk stopped: done, or failed with `error` ({kind, error, details}; every epoch still wanted fails with it)."""
        entry = self._entry(key)
        async with entry.changed:
            if entry.owner != token:
                return
            if error is not None:
                entry.failed.update({epoch: error for epoch in entry.wanted if epoch not in entry.ready})
            _free(entry)

    async def training(self) -> dict[str, str]:
        """{claimant trial id: "trunk <key> k/T"} for every trunk being trained now: what the progress table shows
        for a run that has reported nothing yet because it trains the shared prefix first."""
        return {e.claimant: f"trunk {key[:8]} {e.position}/{e.target}" for key, e in self.entries.items()
                if e.owner is not None and e.claimant is not None}

    async def summary(self) -> dict[str, dict[str, int]]:
        """Per key: epochs trained by trunks in this session, forks served, snapshots published."""
        return {key: {"epochs_trained": e.epochs_trained, "forks": e.forks, "snapshots": len(e.ready)} for key, e in self.entries.items()}

    async def _watch(self, key: str, token: str, trainer: str) -> None:
        """While `token` owns the trunk: look up the trainer's actor in Ray's GCS every WATCH_S; once Ray reports it
        DEAD (killed, out of memory, its node lost), release the trunk, without an error, to whoever asks or waits next.

        An id, not the actor's handle: a handle makes Ray load the actor's class into the board, and a Tune trial's
        class pulls in the trainable and torch with it, ~1.8 s of CPU while the first run waited for its answer
        (benchmarks/RESULTS.md, prefix.py). An actor that cannot be looked up is left to the stall rule.
        """
        entry = self._entry(key)
        while entry.owner == token:
            try:
                state = await asyncio.to_thread(_actor_state, trainer)
            except Exception:  # noqa: BLE001 - the actor cannot be watched (not a failure of it): the stall rule applies
                return
            if state == "DEAD":
                async with entry.changed:
                    if entry.owner == token:
                        _free(entry)
                return
            await asyncio.sleep(WATCH_S)

    def _patience(self, entry: _Entry) -> float:
        return max(self.stall_s, 10 * entry.slowest_epoch_s)

    def _stalled(self, entry: _Entry) -> bool:
        return entry.owner is not None and time.monotonic() - entry.beat > self._patience(entry)


def _actor_state(actor_id: str) -> str:
    """ALIVE, RESTARTING, DEAD ... as the GCS's actor table has it (Ray's public state API needs the dashboard)."""
    from ray._private.state import actors

    return actors(actor_id=actor_id)["State"]


def _free(entry: _Entry) -> None:
    """The trunk has no owner any more (done, failed or its trainer dead): wake every waiter (call holding `changed`)."""
    entry.owner, entry.claimant, entry.wanted = None, None, set()
    entry.changed.notify_all()


def create_board(name: str | None = None, stall_s: float = 600.0) -> Any:
    """A board owned by the calling driver (it lives exactly as long as the sweep or ablation)."""
    options = {"name": name, "get_if_exists": True} if name else {}
    return PrefixBoard.options(**options).remote(stall_s)
