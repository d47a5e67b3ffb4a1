"""Ablation matrix: statistics checked against hand arithmetic, then every published format."""

from __future__ import annotations

import io
import math
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ltsearch.ablate.matrix import RunResult, build_matrix
from ltsearch.ablate.outputs import write_outputs
from ltsearch.ablate.render import aggregated_rows, heatmap_png, to_html, to_latex, to_markdown
from ltsearch.ablate.settings import parse_ablation

SEEDS = [(0, 10), (1, 11), (2, 12)]
BASE, SAFA, NO_LR = "LDAM-DRW", "SAFA", "w/o L_r"
A, B = "cifar10/100", "cifar10/50"
# test/top1 per seed pair (SEEDS order); None: pending, "error": errored.
VALUES = {
    (BASE, A): [77.0, 77.6, 76.8], (SAFA, A): [80.1, 80.5, 79.9],
    (BASE, B): [81.2, 81.0, 81.5], (SAFA, B): [81.0, 81.6, 80.9],
}
SOURCE = "Cao et al. 2019, Table 2 & 50% #"


def runs(values: dict, metric: str = "test/top1") -> list[RunResult]:
    out = []
    for (row, column), per_seed in values.items():
        for (train, data), value in zip(SEEDS, per_seed):
            if value is None:
                out.append(RunResult(row, column, train, data, "pending", {}))
            elif value == "error":
                out.append(RunResult(row, column, train, data, "error", {}))
            else:
                out.append(RunResult(row, column, train, data, "completed", {metric: value, "val/top1": value + 1}))
    return out


def matrix(values: dict = VALUES, rows=(BASE, SAFA), columns=(A, B), baseline: str | None = BASE,
           metric: str = "test/top1", **kwargs):
    return build_matrix(runs(values, metric), rows=rows, columns=columns, metric=metric, baseline=baseline,
                        seeds=SEEDS, **kwargs)


def test_mean_std_and_paired_t_interval_match_hand_arithmetic():
    m = matrix()
    safa = m.cell(SAFA, A)
    mean = (80.1 + 80.5 + 79.9) / 3
    std = math.sqrt(((80.1 - mean) ** 2 + (80.5 - mean) ** 2 + (79.9 - mean) ** 2) / (3 - 1))
    assert safa.values == (80.1, 80.5, 79.9) and safa.seeds == tuple(SEEDS)
    assert safa.mean == pytest.approx(mean, abs=1e-12) and safa.std == pytest.approx(std, abs=1e-12)
    # Paired differences, seed by seed: 80.1-77.0, 80.5-77.6, 79.9-76.8.
    d = [3.1, 2.9, 3.1]
    d_mean = sum(d) / 3
    d_sd = math.sqrt(sum((x - d_mean) ** 2 for x in d) / 2)
    p = 0.975  # Student t with 2 degrees of freedom has a closed-form quantile: (2p-1)/sqrt(2p(1-p)).
    t = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert t == pytest.approx(4.302653, abs=1e-6)  # the printed t-table value
    half = t * d_sd / math.sqrt(3)
    diff = safa.diff
    assert diff.pairs == 3 and diff.method == "paired t, 95%"
    assert diff.mean == pytest.approx(d_mean, abs=1e-9)
    assert (diff.low, diff.high) == (pytest.approx(d_mean - half, abs=1e-9), pytest.approx(d_mean + half, abs=1e-9))
    assert diff.significant  # [2.75, 3.32] excludes 0
    other = m.cell(SAFA, B).diff  # -0.2, +0.6, -0.6: the interval straddles 0
    assert other.mean == pytest.approx((-0.2 + 0.6 - 0.6) / 3, abs=1e-9) and other.low < 0 < other.high
    assert not other.significant
    assert m.cell(BASE, A).diff is None and m.cell(BASE, A).mean == pytest.approx((77.0 + 77.6 + 76.8) / 3)
    assert m.cell(SAFA, A).best and not m.cell(BASE, A).best
    assert m.cell(BASE, B).best and not m.cell(SAFA, B).best  # 81.23 vs 81.17
    assert m.higher_is_better and m.decimals == 2


