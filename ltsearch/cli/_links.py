"""The links `ltsearch ui` and `ltsearch runs` print for a sweep's or an ablation's children (shared by both commands)."""

from __future__ import annotations

from ltsearch.tracking import server
from ltsearch.tracking.browse import TopRun
from ltsearch.tracking.settings import PARENT_KINDS


def children_links(base: str, top: TopRun) -> list[str]:
    """A parent's children: its saved view (a sweep's trials with their metrics and keys as columns; an ablation's cells
    grouped by row and column), else the plain filtered table; and a sweep's compare page. Nothing for a train run."""
    if top.kind not in PARENT_KINDS:
        return []
    noun = "trials" if top.kind == "sweep" else "cells"
    if top.view is not None:
        shown = "metrics and searched keys as columns" if top.kind == "sweep" else "grouped by row and column, the groups' means"
        lines = [f"  {noun + ':':8} {server.view_url(base, top.experiment_id, top.view)}  ({shown})"]
    else:
        lines = [f"  {noun + ':':8} {server.trials_url(base, top.experiment_id, top.run_id, top.metric, top.mode)}"]
    compared = top.compared() if top.kind == "sweep" else []
    if compared:
        front = sum(bool(child.pareto) for child in compared)
        what = f"the best {len(compared)} trials by {top.metric}" if not front else \
            f"the Pareto front ({front}) and the next best by {top.metric}, {len(compared)} trials"
        url = server.compare_url(base, [top.experiment_id], [child.run_id for child in compared])
        lines.append(f"  compare: {url}  ({what}: parallel coordinates, scatter, contour)")
    return lines
