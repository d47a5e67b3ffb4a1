"""Run-time plumbing the engine needs and no method cares about: device, lr schedule, RNG state."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from ltsearch.config import ScheduleConfig
from ltsearch.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "'cpu' or 'auto' (no CUDA device is visible)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def learning_rate(schedule: ScheduleConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """lr for 0-indexed `epoch`: LDAM-DRW warmup (e = epoch+1; base·e/W while e <= W), then step or cosine."""
    e = epoch + 1
    if schedule.warmup_epochs and e <= schedule.warmup_epochs:
        return base_lr * e / schedule.warmup_epochs
    if schedule.name == "step":
        factor = 1.0
        for milestone, value in zip(schedule.milestones, schedule.factors):
            if epoch >= milestone:
                factor = value
        return base_lr * factor
    if schedule.name == "cosine":
        span = max(1, epochs - schedule.warmup_epochs)
        progress = (epoch - schedule.warmup_epochs) / span
        return base_lr * (schedule.min_factor + (1 - schedule.min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return base_lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain data (no numpy arrays), so a checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": legacy["bit_generator"], "key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"]),
                  "has_gauss": int(legacy["has_gauss"]), "gauss": float(legacy["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; also reads format-1 checkpoints (numpy's state as its legacy tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = {"bit_generator": numpy_state["bit_generator"], "state": {"key": np.asarray(numpy_state["key"], dtype=np.uint32),
                       "pos": numpy_state["pos"]}, "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
