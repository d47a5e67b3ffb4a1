"""Which runs share a training prefix: the prefix key and the fork epoch of a run config.

RSG, SAFA and M2m are idle until T_th (80 % of the LDAM-DRW recipe). Two runs whose configs agree on
everything that can change epochs [0, T) train those epochs identically, bit for bit: the backbone,
optimiser, loader and global RNG see the same inputs, and the method's own random stream and
construction are separate streams (`ltsearch._runtime.RngStream`). What "everything" is comes from the
run config minus the method's post-T knobs, which each method declares in its registration
(`BeforeStart`, see `ltsearch.augmenters.base`). The fork epoch T is not part of the key unless the
method declares `start_epoch`: a method idle before T idles the same way whatever T is, so runs with
T = 140 and T = 150 share one trunk that is snapshotted at both epochs.

A method that is fully idle before T (it declares no pre-T key and trains nothing there: SAFA, M2m)
trains [0, T) exactly as no method does, so its key does not name it: the baseline (`none`, which
leaves the trunk at 160/200 of the epochs unless `augmenter.start_epoch` says otherwise), SAFA and M2m
runs that agree on everything else share one trunk, whichever of them trains it. Its modules and
optimiser slots then come from the forked run itself (`BeforeStart.trains` is False), never the trunk's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ltsearch.augmenters.base import before_start_of, resolve_head_ratio, resolve_start_epoch
from ltsearch.config import ResampleConfig, ReweightConfig, RunConfig, to_dict
from ltsearch.registry import SAMPLERS

#: bump when what a prefix checkpoint holds, or how it is trained, changes: old cache entries are then never reused
PREFIX_FORMAT = 3
START_EPOCH = "start_epoch"
HEAD_RATIO = "head_ratio"
#: what a key names instead of the method when the method is fully idle before T (so it trains as no method does)
IDLE = "baseline"
NO_METHOD = "none"


@dataclass(frozen=True)
class Prefix:
    """The shared part of a run: train the trunk to `fork_epoch`, then continue with the run's own config.

    `trunk` is the run config that trains the prefix: the run's own, with the method held idle until
    the last epoch (unless its start epoch is pre-T), so one trunk serves every fork epoch of the key.
    """

    key: str
    fork_epoch: int
    trunk: dict[str, Any]
    method: str
    trains_before_start: bool

    @property
    def label(self) -> str:
        return f"{self.method}@{self.fork_epoch}:{self.key[:8]}"


def prefix_of(config: RunConfig, *, baseline: bool = False) -> Prefix | None:
    """The run's shared prefix, or None when it has nothing to share (its method is active from epoch 0).

    A run without a method has a prefix only with `baseline` (see `baselines_share`): alone it has no one to
    share with, and its trunk's snapshots would cost disk for nothing.
    """
    name = config.augmenter.name
    epochs = config.train.epochs
    fork_epoch = resolve_start_epoch(name, config.augmenter.start_epoch, epochs)
    if fork_epoch <= 0 or fork_epoch >= epochs or (name == NO_METHOD and not baseline):
        return None
    declared = before_start_of(name)
    raw = to_dict(config, active_only=True)
    raw["loss"] = loss_before(raw["loss"], fork_epoch)
    pre_start_keys = declared.keys if declared is not None else tuple(_leaf_keys(raw["augmenter"]))
    if HEAD_RATIO not in pre_start_keys and loader_reads_head_mask(config, fork_epoch):
        pre_start_keys = (*pre_start_keys, HEAD_RATIO)
    idle = idle_before_start(name) and set(pre_start_keys) <= {HEAD_RATIO}
    trunk = to_dict(config)
    trunk["loss"] = loss_before(trunk["loss"], fork_epoch)
    if START_EPOCH not in pre_start_keys:
        trunk["augmenter"][START_EPOCH] = epochs - 1  # idle for every epoch a fork can start at
    payload = {
        "format": PREFIX_FORMAT,
        "versions": _versions(),
        "run": {section: values for section, values in raw.items() if section != "augmenter"},
        "augmenter": _pre_start_identity(config, raw["augmenter"], pre_start_keys, IDLE if idle else name),
        "init_from": _file_digest(config.train.init_from),
    }
    if START_EPOCH in pre_start_keys:
        payload["augmenter"][START_EPOCH] = fork_epoch
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Prefix(key=key, fork_epoch=fork_epoch, trunk=trunk, method=IDLE if idle else name,
                  trains_before_start=declared.trains if declared is not None else True)


def _pre_start_identity(config: RunConfig, augmenter: dict[str, Any], keys: tuple[str, ...], name: str) -> dict[str, Any]:
    """The method's part of the key: its name (or IDLE) and the values of its pre-T keys. The head ratio is the
    resolved γ, since methods differ in their default and the loader reads the mask, not the config value."""
    values = {key: _lookup(augmenter, key) for key in keys if key != HEAD_RATIO}
    if HEAD_RATIO in keys:
        values[HEAD_RATIO] = resolve_head_ratio(config.augmenter.name, config.augmenter.head_ratio)
    return {"name": name, **values}


def loss_before(loss: dict[str, Any], fork_epoch: int) -> dict[str, Any]:
    """The loss section as epochs [0, T) see it: a DRW or DRS switch at or after T (`loss.reweight`,
    `loss.resample`) does not act there, so it is left out of the key and out of the trunk, which trains
    without it. M2m's own re-balancing replaces DRW (M2m Table 1, "LDAM + M2m"), and its run still forks the
    trunk of the LDAM-DRW baseline: both switch at T = 160. A switch before T stays in both."""
    loss = dict(loss)
    if loss["reweight"]["kind"] == "none" or loss["reweight"]["start_epoch"] >= fork_epoch:  # (kind none: the rest is inert)
        loss["reweight"] = to_dict(ReweightConfig())
    if loss["resample"]["sampler"] == "instance" or loss["resample"]["start_epoch"] >= fork_epoch:
        loss["resample"] = to_dict(ResampleConfig())
    return loss


def idle_before_start(name: str) -> bool:
    """Whether the method trains [0, T) exactly as no method does: it declares no pre-T key and trains nothing there."""
    declared = before_start_of(name)
    return declared is not None and not declared.trains and set(declared.keys) <= {HEAD_RATIO}


def baselines_share(methods: Iterable[str]) -> bool:
    """Whether runs without a method may find a trunk to share in a command whose runs use `methods`: only a
    deferred method that is idle before T (SAFA, M2m) trains the same [0, T) as a baseline."""
    return any(name != NO_METHOD and idle_before_start(name) for name in methods)


def method_prefix_keys(configs: Iterable[RunConfig]) -> frozenset[str]:
    """The prefix keys of the runs with a method: a baseline among `configs` shares a trunk only if its key is one."""
    return frozenset(prefix.key for config in configs if config.augmenter.name != NO_METHOD and (prefix := prefix_of(config)))


def shared_prefix_of(config: RunConfig, baseline_keys: frozenset[str] | None) -> Prefix | None:
    """`prefix_of` within one command: a baseline's prefix counts only when `baseline_keys` holds its key (None: any
    key, for a sweep whose trials are not known in advance)."""
    prefix = prefix_of(config, baseline=True)
    if prefix is not None and config.augmenter.name == NO_METHOD and baseline_keys is not None and prefix.key not in baseline_keys:
        return None
    return prefix


def loader_reads_head_mask(config: RunConfig, fork_epoch: int) -> bool:
    """Whether the train loader draws with the head mask, so with the head ratio γ, in an epoch before T.

    The engine hands every loader the method's head mask; a sampler registered with `reads_head_mask`
    (`head_tail`) draws from it once the DRS schedule (`loss.resample`) switches to it. A method's own
    sampler choice before T is the method's to declare (LCReg's second stage); idle methods have none.
    """
    resample = config.loss.resample
    return resample.start_epoch < fork_epoch and bool(SAMPLERS.get(resample.sampler).meta.get("reads_head_mask"))


def _leaf_keys(tree: dict[str, Any], parent: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        path = f"{parent}{name}"
        keys.extend(_leaf_keys(value, f"{path}.") if isinstance(value, dict) else [path])
    return [key for key in keys if key not in ("name", START_EPOCH)]


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    value: Any = tree
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"declared pre-start key 'augmenter.{dotted}' is not in the config")
        value = value[part]
    return value


def _versions() -> dict[str, str]:
    """The code that trains the prefix: a cached prefix from another ltsearch or torch is never reused."""
    import torch

    from ltsearch import __version__

    return {"ltsearch": __version__, "torch": torch.__version__}


def _file_digest(location: str | None) -> str | None:
    """`train.init_from` by content, not by path: the same path may later hold another network."""
    if location is None:
        return None
    path = Path(location)
    path = path / "checkpoint.pt" if path.is_dir() else path
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
