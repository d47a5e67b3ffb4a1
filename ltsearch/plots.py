"""Figures the tracking layer attaches to runs (PNG bytes, rendered off-screen with matplotlib's Agg).

- `per_class_plot`: the accuracy of every class at the selected epoch against its training count, classes
  ordered head to tail. A mean accuracy hides the tail; this is the figure long-tail papers draw to show it.
- `search_plot`: the objective against each searched key, one panel per key, so the shape of the response
  (and which keys matter) is visible without exporting the trials table.
- `pareto_plot`: a multi-objective sweep's trials in objective space, its front numbered as `pareto/NN.yaml`
  (2 objectives: a scatter; 3 or more: parallel coordinates, where a scatter cannot show them).
- `importance_plot`: each searched key's importance per objective, from two evaluators side by side.
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


FRONT_COLOUR = "#c44e52"
OTHER_COLOUR = "#9a9a9a"


def pareto_plot(points: Sequence[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str], title: str) -> bytes:
    """Trials in objective space: `points` are {values, label (front point number or None), eligible}.

    Two objectives: a scatter of every trial, dominated ones grey, trials stopped early hollow (not eligible for
    the front), the front red, numbered and joined by its staircase. Three or more: parallel coordinates, one
    axis per objective scaled to the trials' range with better up (a `min` objective is flipped), the front's
    lines red and numbered at the right, the others grey.
    """
    if len(metrics) == 2:
        return _pareto_scatter(points, metrics, modes, title)
    return _pareto_parallel(points, metrics, modes, title)


def _pareto_scatter(points: Sequence[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str], title: str) -> bytes:
    figure, axes = _figure(6.4, 4.8)
    ax = axes[0][0]
    for point in points:
        x, y = point["values"]
        if point["label"] is None:
            ax.scatter([x], [y], s=26, facecolors=OTHER_COLOUR if point["eligible"] else "none", edgecolors=OTHER_COLOUR, zorder=2)
    front = sorted((p for p in points if p["label"] is not None), key=lambda p: p["values"][0])
    if front:
        xs, ys = [p["values"][0] for p in front], [p["values"][1] for p in front]
        # the boundary of what the front dominates: between two points it holds the value of the one better on x
        ax.step(xs, ys, where="pre" if modes[0] == "max" else "post", color=FRONT_COLOUR, alpha=0.5, lw=1, zorder=1)
        ax.scatter(xs, ys, s=40, color=FRONT_COLOUR, zorder=3)
        for values, label in _merged_labels(front, lambda p: tuple(p["values"])).items():
            ax.annotate(label, values, textcoords="offset points", xytext=(4, 4), fontsize=8, color=FRONT_COLOUR)
    ax.set_xlabel(f"{metrics[0]} ({'higher' if modes[0] == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{metrics[1]} ({'higher' if modes[1] == 'max' else 'lower'} is better)")
    ax.set_title(f"{title}\nfront: {len(front)} of {len(points)} trials (red; grey: dominated; hollow: stopped early)", fontsize=9)
    ax.grid(alpha=0.3)
    return _png(figure)


def _pareto_parallel(points: Sequence[dict[str, Any]], metrics: Sequence[str], modes: Sequence[str], title: str) -> bytes:
    figure, axes = _figure(max(6.0, 2.2 * len(metrics)), 4.6)
    ax = axes[0][0]
    columns = list(zip(*[p["values"] for p in points])) if points else [() for _ in metrics]
    bounds = [(min(c), max(c)) if c else (0.0, 1.0) for c in columns]

    def scaled(values: Sequence[float]) -> list[float]:
        out = []
        for value, (low, high), mode in zip(values, bounds, modes):
            share = 0.5 if high == low else (value - low) / (high - low)
            out.append(share if mode == "max" else 1.0 - share)
        return out

    positions = list(range(len(metrics)))
    for point in sorted(points, key=lambda p: p["label"] is not None):  # the front is drawn last, on top
        on_front = point["label"] is not None
        ax.plot(positions, scaled(point["values"]), color=FRONT_COLOUR if on_front else OTHER_COLOUR, lw=1.6 if on_front else 0.8,
                alpha=0.9 if on_front else 0.5, ls="-" if point["eligible"] or on_front else ":")
    labels = _merged_labels([p for p in points if p["label"] is not None], lambda p: scaled(p["values"])[-1])
    floor = -math.inf
    for end, label in sorted(labels.items()):  # at the last axis, bottom to top, never on top of each other
        floor = max(end, floor + 0.05)
        ax.text(positions[-1] + 0.04, floor, label, fontsize=8, color=FRONT_COLOUR, va="center")
    for position, (low, high), mode in zip(positions, bounds, modes):
        ax.axvline(position, color="#444", lw=0.8)
        best, worst = (high, low) if mode == "max" else (low, high)
        ax.text(position, 1.07, f"{best:.4g}", ha="center", fontsize=8)
        ax.text(position, -0.07, f"{worst:.4g}", ha="center", va="top", fontsize=8)
    ax.set_xticks(positions, [f"{m} ({d})" for m, d in zip(metrics, modes)], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_xlim(-0.3, len(metrics) - 0.5)
    front = sum(p["label"] is not None for p in points)
    ax.set_title(f"{title}\nfront: {front} of {len(points)} trials (red); each axis spans the trials' values, better up", fontsize=9)
    return _png(figure)


def _merged_labels(points: Sequence[dict[str, Any]], where: Any) -> dict[Any, str]:
    """Front points drawn at one place share one label ("01, 02"): a configuration proposed twice trains to equal values."""
    merged: dict[Any, list[str]] = {}
    for point in points:
        merged.setdefault(where(point), []).append(point["label"])
    return {place: ", ".join(sorted(labels)) for place, labels in merged.items()}


def importance_plot(rows: Sequence[dict[str, Any]], metrics: Sequence[str], evaluators: Sequence[str], title: str) -> bytes:
    """One panel per objective: a horizontal bar per searched key and evaluator.

    `rows` are {label, <evaluator> <metric>: importance or None}; labels keep the table's order (most important
    first on the first objective). A key without a value (too few trials sampled it) has no bar.
    """
    labels = [row["label"] for row in rows]
    figure, axes = _figure(min(5.0 * len(metrics), 16.0), max(2.4, 0.42 * len(labels) + 1.2), ncols=len(metrics))
    colours = ["#4c72b0", "#dd8452", "#55a868"]
    height = 0.8 / max(1, len(evaluators))
    for ax, metric in zip(axes[0], metrics):
        for offset, (evaluator, colour) in enumerate(zip(evaluators, colours)):
            values = [row.get(f"{evaluator} {metric}") for row in rows]
            ax.barh([i + offset * height for i in range(len(labels))], [v or 0.0 for v in values], height=height, color=colour,
                    label=evaluator)
        ax.set_yticks([i + height * (len(evaluators) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("importance", fontsize=9)
        ax.set_title(metric, fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="upper right", fontsize=8, ncol=len(evaluators), frameon=False)
    figure.suptitle(title, fontsize=10, x=0.02, ha="left")
    return _png(figure)
