"""An ablation file, parsed and validated end to end before anything starts.

    name: safa_table6
    base: ../configs/ldam_drw_cifar10.yaml      # run config(s) the rows change; sections may also be inline
    rows: {LABEL: {dotted.key: value}} | auto   # named variants, in order
    columns: {dotted.key: [values]}             # factors; their product = the columns ("cifar10/100")
    seeds: {train: [0, 1, 2], data: [0]}        # training seeds and long-tail subset seeds, apart
    metric: test/top1                           # shown at each run's best-val epoch
    format: accuracy | error
    baseline: LABEL                             # the row the others are paired against
    reference: {source: "...", LABEL: {COLUMN: number}}
    (+ resources:, checkpoint:, max_failures:, storage:, tracking: as in search files)

A run is one row × column × (train seed, data seed); its config is the base with the row's overrides,
the column's values and the two seeds written in. Every run config is built and checked against the
backbone here, so a typo in the last cell fails before the first one trains. `rows: auto` asks the
method's registration for its components (`components=` in `@AUGMENTERS.register`): the full method,
each component removed, and the method off.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltsearch.config import RUN_SECTIONS, apply_overrides, build, build_run_config, get_dotted, load_yaml_file, merge, read_yaml
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS
from ltsearch.space import apply_point
from ltsearch.tracking.settings import SECTION as TRACKING_SECTION, TrackingConfig, parse_tracking
from ltsearch.tune._names import _absolute, _join
from ltsearch.tune.settings import EXECUTION_KEYS, ExecutionConfig

ABLATION_KEYS = ("rows", "columns", "seeds", "metric", "format", "baseline", "reference")
TOP_KEYS = (*RUN_SECTIONS, *ABLATION_KEYS, *EXECUTION_KEYS, TRACKING_SECTION)
FORMATS = ("accuracy", "error")
SINGLE_COLUMN = "all"
METHOD_SECTIONS = ("augmenter", "loss")  # `augmenter.<m>.*` only on rows that select m; likewise `loss.<l>.*`


@dataclass(frozen=True)
class Run:
    """One cell × seed pair: what it is called, and the overrides that make its run config from the base."""

    row: str
    column: str
    train_seed: int
    data_seed: int
    point: dict[str, Any]
    epochs: int

    @property
    def run_id(self) -> str:
        """Stable across reruns of the same file (and changes if the row's overrides change): per-run resume keys on it."""
        digest = hashlib.sha1(json.dumps([self.row, self.column, self.point], sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{_slug(self.row)}__{_slug(self.column)}__s{self.train_seed}-d{self.data_seed}__{digest}"


@dataclass(frozen=True)
class Ablation:
    source: str
    raw: dict
    name: str
    base: dict
    rows: dict[str, dict[str, Any]]
    columns: dict[str, list[Any]]
    column_labels: tuple[str, ...]
    seeds: tuple[tuple[int, int], ...]
    metric: str
    fmt: str
    baseline: str | None
    reference: dict[str, dict[str, float]]
    reference_source: str | None
    execution: ExecutionConfig
    tracking: TrackingConfig
    runs: tuple[Run, ...]

    @property
    def total_epochs(self) -> int:
        return sum(run.epochs for run in self.runs)

    def default_dir(self, now: float | None = None) -> str:
        root = self.execution.storage or "runs"
        return _join(_absolute(root), f"{self.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")

    def describe(self) -> str:
        """What `--dry-run` and `ltsearch check` print: the matrix shape, the runs and the epochs in all."""
        return (f"{self.source}: valid ablation '{self.name}': {len(self.rows)} rows x {len(self.column_labels)} columns x "
                f"{len(self.seeds)} seed pairs = {len(self.runs)} runs, {self.total_epochs} epochs in all\n"
                f"rows: {', '.join(self.rows)}" + (f" (baseline {self.baseline})" if self.baseline else "") + "\n"
                f"columns: {', '.join(self.column_labels)}" + (f" ({' / '.join(self.columns)})" if self.columns else "") + "\n"
                f"seeds (train, data): {', '.join(f'({t}, {d})' for t, d in self.seeds)}\n"
                f"matrix metric: {self.metric} ({self.fmt}) at each run's best-val epoch")


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> Ablation:
    """Read an ablation file (`base:` a path, paths or an inline mapping), apply `--set`, validate every run."""
    raw = apply_overrides(_read(Path(path)), overrides)
    return parse_ablation(raw, source=str(path))


def parse_ablation(raw: dict, *, source: str) -> Ablation:
    try:
        return _parse(raw, source)
    except ConfigError as error:
        raise error if error.source else error.with_source(source)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("file", str(path), "an existing ablation YAML file")
    raw = load_yaml_file(path) or {}
    if isinstance(raw, dict) and isinstance(raw.get("base"), dict):  # inline base: its sections under this file's
        inline = raw.pop("base")
        return merge(inline, raw)
    return read_yaml(path)


def _parse(raw: dict, source: str) -> Ablation:
    unknown = [key for key in raw if key not in TOP_KEYS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], TOP_KEYS, n=1)
        raise ConfigError(unknown[0], raw[unknown[0]], f"a run-config section or an ablation key {list(TOP_KEYS)}",
                          hint=f"Did you mean '{near[0]}'?" if near else None)
    base = {key: copy.deepcopy(raw[key]) for key in RUN_SECTIONS if key in raw}
    execution = build(ExecutionConfig, {k: raw[k] for k in EXECUTION_KEYS if k in raw}, "")
    name = execution.name or Path(source).stem
    rows, default_baseline = _rows(raw.get("rows"), base)
    columns = _columns(raw.get("columns"))
    labels = tuple(_column_label(values) for values in _products(columns)) if columns else (SINGLE_COLUMN,)
    seeds = _seeds(raw.get("seeds"), base)
    metric = raw.get("metric", "test/top1")
    if not isinstance(metric, str) or not metric.startswith(("test/", "val/")):
        raise ConfigError("metric", metric, "a test/ or val/ metric such as test/top1, test/bacc or test/few (shown at the best-val epoch)")
    fmt = raw.get("format", "accuracy")
    if fmt not in FORMATS:
        raise ConfigError("format", fmt, f"one of {list(FORMATS)}")
    if fmt == "error" and "loss" in metric:
        raise ConfigError("format", fmt, f"'accuracy' for the loss metric {metric} (an error rate is 100 - an accuracy)")
    baseline = raw.get("baseline", default_baseline)
    if baseline is not None and baseline not in rows:
        raise ConfigError("baseline", baseline, f"one of the rows {list(rows)}")
    reference, reference_source = _reference(raw.get("reference"), rows, labels)
    runs = _runs(base, rows, columns, labels, seeds)
    return Ablation(source=source, raw=raw, name=name, base=base, rows=rows, columns=columns, column_labels=labels, seeds=seeds,
                    metric=metric, fmt=fmt, baseline=baseline, reference=reference, reference_source=reference_source,
                    execution=execution, tracking=parse_tracking(raw.get(TRACKING_SECTION)), runs=runs)


def _rows(rows: Any, base: dict) -> tuple[dict[str, dict[str, Any]], str | None]:
    if rows == "auto":
        return _auto_rows(base)
    if not isinstance(rows, dict) or not rows:
        raise ConfigError("rows", rows, "a non-empty mapping of row labels to overrides ({LABEL: {dotted.key: value}}), or 'auto'")
    out: dict[str, dict[str, Any]] = {}
    for label, overrides in rows.items():
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise ConfigError(f"rows.{label}", overrides, "a mapping of dotted config keys to values, e.g. {augmenter.name: safa}")
        out[str(label)] = dict(overrides)
    return out, None


def _auto_rows(base: dict) -> tuple[dict[str, dict[str, Any]], str]:
    """The full method, each registered component removed, and the method off (the default baseline)."""
    try:
        method = get_dotted(base, "augmenter.name")
    except KeyError:
        method = "none"
    if method == "none" or method not in AUGMENTERS:
        raise ConfigError("rows", "auto", f"a base config selecting an augmenter (augmenter.name one of {AUGMENTERS.names()})",
                          hint="Set augmenter.name in the base, or write the rows out.")
    components = AUGMENTERS.get(method).meta.get("components") or {}
    if not components:
        raise ConfigError("rows", "auto", f"an augmenter that declares its components; '{method}' declares none", hint="Write the rows out.")
    off = f"without {method}"
    rows = {method: {"augmenter.name": method}}
    rows.update({f"w/o {label}": {"augmenter.name": method, **overrides} for label, overrides in components.items()})
    rows[off] = {"augmenter.name": "none"}
    return rows, off


def _columns(columns: Any) -> dict[str, list[Any]]:
    if columns is None or columns == {}:
        return {}
    if not isinstance(columns, dict):
        raise ConfigError("columns", columns, "a mapping of dotted config keys to lists of values, e.g. {data.imbalance: [100, 50]}")
    for key, values in columns.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"columns.{key}", values, "a non-empty list of values")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"columns.{key}", values, "distinct values (a repeated value would be the same column twice)")
    return {str(k): list(v) for k, v in columns.items()}