def test_partial_pending_and_failed_cells():
    values = {**VALUES, (SAFA, A): [80.1, None, "error"], (SAFA, B): ["error"] * 3,
              (NO_LR, A): [None, None, None], (NO_LR, B): [None, "error", None]}
    m = matrix(values, rows=(BASE, SAFA, NO_LR))
    partial = m.cell(SAFA, A)
    assert (partial.n, partial.expected, partial.failed, partial.pending, partial.partial) == (1, 3, 1, 1, True)
    assert partial.mean == 80.1 and partial.std is None
    assert partial.diff.pairs == 1 and partial.diff.mean == pytest.approx(80.1 - 77.0)
    assert m.cell(SAFA, B).mean is None and m.cell(SAFA, B).failed == 3 and m.cell(SAFA, B).diff is None
    assert not m.cell(SAFA, B).best and m.cell(BASE, B).best  # only cells with a value compete
    assert m.cell(NO_LR, A).pending == 3 and m.cell(NO_LR, B).failed == 1
    md = to_markdown(m)
    assert "| SAFA | **80.10** (n=1/3, 1 failed); Δ +3.10 (1 pair) | failed |" in md
    assert "| w/o L_r | — | — (1 failed) |" in md


def test_single_pair_has_no_interval_and_is_never_significant():
    values = {(BASE, A): [77.0, None, None], (SAFA, A): [80.0, 80.4, None]}
    diff = matrix(values, columns=(A,)).cell(SAFA, A).diff
    assert (diff.pairs, diff.method, diff.significant) == (1, "single pair", False)
    assert diff.low == diff.high == diff.mean == pytest.approx(3.0)
    assert "Δ +3.00 (1 pair)" in to_markdown(matrix(values, columns=(A,)))


def test_error_format_flips_values_orientation_and_diff_sign():
    m = matrix(fmt="error")
    assert m.fmt == "error" and not m.higher_is_better
    assert m.cell(SAFA, A).values == pytest.approx((100 - 80.1, 100 - 80.5, 100 - 79.9))
    assert m.cell(SAFA, A).best and m.cell(BASE, B).best  # lowest error = highest accuracy
    assert m.cell(SAFA, A).diff.mean == pytest.approx(-(3.1 + 2.9 + 3.1) / 3)  # negative Δ: an improvement
    md = to_markdown(m)
    assert "**19.83 ± 0.31**; Δ -3.03 [-3.32, -2.75]†" in md
    assert "a negative Δ is an improvement" in md and "error = 100 - test/top1 (lower is better)" in md


def test_orientation_override_and_loss_default():
    flipped = matrix(higher_is_better=False)
    assert flipped.cell(BASE, A).best and flipped.cell(SAFA, B).best
    loss = matrix(metric="val/loss")
    assert not loss.higher_is_better and loss.cell(BASE, A).best
    with pytest.raises(ValueError, match="is a loss"):
        matrix(metric="val/loss", fmt="error")


def test_ties_at_the_printed_precision_are_all_bold():
    values = {(BASE, A): [80.0, 80.2, 80.1], (SAFA, A): [80.1, 80.1, 80.1], (NO_LR, A): [80.102, 80.1, 80.1]}
    m = matrix(values, rows=(BASE, SAFA, NO_LR), columns=(A,))
    assert [m.cell(r, A).best for r in (BASE, SAFA, NO_LR)] == [True, True, True]  # 80.10, 80.10, 80.10 (80.1007)
    assert to_markdown(m).count("**80.10") == 3


def test_baseline_none_has_no_diffs():
    m = matrix(baseline=None)
    assert all(cell.diff is None for cell in m.cells.values())
    md = to_markdown(m)
    assert "Δ" not in md and "(baseline)" not in md
    assert "| SAFA | **80.17 ± 0.31** | 81.17 ± 0.38 |" in md


@pytest.mark.parametrize("change, message", [
    (dict(results=[RunResult("other", A, 0, 10, "completed", {"test/top1": 1.0})]), "outside the matrix"),
    (dict(results=[RunResult(BASE, A, 5, 10, "completed", {"test/top1": 1.0})]), "outside the matrix"),
    (dict(results=runs({(BASE, A): [1.0, None, None]}) * 2), "appears twice"),
    (dict(results=[RunResult(BASE, A, 0, 10, "completed", {"test/bacc": 1.0})]), "has no metric 'test/top1'"),
    (dict(results=[RunResult(BASE, A, 0, 10, "completed", {"test/top1": math.nan})]), "status 'error'"),
    (dict(baseline="ERM"), "baseline 'ERM' is not among rows"),
    (dict(fmt="percent"), "fmt 'percent'"),
    (dict(seeds=[(0, 10), (0, 10)]), "seeds has duplicates"),
])
def test_eager_errors(change, message):
    arguments = dict(results=[], rows=(BASE, SAFA), columns=(A, B), metric="test/top1", baseline=BASE, seeds=SEEDS)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        build_matrix(arguments.pop("results"), **arguments)


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError, match="status 'done'"):
        RunResult(BASE, A, 0, 10, "done", {})


