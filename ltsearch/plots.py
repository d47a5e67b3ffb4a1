"""Figures the tracking layer attaches to runs (PNG bytes, rendered off-screen with matplotlib's Agg).

- `per_class_plot`: the accuracy of every class at the selected epoch against its training count, classes
  ordered head to tail. A mean accuracy hides the tail; this is the figure long-tail papers draw to show it.
- `search_plot`: the objective against each searched key, one panel per key, so the shape of the response
  (and which keys matter) is visible without exporting the trials table.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from ltsearch.metrics import FEW_SHOT_BELOW, MANY_SHOT_ABOVE


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot

    return pyplot.subplots(1, ncols, figsize=(width, height), squeeze=False)


def _png(figure: Any) -> bytes:
    from matplotlib import pyplot

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def per_class_plot(per_class: Sequence[float | None], class_counts: Sequence[int], title: str) -> bytes:
    """Bars: accuracy (%) per class, head to tail; line (right axis, log): training images per class.

    Classes are ordered by training count (descending, ties by index). The many/medium/few groups of
    `metrics.py` are shaded, so the tail's share of the error is visible at a glance. A class with no
    evaluation image (None) is drawn as a gap.
    """
    if len(per_class) != len(class_counts) or not per_class:
        raise ValueError(f"per_class ({len(per_class)}) and class_counts ({len(class_counts)}) must be non-empty and of one length")
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    accuracy = [per_class[c] for c in order]
    counts = [class_counts[c] for c in order]
    figure, axes = _figure(max(6.0, min(16.0, 0.12 * len(order) + 4.0)), 3.8)
    ax = axes[0][0]
    positions = list(range(len(order)))
    ax.bar(positions, [a if a is not None else 0.0 for a in accuracy], color=["#4c72b0" if a is not None else "none" for a in accuracy])
    for low, high, label, colour in _group_spans(counts):
        ax.axvspan(low - 0.5, high + 0.5, color=colour, alpha=0.08, lw=0)
        ax.text((low + high) / 2, 101, label, ha="center", va="bottom", fontsize=8, color="#444")
    ax.set_ylim(0, 108)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("class, by training frequency (head → tail)")
    if len(order) <= 20:
        ax.set_xticks(positions, [str(c) for c in order], fontsize=8)
    twin = ax.twinx()
    twin.plot(positions, counts, color="#dd8452", marker="." if len(order) <= 50 else None)
    twin.set_yscale("log")
    twin.set_ylabel("training images", color="#dd8452")
    ax.set_title(title, fontsize=9)
    return _png(figure)


def _group_spans(counts: Sequence[int]) -> list[tuple[int, int, str, str]]:
    """Contiguous [first, last] positions of many/medium/few classes in a head-to-tail ordering."""
    def group(n: int) -> str:
        return "many" if n > MANY_SHOT_ABOVE else "few" if n < FEW_SHOT_BELOW else "medium"

    spans: list[tuple[int, int, str, str]] = []
    colours = {"many": "#55a868", "medium": "#ccb974", "few": "#c44e52"}
    for position, n in enumerate(counts):
        name = group(n)
        if spans and spans[-1][2] == name:
            spans[-1] = (spans[-1][0], position, name, colours[name])
        else:
            spans.append((position, position, name, colours[name]))
    return spans


def search_plot(trials: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> bytes:
    """One panel per searched key: each trial's best `metric` against the key's value.

    `trials` are rows of trials.parquet (`best/<metric>`, `status` and one column per key). Numbers go on
    a numeric axis (log when they span more than two decades, as learning rates do); anything else is
    categorical. Stopped-early trials are hollow; failed trials have no value and are left out.
    """
    keys = list(keys) or ["trial_id"]
    figure, axes = _figure(min(4.0 * len(keys), 16.0), 3.4, ncols=len(keys))
    for ax, key in zip(axes[0], keys):
        points = [(row.get(key), row.get(f"best/{metric}"), row.get("status")) for row in trials if row.get(f"best/{metric}") is not None]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
        labels = sorted({str(x) for x, _, _ in points}) if not numeric else []
        for x, y, status in points:
            position = x if numeric else labels.index(str(x))
            filled = status != "stopped"
            ax.scatter([position], [y], s=28, facecolors="#4c72b0" if filled else "none", edgecolors="#4c72b0")
        if numeric and points and min(x for x, _, _ in points) > 0 and _decades([x for x, _, _ in points]) > 2:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel(f"best {metric}", fontsize=9)
    figure.suptitle(f"{len(trials)} trials (hollow: stopped early)", fontsize=10)
    return _png(figure)


def _decades(values: Sequence[float]) -> float:
    low, high = min(values), max(values)
    return math.log10(high / low) if low > 0 else 0.0
