"""Metrics on hand-built confusion examples whose values are worked out in the comments."""

from __future__ import annotations

import pytest
import torch

from ltsearch.metrics import class_groups, classification_metrics


def run(pairs: list[tuple[int, int]], train_counts: list[int]) -> dict:
    """pairs = (label, prediction) per evaluation sample."""
    labels = torch.tensor([label for label, _ in pairs])
    preds = torch.tensor([pred for _, pred in pairs])
    return classification_metrics(preds, labels, len(train_counts), torch.tensor(train_counts))


# class 0: 2/2 right, class 1: 1/2 right, class 2: 1/4 right -> recalls 1, 1/2, 1/4
UNEVEN = [(0, 0), (0, 0), (1, 1), (1, 0), (2, 2), (2, 0), (2, 1), (2, 0)]


def test_top1_and_balanced_accuracy_differ_on_an_imbalanced_eval_set():
    metrics = run(UNEVEN, [500, 50, 5])
    assert metrics["top1"] == pytest.approx(100 * 4 / 8)
    assert metrics["bacc"] == pytest.approx(100 * (1 + 0.5 + 0.25) / 3)
    assert metrics["per_class"] == pytest.approx([100.0, 50.0, 25.0])


def test_geometric_mean_of_recalls():
    # (1 · 1/2 · 1/4)^(1/3) = (1/8)^(1/3) = 1/2
    assert run(UNEVEN, [500, 50, 5])["gm"] == pytest.approx(50.0, rel=1e-12)


def test_geometric_mean_is_exactly_zero_when_a_class_is_never_recalled():
    metrics = run([(0, 0), (1, 1), (2, 0), (2, 1)], [500, 50, 5])
    assert metrics["gm"] == 0.0
    assert metrics["bacc"] == pytest.approx(200 / 3)


def test_perfect_predictions_give_exactly_one_hundred_everywhere():
    metrics = run([(0, 0), (1, 1), (1, 1), (2, 2)], [500, 50, 5])
    assert metrics["top1"] == metrics["bacc"] == metrics["gm"] == 100.0
    assert (metrics["many"], metrics["medium"], metrics["few"]) == (100.0, 100.0, 100.0)


def test_group_thresholds_put_100_and_20_in_medium():
    assert class_groups([101, 100, 20, 19]) == {"many": [0], "medium": [1, 2], "few": [3]}


def test_group_accuracies_are_means_of_per_class_accuracies():
    # recalls: class 0 (101) 1, class 1 (100) 1/2, class 2 (20) 1, class 3 (19) 0
    pairs = [(0, 0), (1, 1), (1, 0), (2, 2), (3, 0), (3, 2)]
    metrics = run(pairs, [101, 100, 20, 19])
    assert (metrics["many"], metrics["medium"], metrics["few"]) == pytest.approx((100.0, 75.0, 0.0))
    assert (metrics["num_many"], metrics["num_medium"], metrics["num_few"]) == (1, 2, 1)


def test_classes_absent_from_the_eval_split_are_left_out():
    # class 2 (the only few-shot class) has no evaluation sample
    metrics = run([(0, 0), (0, 1), (1, 1)], [500, 50, 5])
    assert metrics["per_class"][:2] == pytest.approx([50.0, 100.0]) and metrics["per_class"][2] is None
    assert metrics["bacc"] == pytest.approx(75.0)
    assert metrics["gm"] == pytest.approx(100 * 0.5 ** 0.5)
    assert metrics["few"] is None and metrics["num_few"] == 0
    assert metrics["top1"] == pytest.approx(200 / 3)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="one shape"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([0]), 2, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="one entry per class"):
        classification_metrics(torch.tensor([0]), torch.tensor([0]), 2, torch.tensor([5]))
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(torch.tensor([0]), torch.tensor([2]), 2, torch.tensor([5, 5]))
