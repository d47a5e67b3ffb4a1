"""`ltsearch ablate` on the embedded digits data through a real local Ray runtime and a real sqlite MLflow store.

The matrix must equal what the child runs in MLflow say (mean, sample std, paired-t interval recomputed
here by hand); a driver killed mid-ablation and resumed trains exactly the runs that had not ended; a seed
added to the file trains only the new runs; every shipped ablation runs on digits.
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
import yaml
from mlflow.tracking import MlflowClient
from scipy import stats

from ltsearch.ablate.runner import run_ablation
from ltsearch.ablate.settings import load_ablation
from ltsearch.cli import main
from ltsearch.registry import AUGMENTERS
from ltsearch.results import read_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ablation_files import DIGITS_OVERRIDES  # noqa: E402  (the shipped files' digits overrides live with their checks)

TINY = {
    "name": "tiny", "base": str(REPO / "configs" / "digits.yaml"),
    "train": {"epochs": 2, "device": "cpu"}, "model": {"width": 16},
    "rows": {"CE": {"loss.name": "ce"}, "LDAM": {"loss.name": "ldam", "loss.ldam.max_m": 0.5}},
    "columns": {"data.imbalance": [10, 20]},
    "seeds": {"train": [0, 1], "data": [0]},
    "baseline": "CE",
    "reference": {"source": "a made-up table", "LDAM": {10: 95.0}},
}


def write(tmp_path: Path, content: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def children(uri: str, experiment: str) -> tuple[object, list]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags["ltsearch.kind"] == "ablation"]
    return parent, [r for r in runs if r.data.tags["ltsearch.kind"] == "cell"]


@pytest.mark.slow
def test_the_matrix_is_what_the_child_runs_say(ray_runtime, tmp_path, mlflow_store):
    out = tmp_path / "out"
    outcome = run_ablation(load_ablation(write(tmp_path, TINY)), directory=str(out), stream=io.StringIO(), progress_interval_s=600)
    assert outcome.finished and all(r.status == "completed" for r in outcome.results)
    parent, cells = children(mlflow_store, "tiny")
    assert parent.info.status == "FINISHED" and len(cells) == 8
    assert all(c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in cells)
    value = {(c.data.tags["ltsearch.row"], c.data.tags["ltsearch.column"], int(c.data.tags["ltsearch.train_seed"])): c.data.metrics["best/test/top1"]
             for c in cells}
    matrix = outcome.matrix
    for row in ("CE", "LDAM"):
        for column in ("10", "20"):
            values = [value[(row, column, seed)] for seed in (0, 1)]
            cell = matrix.cell(row, column)
            assert cell.mean == pytest.approx(numpy.mean(values)) and cell.std == pytest.approx(numpy.std(values, ddof=1))
    for column in ("10", "20"):  # the paired-t interval, by hand: mean ± t_{0.975, n-1} · sd / sqrt(n)
        d = numpy.array([value[("LDAM", column, s)] - value[("CE", column, s)] for s in (0, 1)])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        diff = matrix.cell("LDAM", column).diff
        assert diff.mean == pytest.approx(d.mean()) and diff.low == pytest.approx(d.mean() - half) and diff.high == pytest.approx(d.mean() + half)
        assert diff.significant == (not diff.low <= 0 <= diff.high)
    files = {a.path for a in MlflowClient(mlflow_store).list_artifacts(parent.info.run_id)}
    assert {"matrix.md", "matrix.tex", "matrix.html", "matrix.parquet", "heatmap.png", "ablation.yaml", "matrix_cells.json"} <= files
    table = read_table(out / "matrix.parquet")
    assert sum(r["kind"] == "run" for r in table) == 8 and sum(r["kind"] == "cell" and r["metric"] == "test/top1" for r in table) == 4
    text = (out / "matrix.md").read_text()
    assert "CE (baseline)" in text and "LDAM (paper)" in text and "a made-up table" in text and "test/bacc" in text
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_killed_ablation_resumes_only_what_had_not_ended_and_new_seeds_train_alone(ray_runtime, tmp_path, mlflow_store, capsys):
    file = write(tmp_path, {**TINY, "train": {"epochs": 3, "device": "cpu"}})
    out = tmp_path / "out"
    driver = subprocess.Popen([str(Path(sys.executable).parent / "ltsearch"), "ablate", str(file), "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("runs/*/result.json")):
            assert driver.poll() is None and time.monotonic() < deadline, "the ablation ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    ended = len(list(out.glob("runs/*/result.json")))
    assert 0 < ended < 8
    assert main(["ablate", "--resume", str(out)]) == 0
    assert len(list((out / "attempt-2").glob("trial_*"))) == 8 - ended, "the resume trained only the runs without a result"
    assert len(list(out.glob("runs/*/result.json"))) == 8
    assert main(["ablate", str(file), "--set", "seeds={train: [0, 1, 2], data: [0]}", "--out", str(out)]) == 0
    assert len(list((out / "attempt-3").glob("trial_*"))) == 4, "a new seed trains one run per cell, nothing else"
    parent, cells = children(mlflow_store, "tiny")
    assert parent.info.status == "FINISHED" and len(cells) == 12
    assert len({c.data.tags["ltsearch.trial_id"] for c in cells}) == 12 and all(c.info.status == "FINISHED" for c in cells)
    printed = capsys.readouterr().out
    assert main(["report", str(out), "--format", "csv"]) == 0
    assert "CE,10,test/top1" in capsys.readouterr().out.replace('"', "")
    assert "runs: 12 completed" in printed


def test_rows_auto_is_the_method_each_component_removed_and_the_method_off(tmp_path):
    for method in (name for name in AUGMENTERS.names() if name != "none"):
        components = AUGMENTERS.get(method).meta["components"]
        file = write(tmp_path, {**{k: v for k, v in TINY.items() if k not in ("rows", "baseline", "reference")},
                                "augmenter": {"name": method, "start_epoch": 0}, "rows": "auto"}, f"{method}.yaml")
        ablation = load_ablation(file, ["augmenter.lcreg.second_stage_epochs=1"] if method == "lcreg" else [])
        assert list(ablation.rows) == [method, *(f"w/o {c}" for c in components), f"without {method}"]
        assert ablation.baseline == f"without {method}" and ablation.rows[f"without {method}"] == {"augmenter.name": "none"}
        assert len(ablation.runs) == len(ablation.rows) * 2 * 2


# Bad ablation files and arguments are refused by the rules of every command: tests/test_hardening_corpus.py (ablate-*).


def test_dry_run_prints_the_shape_runs_and_epochs(tmp_path, capsys):
    assert main(["ablate", str(write(tmp_path, TINY)), "--dry-run"]) == 0
    assert "2 rows x 2 columns x 2 seed pairs = 8 runs, 16 epochs in all" in capsys.readouterr().out
    assert main(["check", str(REPO / "ablations" / "examples" / "digits_losses.yaml")]) == 0  # README's example
    assert "3 rows x 2 columns x 3 seed pairs = 18 runs, 216 epochs in all" in capsys.readouterr().out


#: file -> the file it varies by a profile, a dataset or the recipe's length: on digits (one dataset, 2 epochs, a
#: constant lr) both train the same rows through the same code, so only the second runs here; the variant's cells
#: are still built and checked one by one in test_ablation_files
SAME_ROWS_ON_DIGITS = {"rsg_table3_step": "rsg_table3", "rsg_table5_layer_step": "rsg_table5_layer",
                       "lcreg_table7_cifar100": "lcreg_table7", "lcreg_table9_cifar100": "lcreg_table9",
                       "reproduce_cifar10_short": "reproduce_cifar10"}


@pytest.mark.parametrize("variant, twin", sorted(SAME_ROWS_ON_DIGITS.items()))
def test_a_variant_file_has_its_twins_rows(variant, twin):
    rows = {stem: list(load_ablation(REPO / "ablations" / f"{stem}.yaml", DIGITS_OVERRIDES[stem]).rows) for stem in (variant, twin)}
    assert rows[variant] == rows[twin]


@pytest.mark.cifar
@pytest.mark.parametrize("path", sorted((REPO / "ablations" / "diagnose").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_shipped_diagnosis_is_valid_and_shares_the_reproductions_trunk(path, cifar_root, capsys):
    """The diagnosis ablations fork the reproduction's trunk: one prefix for every run, as RESULTS.md says."""
    assert main(["check", str(path), "--set", f"data.root={cifar_root}"]) == 0
    out = capsys.readouterr().out
    runs = len(load_ablation(path, [f"data.root={cifar_root}"]).runs)
    assert f"shared prefixes: 1 for {runs} of {runs} runs" in out


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(set(DIGITS_OVERRIDES) - set(SAME_ROWS_ON_DIGITS)))
def test_every_shipped_ablation_runs_on_digits(ray_runtime, tmp_path, stem):
    ablation = load_ablation(REPO / "ablations" / f"{stem}.yaml", [*DIGITS_OVERRIDES[stem], "seeds={train: [0], data: [0]}"])
    outcome = run_ablation(ablation, directory=str(tmp_path / "out"), stream=io.StringIO(), progress_interval_s=600)
    assert outcome.finished
    assert [r.status for r in outcome.results] == ["completed"] * len(ablation.runs), [r for r in outcome.results if r.status != "completed"]
    assert (tmp_path / "out" / "matrix.md").read_text().count("|") > 4
