"""`start_trainer`: the trainer a trial or ablation run starts from, forked from its shared prefix when it has one.

With sharing on and a prefix (see `keys.prefix_of`), the run's trainer is built from its own config
and continues from the snapshot at its fork epoch T: from the run directory or the cache when one
exists, otherwise through the board, which either hands this process the trunk to train (to T, and
to every other fork epoch asked for meanwhile) or makes it wait for the process that trains it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from ltsearch.config import RunConfig, build_run_config
from ltsearch.errors import LtsearchError, TrainingDiverged
from ltsearch.prefix.board import FAILED, READY, TRAIN
from ltsearch.prefix.keys import Prefix, shared_prefix_of
from ltsearch.prefix.store import PrefixStore, fork_from


#: snapshots a trunk keeps besides its fork epochs (one every T/WAYPOINTS epochs): a trial asking for an epoch
#: the trunk has already passed (TPE proposes start epochs in any order) retrains at most T/WAYPOINTS epochs
WAYPOINTS = 8


class PrefixFailed(LtsearchError):
    """The shared prefix this run depends on failed; the message is the prefix's own error."""


@dataclass(frozen=True)
class PrefixSharing:
    """What every run of a sweep or ablation needs to share prefixes (put in the object store once)."""

    root: str
    cache: str | None
    board: Any  # the PrefixBoard actor handle
    checkpoint_every: int
    baseline_keys: frozenset[str] | None = frozenset()  # the trunks a run without a method may fork (None: any)

    def store(self) -> PrefixStore:
        return PrefixStore(self.root, self.cache)


def open_sharing(directory: str, enabled: bool, checkpoint_every: int,
                 baseline_keys: frozenset[str] | None = frozenset()) -> PrefixSharing | None:
    """The sharing of one sweep or ablation (call inside its Ray session), or None when it is switched off.

    `baseline_keys` are the trunks a run without a method forks (`keys.shared_prefix_of`): those of the method
    runs of an ablation, any (None) in a sweep that can draw a method idle before T. Prefixes go to `<directory>/prefixes/`; a directory that is a URI (s3://...) cannot hold them, so they
    then live in the cache alone (set LTSEARCH_CACHE to storage every node mounts for a multi-node sweep).
    """
    if not enabled:
        return None
    from ltsearch.engine import default_cache_dir
    from ltsearch.prefix.board import create_board

    cache = str(default_cache_dir())
    return PrefixSharing(root=cache if "://" in directory else directory, cache=cache, board=create_board(),
                         checkpoint_every=checkpoint_every, baseline_keys=baseline_keys)


def report_sharing(sharing: PrefixSharing | None, stream: Any) -> dict[str, Any] | None:
    """After the trials: what the board saw, written to `<root>/prefixes/summary.json` and told in one line."""
    if sharing is None:
        return None
    from ltsearch.results import write_json

    summary = ray.get(sharing.board.summary.remote())
    if not summary:
        return None
    trained = sum(entry["epochs_trained"] for entry in summary.values())
    forks = sum(entry["forks"] for entry in summary.values())
    root = sharing.store().root
    root.mkdir(parents=True, exist_ok=True)
    write_json(summary, root / "summary.json")
    print(f"shared prefixes: {forks} run(s) forked from {len(summary)} prefix(es); their trunks trained {trained} epoch(s) in this "
          f"session{' (all found on disk or in the cache)' if not trained else ''} ({root})", file=stream, flush=True)
    return summary


def start_trainer(config: RunConfig, sharing: PrefixSharing | None, data: Any = None) -> tuple[Any, Prefix | None]:
    """(trainer at the run's start, the prefix it was forked from or None when it trains from epoch 0)."""
    from ltsearch.engine import Trainer

    prefix = shared_prefix_of(config, sharing.baseline_keys) if sharing is not None else None
    if prefix is None:
        return Trainer(config, data=data), None
    store = sharing.store()
    snapshot = store.snapshot(prefix.key, prefix.fork_epoch) or _through_board(prefix, sharing, store, data)
    trainer = Trainer(config, data=data)
    fork_from(trainer, prefix, snapshot)
    sharing.board.forked.remote(prefix.key)
    return trainer, prefix