REFERENCE = {BASE: {A: 77.03}, NO_LR: {B: 79.5}}


def ablation():
    values = {**VALUES, (NO_LR, A): [78.0, 78.9, None], (NO_LR, B): [80.0, 80.2, 80.1]}
    return matrix(values, rows=(BASE, SAFA, NO_LR))


def test_markdown_cells_bold_legend_and_reference():
    md = to_markdown(ablation(), REFERENCE, SOURCE)
    assert "| variant | cifar10/100 | cifar10/50 |" in md
    assert "| LDAM-DRW (baseline) | 77.13 ± 0.42 | **81.23 ± 0.25** |" in md
    assert "| LDAM-DRW (paper) | 77.03 |  |" in md
    assert "| SAFA | **80.17 ± 0.31**; Δ +3.03 [+2.75, +3.32]† | 81.17 ± 0.38; Δ -0.07 [-1.58, +1.45] |" in md
    assert "| 80.10 ± 0.10; Δ -1.13 [-1.89, -0.37]† |" in md  # a significant loss is marked too
    assert "| w/o L_r | 78.45 ± 0.64 (n=2/3); Δ +1.15 [-0.76, +3.06] |" in md
    assert "| w/o L_r (paper) |  | 79.50 |" in md
    legend = md.strip().splitlines()[-1]
    for phrase in ("N = 3 per cell", "(n=k/3): partial", "—: pending", "paired difference to the baseline LDAM-DRW",
                   "[95% paired-t interval], †: it excludes 0", "bold: best mean per column",
                   "best-val epoch", f"published numbers from {SOURCE}"):
        assert phrase in legend
    assert to_markdown(ablation(), show_n=True).count("(n=3)") == 5


def test_latex_booktabs_bold_and_escapes():
    tex = to_latex(ablation(), REFERENCE, SOURCE)
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"\begin{tabular}{lcc}" in tex and r"\caption{test/top1 (higher is better)" in tex
    assert r"w/o L\_r & 78.45 $\pm$ 0.64 (n=2/3); $\Delta$ +1.15 [$-$0.76, +3.06] & " in tex
    assert r"SAFA & \textbf{80.17 $\pm$ 0.31}; $\Delta$ +3.03 [+2.75, +3.32]$^\dagger$ & " in tex
    assert r"LDAM-DRW (paper) & 77.03 &  \\" in tex
    assert r"Cao et al. 2019, Table 2 \& 50\% \#" in tex and r"[95\% paired-t interval]" in tex
    assert "w/o L_r" not in tex and "%" not in tex.replace(r"\%", "")  # an unescaped % would comment out the rest


class _Cells(HTMLParser):
    """Collects each <td>'s title attribute and whether it holds a <strong>."""

    def __init__(self):
        super().__init__()
        self.titles: list[str] = []
        self.strong = 0
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "td" and "title" in dict(attrs):
            self.titles.append(dict(attrs)["title"])
        self.strong += tag == "strong"


def test_html_table_caption_strong_and_raw_titles():
    page = to_html(ablation(), REFERENCE, SOURCE)
    parser = _Cells()
    parser.feed(page)
    assert page.startswith("<table") and page.rstrip().endswith("</table>")
    assert parser.tags[:2] == ["table", "caption"] and parser.strong == 2
    assert "<strong>80.17 ± 0.31</strong><br>Δ +3.03 [+2.75, +3.32]†" in page
    assert "seeds 0,10: 80.1; seeds 1,11: 80.5; seeds 2,12: 79.9" in parser.titles
    assert f"published numbers from {SOURCE.replace('&', '&amp;')}" in page


