"""Evaluation metrics for long-tailed classification: top-1, balanced accuracy, geometric mean, shot groups.

On a balanced test split top-1 and balanced accuracy coincide; on an imbalanced one (a val split held
out of the long-tailed train pool) only the per-class means say how the tail does, so all are reported.

Many/medium/few follow the decoupling-style split by training count: many > 100, medium 20..100
(both ends included), few < 20. (OLTR's `shot_acc` puts 100 in many and 20 in few instead.)

A class with no evaluation sample has no recall: it is left out of `bacc`, `gm` and the groups, and
its `per_class` entry is None, so a partial split does not count as a 0 % class.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MANY_SHOT_ABOVE = 100  # train count > 100: many-shot
FEW_SHOT_BELOW = 20  # train count < 20: few-shot; 20..100 inclusive: medium-shot


def _group_masks(train_counts: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "many": train_counts > MANY_SHOT_ABOVE,
        "medium": (train_counts >= FEW_SHOT_BELOW) & (train_counts <= MANY_SHOT_ABOVE),
        "few": train_counts < FEW_SHOT_BELOW,
    }


def class_groups(train_counts: torch.Tensor | list[int]) -> dict[str, list[int]]:
    """Class indices of the many/medium/few groups, by training count (thresholds in the module docstring)."""
    counts = torch.as_tensor(train_counts)
    return {name: torch.nonzero(mask).flatten().tolist() for name, mask in _group_masks(counts).items()}


def _percent_or_none(value: torch.Tensor) -> float | None:
    return None if bool(value.isnan()) else 100.0 * value.item()


def _geometric_mean(recalls: torch.Tensor) -> torch.Tensor:
    """exp(mean log r) in float64; exactly 0 when any recall is 0 (log 0 = −inf makes the mean −inf)."""
    return recalls.log().mean().exp()


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           train_counts: torch.Tensor | list[int]) -> dict[str, Any]:
    """Metrics (in %) of predicted class indices `preds` against `labels`, both (N,) integer tensors.

    Keys: `top1`, `bacc` (mean per-class recall), `gm` (geometric mean of per-class recalls, Branco et
    al.), `many`/`medium`/`few` (mean per-class recall within a group, None for a group with no
    evaluated class), `num_many`/`num_medium`/`num_few` (how many evaluated classes each mean covers)
    and `per_class` (recall of every class, None where the class has no evaluation sample).
    """
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    counts = torch.as_tensor(train_counts, device=labels.device)
    if preds.shape != labels.shape or labels.dim() != 1 or labels.numel() == 0:
        raise ValueError("preds and labels must be non-empty 1-D tensors of one shape, "
                         f"got {tuple(preds.shape)} and {tuple(labels.shape)}")
    if counts.shape != (num_classes,):
        raise ValueError(f"train_counts must have one entry per class ({num_classes}), got shape {tuple(counts.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")

    correct = preds == labels
    support = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[correct], minlength=num_classes).double()
    evaluated = support > 0
    recall = torch.where(evaluated, hits / support.clamp_min(1.0), torch.full_like(support, float("nan")))

    metrics: dict[str, Any] = {
        "top1": 100.0 * correct.double().mean().item(),
        "bacc": 100.0 * recall[evaluated].mean().item(),
        "gm": 100.0 * _geometric_mean(recall[evaluated]).item(),
    }
    for name, mask in _group_masks(counts).items():
        members = mask & evaluated
        metrics[name] = _percent_or_none(recall[members].mean())
        metrics[f"num_{name}"] = int(members.sum())
    metrics["per_class"] = [None if math.isnan(r) else 100.0 * r for r in recall.tolist()]
    return metrics