def _products(columns: dict[str, list[Any]]) -> list[tuple[Any, ...]]:
    return list(itertools.product(*columns.values()))


def _column_label(values: tuple[Any, ...]) -> str:
    return "/".join(_value_text(v) for v in values)


def _value_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _seeds(seeds: Any, base: dict) -> tuple[tuple[int, int], ...]:
    defaults = {"train": [_dotted_or(base, "train.seed", 0)], "data": [_dotted_or(base, "data.seed", 0)]}
    if seeds is None:
        seeds = {}
    if not isinstance(seeds, dict) or any(k not in defaults for k in seeds):
        raise ConfigError("seeds", seeds, "a mapping {train: [seeds], data: [seeds]} (training seeds and long-tail subset seeds)")
    lists = {}
    for kind in ("train", "data"):
        values = seeds.get(kind, defaults[kind])
        if not isinstance(values, list) or not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) \
                or len(set(values)) != len(values):
            raise ConfigError(f"seeds.{kind}", values, "a non-empty list of distinct integers >= 0")
        lists[kind] = values
    return tuple((t, d) for d in lists["data"] for t in lists["train"])


def _dotted_or(raw: dict, key: str, default: Any) -> Any:
    try:
        return get_dotted(raw, key)
    except KeyError:
        return default


def _reference(reference: Any, rows: dict, labels: tuple[str, ...]) -> tuple[dict[str, dict[str, float]], str | None]:
    if reference is None:
        return {}, None
    if not isinstance(reference, dict):
        raise ConfigError("reference", reference, "a mapping {source: '...', ROW: {COLUMN: number}}")
    source = reference.get("source")
    if source is not None and not isinstance(source, str):
        raise ConfigError("reference.source", source, "a string naming where the numbers come from (paper, table)")
    out: dict[str, dict[str, float]] = {}
    for row, cells in reference.items():
        if row == "source":
            continue
        if row not in rows:
            raise ConfigError(f"reference.{row}", cells, f"one of the rows {list(rows)}")
        if not isinstance(cells, dict):
            raise ConfigError(f"reference.{row}", cells, "a mapping of column labels to numbers")
        for column, value in cells.items():
            label = _value_text(column) if not isinstance(column, str) else column
            if label not in labels:
                raise ConfigError(f"reference.{row}.{column}", value, f"a column label, one of {list(labels)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"reference.{row}.{column}", value, "a number")
            out.setdefault(row, {})[label] = float(value)
    if out and not source:
        raise ConfigError("reference.source", source, "a string naming where the published numbers come from (paper, table)")
    if source and not out:
        raise ConfigError("reference", reference, "published numbers next to the source: {source: '...', ROW: {COLUMN: number}}")
    return out, source


def _runs(base: dict, rows: dict[str, dict[str, Any]], columns: dict[str, list[Any]], labels: tuple[str, ...],
          seeds: tuple[tuple[int, int], ...]) -> tuple[Run, ...]:
    from ltsearch.engine import check_compatible  # backbone-dependent checks (imports torch): only when validating

    runs = []
    products = _products(columns) if columns else [()]
    for label, overrides in rows.items():
        shared = [key for key in overrides if key in columns]
        if shared:
            raise ConfigError(f"rows.{label}.{shared[0]}", overrides[shared[0]], f"a key that is not also a column ({list(columns)})",
                              hint="A key varies either across rows or across columns, not both.")
        for column, values in zip(labels, products):
            cell = {**overrides, **dict(zip(columns, values))}
            config = _checked(base, cell, label, column)
            check_compatible(config)
            for train_seed, data_seed in seeds:
                point = {**cell, "train.seed": train_seed, "data.seed": data_seed}
                runs.append(Run(label, column, train_seed, data_seed, point, config.train.epochs))
    return tuple(runs)


def _checked(base: dict, cell: dict[str, Any], row: str, column: str) -> Any:
    """Build one cell's run config; errors name the row (and column) they come from."""
    where = f"rows.{row}" + (f" x column {column}" if column != SINGLE_COLUMN else "")
    try:
        config = build_run_config(apply_point(base, cell))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error.key}", error.value, error.expected, hint=error.hint) from None
    for section in METHOD_SECTIONS:
        chosen = getattr(config, section).name
        for key in cell:
            parts = key.split(".")
            if len(parts) > 2 and parts[0] == section and parts[1] != chosen and parts[1] != "name" and not _is_field(config, section, parts[1]):
                raise ConfigError(f"{where}: {key}", cell[key], f"a key of the row's {section} '{chosen}' ({section}.{chosen}.*)",
                                  hint=f"Set {section}.name={parts[1]} in this row, or drop the key.")
    return config


def _is_field(config: Any, section: str, name: str) -> bool:
    return name in getattr(config, section).__dataclass_fields__


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "x"
