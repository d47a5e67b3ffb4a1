"""The links `ltsearch ui` and `ltsearch runs` print for a real multi-objective sweep and a real ablation (digits, real
Ray, real MLflow store), opened in headless Chromium against a real `ltsearch ui`.

- compare: MLflow's compare-runs page lists the sweep's front and best trials with their params side by side;
- trials: the saved view opens the runs table on the sweep's trials with its objectives and searched keys as columns;
- cells: the ablation's saved view groups its cells by row and column, without the shared-prefix runs, and the
  ablation's parent run is named after the ablation, not after its `--out` folder.
"""

from __future__ import annotations

import io
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _chromium import CHROMIUM, dump_dom
from mlflow.tracking import MlflowClient
from test_ui import cleanup, free_port, start_ui, stop

from ltsearch.cli import main
from ltsearch.tune import load_sweep, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (.ci/run installs Debian's chromium)")]
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"


@dataclass(frozen=True)
class Tracked:
    root: Path
    uri: str
    trials: dict[str, dict]  # run name -> {run_id, params, pareto}
    prefix_runs: list[str]  # the ablation's shared-prefix runs (children of its parent, not cells)


@pytest.fixture(scope="module")
def tracked(ray_runtime, tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    """An ablation (`--out .../out`), then a two-objective sweep, tracked into one store of their own."""
    root = tmp_path_factory.mktemp("ui-compare")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    ablation = {"name": "tiny", "base": str(REPO / "configs" / "digits.yaml"), "train": {"epochs": 2, "device": "cpu"},
                "model": {"width": 16}, "rows": {"CE": {"augmenter.name": "none"}, "SAFA": {"augmenter.name": "safa", "augmenter.start_epoch": 1}},
                "columns": {"data.imbalance": [10]}, "seeds": {"train": [0, 1], "data": [0]}, "baseline": "CE", "tracking": {"uri": uri}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(ablation, sort_keys=False))
    assert main(["ablate", str(root / "tiny.yaml"), "--out", str(root / "out")]) == 0
    sweep = load_sweep(QUICKSTART, ["train.epochs=2", "search.num_samples=6", "search.max_concurrent=2", "scheduler={name: fifo}",
                                    "metric=[val/top1, val/few]", "mode=[max, max]", "space.model.width={choice: [16, 24]}", f"tracking.uri={uri}"])
    assert run_sweep(sweep, directory=str(root / "sweep"), stream=io.StringIO(), progress_interval_s=60).finished
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id], filter_string="tags.`ltsearch.kind` = 'trial'")
    trials = {r.info.run_name: {"run_id": r.info.run_id, "params": r.data.params, "pareto": r.data.tags["ltsearch.pareto"] == "true"}
              for r in runs}
    prefixes = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], filter_string="tags.`ltsearch.kind` = 'prefix'")
    return Tracked(root, uri, trials, [r.info.run_name for r in prefixes])


def test_compare_link_and_saved_view_show_the_sweeps_trials_with_their_params(tracked: Tracked, tmp_path: Path) -> None:
    port = free_port()
    ui = start_ui("--port", str(port), "--set", f"tracking.uri={tracked.uri}", cwd=tmp_path)
    try:
        view = ui.wait_for(r"^  trials:\s+(\S+)\s+\(metrics and searched keys as columns\)").group(1)
        compare = ui.wait_for(r"^  compare:\s+(\S+)\s+\(the Pareto front \((\d+)\)")
        base = f"http://127.0.0.1:{port}"
        assert view.startswith(f"{base}/#/experiments/") and "viewStateShareKey=ltsearch-" in view

        # MLflow's compare page: every trial the link names, with its sampled params side by side
        names = list(tracked.trials)
        dom = dump_dom(compare.group(1), expect=(*names, "Parallel Coordinates Plot"), screenshot_path=tmp_path / "compare.png",
                       window=(1600, 1400))
        assert f"Comparing {len(names)} Runs from 1 Experiment" in dom
        assert all(name in dom for name in names) and "Parallel Coordinates Plot" in dom
        for name, trial in tracked.trials.items():
            assert trial["params"]["optim.lr"] in dom and trial["params"]["loss.name"] in dom
        front = [name for name, trial in tracked.trials.items() if trial["pareto"]]
        assert int(compare.group(2)) == len(front) and front

        # the saved view: the sweep's trials only, its objectives and searched keys as columns, no error about the view
        dom = dump_dom(view, expect=(*names, "best/val/few"), screenshot_path=tmp_path / "view.png")
        assert all(name in dom for name in names) and "tiny" not in dom
        assert all(column in dom for column in ("best/val/top1", "best/val/few", "best/test/few", "optim.lr", "loss.name"))
        assert "Error loading shared view" not in dom and "sweep: trials" in dom
        stop(ui, signal.SIGINT, port)
    finally:
        cleanup(ui, port)


def test_ablation_link_groups_cells_by_row_and_the_parent_is_named_after_the_ablation(tracked: Tracked, tmp_path: Path, capsys) -> None:
    assert main(["runs", "tiny", "--set", f"tracking.uri={tracked.uri}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ablation tiny (out) (")  # named after the ablation; the --out folder follows it
    cells = re.search(r"^  cells:\s+(\S+)\s+\(grouped by row and column", captured.err, re.M).group(1)
    port = free_port()
    cells = cells.replace("http://127.0.0.1:5000", f"http://127.0.0.1:{port}")
    ui = start_ui("--port", str(port), "--set", f"tracking.uri={tracked.uri}", cwd=tmp_path)
    try:
        ui.wait_for(r"^  run:\s+http://")
        dom = dump_dom(cells, expect=("Group: ", "SAFA | 10 | seed 0/0"), screenshot_path=tmp_path / "cells.png")
        assert dom.count("Group: ") >= 2 and "(average)" in dom  # one group per row x column, showing the mean of its seeds
        assert all(f"{row} | 10 | seed {seed}/0" in dom for row in ("CE", "SAFA") for seed in (0, 1))
        assert "best/test/top1" in dom and "ltsearch.row" in dom
        assert tracked.prefix_runs and "shared prefix" not in dom  # the trunks' runs are children too, but hold no cell
        stop(ui, signal.SIGTERM, port)
    finally:
        cleanup(ui, port)
