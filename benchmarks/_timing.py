"""Step timing shared by the benchmarks: exactly the engine's `train_step`, device-synchronised."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ltsearch.engine import Trainer


def endless_batches(trainer: Trainer, sampler: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's own loader, epoch after epoch, so a timed round never runs dry."""
    while True:
        yield from trainer.loader.epoch(sampler)


def time_steps(trainer: Trainer, batches: Iterator, class_weights: torch.Tensor | None, steps: int) -> float:
    """Seconds for `steps` full training steps (next batch + forward + backward + update)."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        trainer.train_step(x, y, class_weights)
    sync()
    return time.perf_counter() - start