def _through_board(prefix: Prefix, sharing: PrefixSharing, store: PrefixStore, data: Any) -> Any:
    claimant, trainer = _trial_id(), _current_actor()
    while True:
        answer = ray.get(sharing.board.claim.remote(prefix.key, prefix.fork_epoch, claimant, trainer))
        if answer["status"] == READY:
            found = store.snapshot(prefix.key, prefix.fork_epoch)
            if found is not None:
                return found
            raise PrefixFailed(f"shared prefix {prefix.label}: the board says epoch {prefix.fork_epoch} is published, "
                               f"but {store.directory(prefix.key)} does not hold it (is the run directory on storage every node mounts?)")
        if answer["status"] == FAILED:
            where = f"shared prefix {prefix.label} (epochs 0-{prefix.fork_epoch - 1})"
            if answer["kind"] == "TrainingDiverged" and answer.get("details"):  # so would this run, trained from scratch
                raise TrainingDiverged(**answer["details"], note=f"in the {where} this run forks from")
            raise PrefixFailed(f"{where} failed: {answer['error']}")
        assert answer["status"] == TRAIN
        _train_trunk(prefix, sharing, store, data, answer["token"])


def _train_trunk(prefix: Prefix, sharing: PrefixSharing, store: PrefixStore, data: Any, token: str) -> None:
    """Train the trunk from its latest saved point, snapshotting every epoch the board asks for; always release."""
    board = sharing.board
    waypoint = max(sharing.checkpoint_every, -(-prefix.fork_epoch // WAYPOINTS))
    try:
        trainer = _trunk_trainer(prefix, store, data)
        plan = ray.get(board.progress.remote(prefix.key, token, trainer.epoch, None))
        for epoch in plan["wanted"]:  # on disk already: another command sharing the cache published it since the claim
            if epoch <= trainer.epoch and store.snapshot(prefix.key, epoch) is not None:
                ray.get(board.published.remote(prefix.key, token, epoch))
        while trainer.epoch < plan["target"]:
            started = time.perf_counter()
            for _ in trainer.run(until=trainer.epoch + 1):
                pass
            plan = ray.get(board.progress.remote(prefix.key, token, trainer.epoch, time.perf_counter() - started))
            if trainer.epoch in plan["wanted"] or trainer.epoch % waypoint == 0:  # a waypoint: a fork epoch asked for later starts near
                store.publish(trainer, prefix)
                ray.get(board.published.remote(prefix.key, token, trainer.epoch))
            elif trainer.epoch % sharing.checkpoint_every == 0:
                store.save_trunk(trainer, prefix.key)
    except BaseException as error:
        ray.get(board.release.remote(prefix.key, token, _failure(error)))
        raise
    if plan["target"] >= 0:  # not taken over after a stall: the trunk's latest state, for a later extension
        store.save_trunk(trainer, prefix.key)
    ray.get(board.release.remote(prefix.key, token))


def _trunk_trainer(prefix: Prefix, store: PrefixStore, data: Any) -> Any:
    """A trainer of the trunk config at its latest saved point at or before the fork epoch (epoch 0 if none)."""
    from ltsearch.checkpoints import read_checkpoint
    from ltsearch.engine import Trainer

    trainer = Trainer(build_run_config(prefix.trunk), data=data)
    epoch, path = store.start_point(prefix.key, prefix.fork_epoch)
    if path is not None:
        trainer.load_prefix(read_checkpoint(path), method_trains_before_start=prefix.trains_before_start)
    return trainer


def _trial_id() -> str | None:
    """The Tune trial this process runs (the board's name for a claimant), None outside a trial."""
    from ray import tune

    try:
        return tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - no Tune session here (a direct call): the claim is anonymous, stall rules apply
        return None


def _current_actor() -> str | None:
    """This process's actor id (a Tune trial's), whose death the board watches while it trains a trunk; None outside one."""
    try:
        return ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - not connected to Ray (a direct call): the stall rule alone applies
        return None


def _failure(error: BaseException) -> dict[str, Any]:
    """What the board tells the trunk's dependents: the error's kind, first line and (a divergence) its fields."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    failure = {"kind": type(error).__name__, "error": lines[0] if lines else type(error).__name__, "details": None}
    if isinstance(error, TrainingDiverged):
        failure["details"] = {"epoch": error.epoch, "epochs": error.epochs, "step": error.step,
                              "steps_per_epoch": error.steps_per_epoch, "terms": error.terms}
    return failure
