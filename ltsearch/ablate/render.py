"""Publish an ablation `Matrix`: Markdown, LaTeX (booktabs), HTML, a heatmap PNG and flat rows for Parquet.

Conventions (the same in every text format, explained by a one-line legend under each table):

- A cell reads `80.21 ± 0.34; Δ +3.10 [+2.51, +3.69]†`: mean ± sample std over its seed pairs, then the
  paired difference to the baseline row with its 95 % paired-t interval, † when that excludes 0. One
  pair gives `Δ +3.10 (1 pair)`: no interval, never marked. The best mean per column is bold.
- n is implied (the legend states N per cell) and printed only where it differs, `(n=2/3)`, or for
  every cell with `show_n=True`. `(‡2/3 before the method)` marks a cell where that many runs selected an
  epoch before their method started (only with `train.select_epochs: all`). A cell without a completed run reads `—` (pending) or `failed`.
- Published numbers (`reference`, {row: {column: value}}, in the displayed orientation, i.e. as the
  paper prints them) go in a row `<variant> (paper)` right under the variant, so ours and theirs sit
  one above the other; `source` (required with them) is cited in the legend. They are never bold.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ltsearch.ablate.matrix import Cell, Matrix

Reference = Mapping[str, Mapping[str, float]]

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


@dataclass(frozen=True)
class _Style:
    """What differs between the text formats; the wording of cells and legend is shared."""

    escape: Callable[[str], str]
    bold: Callable[[str], str]
    pm: str
    delta: str
    dagger: str
    ddagger: str
    dash: str
    minus: str
    diff_sep: str


_MARKDOWN = _Style(lambda s: s.replace("|", r"\|"), lambda s: f"**{s}**", " ± ", "Δ", "†", "‡", "—", "-", "; ")
_LATEX = _Style(lambda s: "".join(_LATEX_SPECIALS.get(ch, ch) for ch in s), lambda s: rf"\textbf{{{s}}}",
                r" $\pm$ ", r"$\Delta$", r"$^\dagger$", r"$^\ddagger$", "---", "$-$", "; ")
_HTML = _Style(html.escape, lambda s: f"<strong>{s}</strong>", " ± ", "Δ", "†", "‡", "—", "-", "<br>")


def to_markdown(matrix: Matrix, reference: Reference | None = None, source: str | None = None, *,
                show_n: bool = False) -> str:
    """A GitHub table, its title above it in bold and its legend under it."""
    s = _MARKDOWN
    lines = [f"**{_title(matrix, s)}**", "", "| " + " | ".join(["variant", *map(s.escape, matrix.columns)]) + " |",
             "|" + "---|" * (len(matrix.columns) + 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _body(matrix, s, _check_reference(matrix, reference, source), show_n)]
    return "\n".join([*lines, "", _legend(matrix, s, source)]) + "\n"


def to_latex(matrix: Matrix, reference: Reference | None = None, source: str | None = None, *,
             show_n: bool = False) -> str:
    """A `table` float with a booktabs `tabular` (needs \\usepackage{booktabs}); the legend follows it."""
    s = _LATEX
    body = [" & ".join(cells) + r" \\" for cells in _body(matrix, s, _check_reference(matrix, reference, source), show_n)]
    return "\n".join([
        r"\begin{table}[t]", r"\centering", rf"\caption{{{_title(matrix, s)}}}",
        rf"\begin{{tabular}}{{l{'c' * len(matrix.columns)}}}", r"\toprule",
        " & ".join(["Variant", *map(s.escape, matrix.columns)]) + r" \\", r"\midrule", *body, r"\bottomrule",
        r"\end{tabular}", r"\par\smallskip{\footnotesize " + _legend(matrix, s, source) + "}", r"\end{table}",
    ]) + "\n"


def to_html(matrix: Matrix, reference: Reference | None = None, source: str | None = None, *,
            show_n: bool = False) -> str:
    """A standalone <table>: title in <caption>, legend in <tfoot>, raw per-seed values in each title attribute."""
    s = _HTML
    refs = _check_reference(matrix, reference, source)
    head = "".join(f"<th scope=\"col\">{s.escape(c)}</th>" for c in matrix.columns)
    body = []
    for texts, raw in zip(_body(matrix, s, refs, show_n), _raw_titles(matrix, refs)):
        tds = "".join(f"<td title=\"{html.escape(title)}\">{text}</td>" for text, title in zip(texts[1:], raw))
        body.append(f"<tr><th scope=\"row\">{texts[0]}</th>{tds}</tr>")
    legend = f"<tfoot><tr><td colspan=\"{len(matrix.columns) + 1}\"><small>{_legend(matrix, s, source)}</small></td></tr></tfoot>"
    return "\n".join(["<table class=\"ablation\">", f"<caption>{_title(matrix, s)}</caption>",
                      f"<thead><tr><th scope=\"col\">variant</th>{head}</tr></thead>", legend,
                      "<tbody>", *body, "</tbody>", "</table>"]) + "\n"


def aggregated_rows(matrix: Matrix) -> list[dict[str, Any]]:
    """One flat dict per cell (row-major), typed so `pyarrow.Table.from_pylist` gives stable columns."""
    rows = []
    for row in matrix.rows:
        for column in matrix.columns:
            cell = matrix.cell(row, column)
            diff = cell.diff
            rows.append({
                "row": row, "column": column, "metric": matrix.metric, "fmt": matrix.fmt,
                "higher_is_better": matrix.higher_is_better, "baseline": row == matrix.baseline,
                "n": cell.n, "expected": cell.expected, "failed": cell.failed, "pending": cell.pending,
                "mean": cell.mean, "std": cell.std, "best": cell.best,
                "diff_mean": diff.mean if diff else None, "diff_low": diff.low if diff else None,
                "diff_high": diff.high if diff else None, "diff_pairs": diff.pairs if diff else 0,
                "diff_method": diff.method if diff else None, "significant": diff.significant if diff else None,
            })
    return rows


def heatmap_png(matrix: Matrix) -> bytes:
    """Rows × columns, annotated with mean ± std and Δ; pending/failed cells grey and hatched.

    Colour is the paired Δ to the baseline, flipped so that blue is always "better" (red worse) on a
    scale symmetric around 0: columns of different datasets differ by tens of points, so colouring by
    mean would only show the datasets. Without a baseline the colour is the mean scaled within its
    column (worst 0, best 1), for the same reason.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot
    from matplotlib.patches import Rectangle

    shade, cmap, limits, label = _heat_values(matrix)
    figure, ax = pyplot.subplots(figsize=(2.0 + 2.5 * len(matrix.columns), 1.0 + 0.6 * len(matrix.rows)))
    image = ax.imshow(shade, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
    for i, row in enumerate(matrix.rows):
        for j, column in enumerate(matrix.columns):
            cell = matrix.cell(row, column)
            if math.isnan(shade[i][j]):
                hatch = "//" if cell.mean is None else None  # hatched: no value; plain grey: nothing to pair with
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e4e4e4", hatch=hatch, edgecolor="#aaaaaa"))
            red, green, blue, _ = image.cmap(image.norm(shade[i][j]))
            dark = not math.isnan(shade[i][j]) and 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            text = _cell_text(matrix, cell, _PLAIN, show_n=False).replace(_PLAIN.diff_sep, "\n")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                    fontweight="bold" if cell.best else "normal")
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, fontsize=8)
    ax.set_yticks(range(len(matrix.rows)), [_row_label(matrix, r) for r in matrix.rows], fontsize=8)
    figure.colorbar(image, ax=ax, fraction=0.04).set_label(label, fontsize=7)
    ax.set_title(_title(matrix, _PLAIN), fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


_PLAIN = _Style(lambda s: s, lambda s: s, " ± ", "Δ", "†", "‡", "—", "-", "; ")


def _heat_values(matrix: Matrix) -> tuple[list[list[float]], str, tuple[float, float], str]:
    """Colour value per cell (nan: not coloured), colormap, limits and colourbar label; + is always better."""
    sign = 1.0 if matrix.higher_is_better else -1.0
    if matrix.baseline is not None:
        shade = [[_oriented_diff(matrix, matrix.cell(r, c), sign) for c in matrix.columns] for r in matrix.rows]
        reach = max([abs(v) for line in shade for v in line if not math.isnan(v)] + [1e-9])
        return shade, "RdBu", (-reach, reach), f"Δ vs {matrix.baseline} (+ = better)"
    scaled: dict[tuple[str, str], float] = {}
    for c in matrix.columns:
        means = {r: sign * m for r in matrix.rows if (m := matrix.cell(r, c).mean) is not None}
        low, high = min(means.values(), default=0.0), max(means.values(), default=0.0)
        for r in matrix.rows:
            scaled[(r, c)] = (means[r] - low) / (high - low) if r in means and high > low else 1.0 if r in means else math.nan
    return [[scaled[(r, c)] for c in matrix.columns] for r in matrix.rows], "Blues", (0.0, 1.0), "mean scaled in column (1 = best)"


def _oriented_diff(matrix: Matrix, cell: Cell, sign: float) -> float:
    """Δ with + = better; the baseline itself is 0 where it has a value; nan where there is nothing to compare."""
    if cell.diff is not None:
        return sign * cell.diff.mean
    return 0.0 if cell.row == matrix.baseline and cell.mean is not None else math.nan


def _check_reference(matrix: Matrix, reference: Reference | None, source: str | None) -> Reference:
    """Published numbers must name their source and match the matrix, or the table would misattribute them."""
    if not reference:
        if source is not None:
            raise ValueError("source names where the reference numbers come from; pass reference with it")
        return {}
    if not source:
        raise ValueError("reference numbers need a source (paper, table) to cite in the legend")
    for row, values in reference.items():
        unknown = [c for c in values if c not in matrix.columns]
        if row not in matrix.rows or unknown:
            raise ValueError(f"reference {row!r} → {list(values)} is outside the matrix: rows {list(matrix.rows)}, "
                             f"columns {list(matrix.columns)}")
    return reference


def _body(matrix: Matrix, s: _Style, reference: Reference, show_n: bool) -> list[list[str]]:
    """Table rows as formatted strings: label first, then one per column; paper rows under their variant."""
    lines = []
    for row in matrix.rows:
        lines.append([s.escape(_row_label(matrix, row)), *(_cell_text(matrix, matrix.cell(row, c), s, show_n) for c in matrix.columns)])
        if row in reference:
            paper = reference[row]
            lines.append([s.escape(f"{row} (paper)"), *(_number(paper[c], matrix.decimals, s) if c in paper else "" for c in matrix.columns)])
    return lines


def _raw_titles(matrix: Matrix, reference: Reference) -> list[list[str]]:
    """Per-seed values at full precision for HTML title attributes, aligned with `_body`'s rows."""
    lines = []
    for row in matrix.rows:
        cells = [matrix.cell(row, c) for c in matrix.columns]
        lines.append(["; ".join(f"seeds {t},{d}: {v!r}" for (t, d), v in zip(c.seeds, c.values)) or "no completed run" for c in cells])
        if row in reference:
            lines.append([repr(reference[row][c]) if c in reference[row] else "" for c in matrix.columns])
    return lines


def _row_label(matrix: Matrix, row: str) -> str:
    return f"{row} (baseline)" if row == matrix.baseline else row


def _cell_text(matrix: Matrix, cell: Cell, s: _Style, show_n: bool) -> str:
    d = matrix.decimals
    if cell.mean is None:
        if cell.failed == cell.expected:
            return "failed"
        return s.dash + (f" ({cell.failed} failed)" if cell.failed else "")
    text = _number(cell.mean, d, s) + (s.pm + _number(cell.std, d, s) if cell.std is not None else "")
    text = s.bold(text) if cell.best else text
    notes = [f"n={cell.n}/{cell.expected}"] if cell.partial else [f"n={cell.n}"] if show_n else []
    notes += [f"{cell.failed} failed"] if cell.failed else []
    notes += [f"{s.ddagger}{cell.before_method}/{cell.n} before the method"] if cell.before_method else []
    text += f" ({', '.join(notes)})" if notes else ""
    if cell.diff is None:
        return text
    diff = cell.diff
    interval = (f" [{_number(diff.low, d, s, signed=True)}, {_number(diff.high, d, s, signed=True)}]"
                if diff.pairs >= 2 else " (1 pair)")
    return f"{text}{s.diff_sep}{s.delta} {_number(diff.mean, d, s, signed=True)}{interval}{s.dagger if diff.significant else ''}"


def _number(value: float, decimals: int, s: _Style, signed: bool = False) -> str:
    """Fixed decimals; a value that rounds to zero prints as 0 (never -0.00), with `s.minus` for negatives."""
    value = 0.0 if round(value, decimals) == 0 else value
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    return text.replace("-", s.minus)


def _title(matrix: Matrix, s: _Style) -> str:
    metric = s.escape(matrix.metric)
    shown = f"error = 100 {s.minus} {metric}" if matrix.fmt == "error" else metric
    return f"{shown} ({'higher' if matrix.higher_is_better else 'lower'} is better), test at the best-val epoch"


def _legend(matrix: Matrix, s: _Style, source: str | None) -> str:
    """One line: what every mark means, in the format's own symbols."""
    n = next(iter(matrix.cells.values())).expected
    parts = [f"mean{s.pm}sample std over the (train seed, data seed) runs of each cell, N = {n} per cell; "
             f"(n=k/{n}): partial, only k completed; {s.dash}: pending; failed: every run errored"]
    if matrix.baseline is not None:
        better = "positive" if matrix.higher_is_better else "negative"
        parts.append(f"{s.delta}: paired difference to the baseline {s.escape(matrix.baseline)} (same column, same seeds), "
                     f"a {better} {s.delta} is an improvement; {s.escape('[95% paired-t interval]')}, {s.dagger}: it excludes 0; "
                     "(1 pair): no interval")
    parts.append("bold: best mean per column. Values: test metrics at each run's best-val epoch (selected on val, never on test; "
                 "a method that starts at epoch T selects among epochs >= T unless train.select_epochs is all)")
    if any(cell.before_method for cell in matrix.cells.values()):
        parts.append(f"({s.ddagger}k/n before the method): in k of the cell's n runs the best-val epoch precedes the method's start "
                     "(train.select_epochs: all), so those values are the trunk shared with the baseline, not the method")
    if source:
        parts.append(f"(paper) rows: published numbers from {s.escape(source)}, not re-run")
    return ". ".join(parts) + "."