def test_reference_needs_a_source_and_must_fit_the_matrix():
    with pytest.raises(ValueError, match="need a source"):
        to_markdown(ablation(), REFERENCE)
    with pytest.raises(ValueError, match="outside the matrix"):
        to_latex(ablation(), {"ERM": {A: 70.0}}, SOURCE)
    with pytest.raises(ValueError, match="pass reference"):
        to_html(ablation(), None, SOURCE)


@pytest.mark.parametrize("baseline", [BASE, None])
def test_heatmap_is_a_png_of_plausible_size(baseline):
    values = {**VALUES, (NO_LR, A): [78.0, None, None], (NO_LR, B): [None, None, None]}
    png = heatmap_png(matrix(values, rows=(BASE, SAFA, NO_LR), baseline=baseline))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 1_000_000
    from matplotlib import pyplot

    height, width, _ = pyplot.imread(io.BytesIO(png)).shape
    assert width > height > 150


def test_aggregated_rows_round_trip_through_the_matrix_parquet_writer(tmp_path):
    rows = aggregated_rows(ablation())
    assert len(rows) == 6 and rows[2]["row"] == SAFA and rows[2]["column"] == A
    safa = rows[2]
    assert safa["n"] == 3 and safa["best"] and safa["significant"] is True and safa["diff_pairs"] == 3
    assert safa["diff_low"] < safa["diff_mean"] < safa["diff_high"] and safa["diff_method"] == "paired t, 95%"
    assert rows[0]["baseline"] and rows[0]["diff_mean"] is None and rows[0]["significant"] is None
    # matrix.parquet as `ltsearch ablate` and `report` write it: the runs' records, then one row per cell (write_outputs
    # reads only the ablation's metric and reference; the matrix is this file's)
    settings = parse_ablation({"rows": {BASE: {}, SAFA: {}, NO_LR: {}}}, source="matrix.yaml")
    record = {"kind": "run", "row": BASE, "column": A, "train_seed": 0, "data_seed": 10, "status": "completed",
              "error": None, "test/top1": 77.0}
    files = write_outputs(settings, str(tmp_path), [], [record], {"test/top1": ablation()})
    table = pq.read_table(tmp_path / "matrix.parquet")
    assert files["matrix.parquet"] == (tmp_path / "matrix.parquet").read_bytes()
    columns = [*record, *(key for key in rows[0] if key not in record)]
    assert table.column_names == columns
    assert table.to_pylist() == [{key: row.get(key) for key in columns} for row in [record, *({"kind": "cell", **r} for r in rows)]]
    types = {name: table.schema.field(name).type for name in ("mean", "n", "significant", "baseline", "diff_mean", "test/top1")}
    assert types == {"mean": pa.float64(), "n": pa.int64(), "significant": pa.bool_(), "baseline": pa.bool_(),
                     "diff_mean": pa.float64(), "test/top1": pa.float64()}


def test_a_cell_whose_selected_epoch_precedes_its_method_is_marked_in_every_format():
    results = [RunResult(row, column, train, data, "completed", {"test/top1": value},
                         before_method=(row == SAFA and column == A and train < 2))
               for (row, column), values in VALUES.items() for (train, data), value in zip(SEEDS, values)]
    built = build_matrix(results, rows=(BASE, SAFA), columns=(A, B), metric="test/top1", baseline=BASE, seeds=SEEDS)
    assert built.cell(SAFA, A).before_method == 2 and built.cell(SAFA, B).before_method == 0
    md = to_markdown(built)
    assert "| SAFA | **80.17 ± 0.31** (‡2/3 before the method); Δ +3.03" in md
    assert "in k of the cell's n runs the best-val epoch precedes the method's start" in md.strip().splitlines()[-1]
    assert r"$^\ddagger$2/3 before the method" in to_latex(built)
    assert "‡2/3 before the method" in to_html(built)
    unmarked = to_markdown(matrix())
    assert "‡" not in unmarked and "a method that starts at epoch T selects among epochs >= T" in unmarked


def test_result_files_say_when_the_selected_epoch_precedes_the_method(tmp_path):
    from ltsearch.ablate.outputs import _before_method

    assert _before_method({"best_epoch": 22, "method_start": 23})
    assert not _before_method({"best_epoch": 23, "method_start": 23})
    assert not _before_method({"best_epoch": 3, "method_start": 0})  # no method: every epoch is its own
    assert not _before_method({"best_epoch": 3}) and not _before_method(None)  # a result from before the field
