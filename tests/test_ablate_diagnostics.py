"""`ltsearch report DIR --diagnostics`: each row's method diagnostics, averaged over the epochs where it acted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltsearch.ablate.cells import run_dir
from ltsearch.ablate.diagnostics import diagnostics_markdown, row_diagnostics
from ltsearch.ablate.settings import parse_ablation
from ltsearch.cli import main
from ltsearch.results import write_json, write_table

REPO = Path(__file__).resolve().parents[1]


def ablation(directory: Path):
    raw = {"base": None, "data": {"name": "digits"}, "train": {"epochs": 4}, "augmenter": {"start_epoch": 2},
           "rows": {"base": {"augmenter.name": "none"}, "+ SAFA": {"augmenter.name": "safa"}},
           "seeds": {"train": [0, 1], "data": [0]}, "baseline": "base", "tracking": {"enabled": False}}
    raw.pop("base")
    found = parse_ablation(raw, source=str(directory / "ablation.yaml"))
    (directory / "ablation.yaml").write_text(__import__("yaml").safe_dump(raw))
    return found


def write_run(directory: Path, run, start: int, generated: list[float] | None) -> None:
    where = run_dir(str(directory), run.run_id)
    where.mkdir(parents=True)
    rows = [{"epoch": e, "train/cls_loss": 1.0 + e, "train/top1": 10.0 * e,
             **({"aug/generated": generated[e], "train/aux/recycle": 0.5} if generated and e >= start else {})} for e in range(4)]
    write_table(rows, where / "history.parquet")
    write_json({"status": "completed", "best_epoch": 3, "method_start": start, "metrics": {"test/top1": 50.0}}, where / "result.json")


def test_diagnostics_average_the_active_epochs_of_each_run_then_the_runs(tmp_path, capsys):
    found = ablation(tmp_path)
    for run in found.runs:
        method = run.row == "+ SAFA"
        generated = [0, 0, 10.0, 20.0] if run.train_seed == 0 else [0, 0, 30.0, 50.0]
        write_run(tmp_path, run, 2 if method else 0, generated if method else None)
    by_name = {(d.row, d.name): d for d in row_diagnostics(found, str(tmp_path))}
    generated = by_name[("+ SAFA", "aug/generated")]
    assert generated.per_run == (15.0, 40.0) and generated.mean == 27.5 and generated.active_epochs == 2
    assert by_name[("+ SAFA", "train/cls_loss")].mean == pytest.approx(3.5)  # epochs 2 and 3 only: the method's epochs
    assert by_name[("base", "train/cls_loss")].mean == pytest.approx(2.5)    # no method: every epoch
    assert ("base", "aug/generated") not in by_name
    text = diagnostics_markdown(list(by_name.values()), list(found.rows))
    assert text.index("*base*") < text.index("*+ SAFA*") and "| aug/generated | 27.5 | 15, 40 |" in text
    assert main(["report", str(tmp_path), "--diagnostics"]) == 0
    assert "| aug/generated | 27.5 | 15, 40 |" in capsys.readouterr().out
