"""Run-time plumbing the engine needs and no method cares about: device, lr schedule, RNG state."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import random
import sys
from typing import Any, Iterator

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


#: the Optimizer methods torch wraps in `torch._disable_dynamo` (whose first call imports torch._dynamo)
DYNAMO_GUARDED_OPTIMIZER_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


class EagerSGD(torch.optim.SGD):
    """torch's SGD, bit for bit, without importing torch._dynamo: ~1.1 s on 2 cores in every process that trains
    (each Ray trial worker, each `ltsearch train`), on the critical path of a sweep's first trial.

    torch imports torch._dynamo in two places an eager run never needs: `step` (to mark a graph break for
    torch.compile) and the first call of the methods in `DYNAMO_GUARDED_OPTIMIZER_METHODS` (to build a "never
    compile this" wrapper, cached on the plain function as `__dynamo_disable`). Nothing in ltsearch runs under
    torch.compile, so here `step` runs torch's own SGD update under no_grad, and the plain methods are cached as
    their own wrappers. A torch that changes the second falls back to its usual path (tests/test_startup.py notices);
    once torch._dynamo is imported anyway (a user's own code), its wrappers are left to build themselves.
    """

    def __init__(self, params: Any, **settings: Any):
        if "torch._dynamo" not in sys.modules:
            for name in DYNAMO_GUARDED_OPTIMIZER_METHODS:
                plain = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
                if plain is not None and not hasattr(plain, "__dynamo_disable"):
                    setattr(plain, "__dynamo_disable", plain)
        super().__init__(params, **settings)

    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():
            return _SGD_UPDATE(self, closure)


#: torch's own SGD update under its wrappers (the graph-break one, and the profiling hook torch adds to
#: `SGD.step` once any plain SGD exists), unwrapped once here so neither can import torch._dynamo
_SGD_UPDATE = inspect.unwrap(torch.optim.SGD.step)


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


def derived_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream of a run, independent of every other stream's use."""
    return int(hashlib.sha256(f"{seed}:{stream}".encode()).hexdigest()[:15], 16)


class RngStream:
    """A private stream of torch's random numbers (CPU, and the run's CUDA device when there is one).

    Inside `active()` torch's global generators draw from this stream and, on leaving, its state is kept
    and the global generators are put back exactly as they were. An augmenter's draws therefore never
    shift the backbone's (or another method's) random numbers: runs that differ only in a method's knobs
    see the same backbone stream, which is what lets a shared training prefix be forked bit-exactly.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = torch.Generator(device=device).manual_seed(seed).get_state() if device.type == "cuda" else None

    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        devices = [self._cuda_index()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, devices[0])
            try:
                yield
            finally:
                self.cpu = torch.get_rng_state()
                if self.cuda is not None:
                    self.cuda = torch.cuda.get_rng_state(devices[0])

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu.clone(), **({"cuda": self.cuda.clone()} if self.cuda is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu = state["cpu"].clone()
        if self.cuda is not None and "cuda" in state:
            self.cuda = state["cuda"].clone()
