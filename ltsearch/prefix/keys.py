"""Which runs share a training prefix: the prefix key and the fork epoch of a run config.

RSG, SAFA and M2m are idle until T_th (80 % of the LDAM-DRW recipe). Two runs whose configs agree on
everything that can change epochs [0, T) train those epochs identically, bit for bit: the backbone,
optimiser, loader and global RNG see the same inputs, and the method's own random stream and
construction are separate streams (`ltsearch._runtime.RngStream`). What "everything" is comes from the
run config minus the method's post-T knobs, which each method declares in its registration
(`BeforeStart`, see `ltsearch.augmenters.base`). The fork epoch T is not part of the key unless the
method declares `start_epoch`: a method idle before T idles the same way whatever T is, so runs with
T = 140 and T = 150 share one trunk that is snapshotted at both epochs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltsearch.augmenters.base import before_start_of, resolve_start_epoch
from ltsearch.config import RunConfig, to_dict
from ltsearch.registry import SAMPLERS

#: bump when what a prefix checkpoint holds, or how it is trained, changes: old cache entries are then never reused
PREFIX_FORMAT = 1
START_EPOCH = "start_epoch"
HEAD_RATIO = "head_ratio"


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


def prefix_of(config: RunConfig) -> Prefix | None:
    """The run's shared prefix, or None when it has nothing to share (no method, or active from epoch 0)."""
    name = config.augmenter.name
    epochs = config.train.epochs
    fork_epoch = resolve_start_epoch(name, config.augmenter.start_epoch, epochs)
    if name == "none" or fork_epoch <= 0 or fork_epoch >= epochs:
        return None
    declared = before_start_of(name)
    raw = to_dict(config, active_only=True)
    augmenter = raw["augmenter"]
    pre_start_keys = declared.keys if declared is not None else tuple(_leaf_keys(augmenter))
    if HEAD_RATIO not in pre_start_keys and loader_reads_head_mask(config, fork_epoch):
        pre_start_keys = (*pre_start_keys, HEAD_RATIO)
    trunk = to_dict(config)
    if START_EPOCH not in pre_start_keys:
        trunk["augmenter"][START_EPOCH] = epochs - 1  # idle for every epoch a fork can start at
    payload = {
        "format": PREFIX_FORMAT,
        "versions": _versions(),
        "run": {section: values for section, values in raw.items() if section != "augmenter"},
        "augmenter": {"name": name, **{key: _lookup(augmenter, key) for key in sorted(pre_start_keys)}},
        "init_from": _file_digest(config.train.init_from),
    }
    if START_EPOCH in pre_start_keys:
        payload["augmenter"][START_EPOCH] = fork_epoch
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Prefix(key=key, fork_epoch=fork_epoch, trunk=trunk, method=name,
                  trains_before_start=declared.trains if declared is not None else True)


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
