"""What a training run yields per epoch: `EpochResult`, and `scalars`, the part of an epoch row sent to Tune.

Apart from the engine so that the Tune and ablation trainables, which import the engine only inside a
trial, can use `scalars` at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from ltsearch.engine import Trainer

#: epoch-row column: 1 on the epochs a run may select its best from (`train.select_epochs`), 0 before its method started
SELECTABLE = "selectable"


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of an epoch row (not its per-class lists, strings, None or booleans)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class EpochResult:
    """Metrics of one finished epoch; `save_checkpoint(dir)` captures the full training state after it."""

    epoch: int
    metrics: dict[str, Any]
    is_best: bool
    trainer: "Trainer" = field(repr=False)

    def scalars(self) -> dict[str, float]:
        return scalars(self.metrics)

    def save_checkpoint(self, directory: str | Path) -> Path:
        return self.trainer.save_checkpoint(directory)
