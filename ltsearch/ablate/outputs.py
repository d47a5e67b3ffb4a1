"""What an ablation leaves: the matrix in every form a paper or a notebook needs, built from the runs' own files.

Written into the ablation directory (also for a partly finished ablation, marked, and rewritten when it
is resumed): `matrix.md` (the main metric and the bACC / many / medium / few versions), `matrix.tex`
(booktabs), `matrix.html`, `matrix.parquet` (one row per cell × seed pair with every metric at its
best-val epoch, then one aggregated row per cell) and `heatmap.png`. `ltsearch report` rebuilds the same
from the directory without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltsearch.ablate.cells import read_result
from ltsearch.ablate.matrix import Matrix, RunResult, build_matrix
from ltsearch.ablate.render import aggregated_rows, heatmap_png, to_html, to_latex, to_markdown
from ltsearch.ablate.settings import Ablation, Run
from ltsearch.results import write_table

#: the long-tail versions of the matrix, next to the main metric (same split as the metric)
EXTRA_METRICS = ("bacc", "many", "medium", "few")
FILES = ("matrix.md", "matrix.tex", "matrix.html", "matrix.parquet", "heatmap.png")


@dataclass
class AblationOutcome:
    directory: str
    results: list[RunResult]
    matrices: dict[str, Matrix]
    finished: bool

    @property
    def matrix(self) -> Matrix:
        return next(iter(self.matrices.values()))


def collect(ablation: Ablation, directory: str) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """(a RunResult per run, a flat record per run for matrix.parquet) from the runs' result.json files."""
    results, records = [], []
    for run in ablation.runs:
        result = read_result(directory, run.run_id)
        status = result["status"] if result else "pending"
        metrics = {k: float(v) for k, v in ((result or {}).get("metrics") or {}).items() if _number(v)}
        results.append(RunResult(run.row, run.column, run.train_seed, run.data_seed, status, metrics if status == "completed" else {},
                                 before_method=_before_method(result)))
        records.append(_record(run, status, result, metrics))
    return results, records


def _before_method(result: dict[str, Any] | None) -> bool:
    """Whether the run's best-val epoch precedes its method's start epoch (results before this field: unknown, False)."""
    best, start = (result or {}).get("best_epoch"), (result or {}).get("method_start")
    return best is not None and start is not None and best < start


def _record(run: Run, status: str, result: dict[str, Any] | None, metrics: dict[str, float]) -> dict[str, Any]:
    result = result or {}
    return {"kind": "run", "row": run.row, "column": run.column, "train_seed": run.train_seed, "data_seed": run.data_seed,
            "run_id": run.run_id, "status": status, "epochs": result.get("epochs"), "best_epoch": result.get("best_epoch"),
            "method_start": result.get("method_start"), "select_epochs": result.get("select_epochs"),
            "before_method": _before_method(result), "error": result.get("error"),
            "legacy/best_test_top1": result.get("legacy/best_test_top1"), **metrics}


def matrices(ablation: Ablation, results: list[RunResult]) -> dict[str, Matrix]:
    """The main metric's matrix, then bACC and many/medium/few where every completed run reports them."""
    split = ablation.metric.split("/", 1)[0]
    metrics = [ablation.metric] + [f"{split}/{name}" for name in EXTRA_METRICS if f"{split}/{name}" != ablation.metric]
    completed = [r for r in results if r.status == "completed"]
    out = {}
    for metric in metrics:
        if metric != ablation.metric and (not completed or any(metric not in r.metrics for r in completed)):
            continue
        out[metric] = build_matrix(results, rows=list(ablation.rows), columns=list(ablation.column_labels), metric=metric,
                                   baseline=ablation.baseline, seeds=list(ablation.seeds), fmt=ablation.fmt)
    return out


def write_outputs(ablation: Ablation, directory: str, results: list[RunResult], records: list[dict[str, Any]],
                  tables: dict[str, Matrix]) -> dict[str, bytes]:
    """Write the five files (atomically each) and return their bytes (they are also the tracked artifacts)."""
    main = tables[ablation.metric]
    reference, source = ablation.reference or None, ablation.reference_source
    files = {
        "matrix.md": "\n".join(to_markdown(m, reference if metric == ablation.metric else None, source if metric == ablation.metric else None)
                               for metric, m in tables.items()).encode(),
        "matrix.tex": "\n".join(to_latex(m, reference if metric == ablation.metric else None, source if metric == ablation.metric else None)
                                for metric, m in tables.items()).encode(),
        "matrix.html": "\n".join(to_html(m, reference if metric == ablation.metric else None, source if metric == ablation.metric else None)
                                 for metric, m in tables.items()).encode(),
        "heatmap.png": heatmap_png(main),
    }
    for name, content in files.items():
        _atomic(Path(directory) / name, content)
    cells = [{"kind": "cell", **row} for m in tables.values() for row in aggregated_rows(m)]
    write_table(records + cells, Path(directory) / "matrix.parquet")
    files["matrix.parquet"] = (Path(directory) / "matrix.parquet").read_bytes()
    return files


def finish_ablation(ablation: Ablation, directory: str, stream: Any, live: Any = None) -> AblationOutcome:
    """Collect every run, write the matrix files, print the main matrix, and record it all in MLflow."""
    from ltsearch.ablate.tracking import record_ablation

    results, records = collect(ablation, directory)
    tables = matrices(ablation, results)
    files = write_outputs(ablation, directory, results, records, tables)
    outcome = AblationOutcome(directory, results, tables, finished=all(r.status != "pending" for r in results))
    print(to_markdown(tables[ablation.metric], ablation.reference or None, ablation.reference_source), file=stream)
    counts = {status: sum(r.status == status for r in results) for status in ("completed", "error", "pending")}
    print(f"runs: {counts['completed']} completed, {counts['error']} failed, {counts['pending']} not run; wrote "
          f"{', '.join(FILES)} in {directory}", file=stream)
    for record in records:
        if record["status"] == "error":
            print(f"  run {record['run_id']} failed: {record['error']}", file=stream)
    if not outcome.finished:
        print(f"the ablation stopped before every run ended; continue it with: ltsearch ablate --resume {directory}", file=stream)
    browse = record_ablation(ablation, directory, outcome, records, files, stream, live)
    if browse:
        print(browse, file=stream, flush=True)
    return outcome


def _atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
