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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
