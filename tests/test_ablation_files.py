"""The shipped ablation files (ablations/*.yaml) and the augmenters' registered components.

Nothing trains for an epoch here. Every row x column of every file is built into a run config and
checked against its backbone, once as shipped and once with DIGITS_OVERRIDES (what CI passes to run
each file on the embedded digits data, which needs no files); on digits each cell's Trainer is also
constructed, which runs the checks that only an augmenter's constructor makes. The helper below
expands a file the way `ltsearch ablate` reads it (base + inline sections + `--set`, then row
overrides, column values and seeds), without depending on the ablate package.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Iterator

import pytest

from ltsearch.config import (RUN_SECTIONS, apply_overrides, build_run_config, get_dotted, read_yaml, set_dotted,
                             to_dict)
from ltsearch.registry import AUGMENTERS, LOSSES

# --set overrides that make every shipped file small and valid on digits (8x8 images, 2 epochs, CPU).
# `columns=` replaces the CIFAR columns, so `reference=null` drops the CIFAR reference cells with them.
DIGITS = ["data.name=digits", "data.imbalance=10", "data.val_fraction=0.2", "data.max_train_per_class=40",
          "model.name=small_cnn", "model.width=16", "train.epochs=2", "train.device=cpu", "optim.lr=0.05",
          "optim.batch_size=64", "optim.schedule={name: constant}", "optim.grad_clip=5.0", "loss.reweight.start_epoch=1",
          "seeds={train: [0, 1], data: [0]}", "columns={data.imbalance: [10]}", "reference=null",
          "resources.cpu=1", "resources.gpu=0"]
LCREG_ON_DIGITS = "rows.LCReg={augmenter.name: lcreg, augmenter.lcreg.latent_count: 40, augmenter.lcreg.second_stage_epochs: 1}"
PER_FILE = {
    "safa_table6": [],
    "rsg_table3": [],
    "rsg_table3_step": [],
    # the rows insert RSG / SMART at ResNet-32's boundaries 1-4; small_cnn has only 1-3
    "rsg_table5_layer": ["model.name=resnet32"],
    "rsg_table5_layer_step": ["model.name=resnet32"],
    "smart_table4": [],
    "smart_table5": ["model.name=resnet32"],
    # the preset's classifier-only second stage (10 epochs) must be shorter than the run
    "lcreg_table5_latents": ["augmenter.lcreg.second_stage_epochs=1"],
    "lcreg_table7": ["augmenter.lcreg.second_stage_epochs=1"],
    "lcreg_table7_cifar100": ["augmenter.lcreg.second_stage_epochs=1"],
    "lcreg_table9": ["augmenter.lcreg.second_stage_epochs=1"],
    "lcreg_table9_cifar100": ["augmenter.lcreg.second_stage_epochs=1"],
    "m2m_table4": [],
    # the rows insert RSG at boundary -2 and SAFA at -3: ResNet-32's stages, not small_cnn's; the LCReg row sets its
    # own length (the recipe + its second stage), so on digits it is replaced by a 2-epoch one
    "reproduce_cifar10": ["model.name=resnet32", LCREG_ON_DIGITS],
    "reproduce_cifar10_short": ["model.name=resnet32", LCREG_ON_DIGITS],
}
DIGITS_OVERRIDES = {stem: [*DIGITS, *extra] for stem, extra in PER_FILE.items()}

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "ablations"
FILES = sorted(ABLATIONS.glob("*.yaml"))
ABLATION_KEYS = ("name", "rows", "columns", "seeds", "metric", "format", "baseline", "reference",
                 "resources", "checkpoint", "max_failures", "storage", "tracking")
METHODS = [name for name in AUGMENTERS.names() if name != "none"]


# ----------------------------------------------------------------------------------------- helpers
def read_ablation(path: Path, overrides: list[str] | None = None) -> dict:
    """The file with its `base:` merged in (read_yaml follows it) and `--set` overrides applied."""
    return apply_overrides(read_yaml(path), overrides)


def run_sections(raw: dict) -> dict:
    return {key: copy.deepcopy(raw[key]) for key in RUN_SECTIONS if key in raw}


def auto_rows(base: dict) -> dict[str, dict[str, Any]]:
    """`rows: auto`: the full method, each registered component removed, and the method off."""
    method = get_dotted(base, "augmenter.name")
    rows = {method: {"augmenter.name": method}}
    for label, overrides in AUGMENTERS.get(method).meta["components"].items():
        rows[f"w/o {label}"] = {"augmenter.name": method, **overrides}
    rows[f"without {method}"] = {"augmenter.name": "none"}
    return rows


def rows_of(raw: dict) -> dict[str, dict[str, Any]]:
    rows = raw["rows"]
    return auto_rows(run_sections(raw)) if rows == "auto" else {str(label): dict(o or {}) for label, o in rows.items()}


def value_text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def columns_of(raw: dict) -> list[tuple[str, dict[str, Any]]]:
    """(label, {key: value}) per column: the cartesian product in file order, labels joined with '/'."""
    columns = raw.get("columns") or {}
    if not columns:
        return [("all", {})]
    return [("/".join(value_text(v) for v in values), dict(zip(columns, values)))
            for values in itertools.product(*columns.values())]


def seed_pairs(raw: dict) -> list[tuple[int, int]]:
    seeds = raw["seeds"]
    return [(t, d) for d in seeds["data"] for t in seeds["train"]]


def build_cell(base: dict, cell: dict[str, Any]):
    raw = copy.deepcopy(base)
    for key, value in cell.items():
        set_dotted(raw, key, value)
    return build_run_config(raw)


def cells(path: Path, overrides: list[str] | None = None) -> Iterator[tuple[str, str, dict[str, Any], Any]]:
    """(row, column, overrides, run config) for every cell, built with the first seed pair."""
    raw = read_ablation(path, overrides)
    base = run_sections(raw)
    train_seed, data_seed = seed_pairs(raw)[0]
    for row, row_overrides in rows_of(raw).items():
        for column, column_values in columns_of(raw):
            cell = {**row_overrides, **column_values}
            yield row, column, cell, build_cell(base, {**cell, "train.seed": train_seed, "data.seed": data_seed})


def check_cell(row: str, column: str, cell: dict[str, Any], config: Any) -> None:
    """Every key is a real key holding the value written, and method keys sit on rows selecting that method."""
    from ltsearch.engine import check_compatible

    check_compatible(config)
    tree = to_dict(config)
    for key, value in cell.items():
        assert get_dotted(tree, key) == value, f"{row} x {column}: {key} reads {get_dotted(tree, key)!r}, not {value!r}"
        parts = key.split(".")
        for section, registry in (("augmenter", AUGMENTERS), ("loss", LOSSES)):
            if parts[0] == section and len(parts) > 2 and parts[1] in registry.names():
                chosen = getattr(config, section).name
                assert parts[1] == chosen, f"{row} x {column}: {key} set on a row whose {section} is '{chosen}'"


# ------------------------------------------------------------------------------------- the files
def test_every_shipped_file_has_digits_overrides():
    assert FILES, "no ablation files shipped"
    assert sorted(DIGITS_OVERRIDES) == sorted(path.stem for path in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_structure(path):
    lines = path.read_text().splitlines()
    launch = f"# ltsearch ablate ablations/{path.name}"
    assert lines[0] == launch or lines[0].startswith(launch + " "), f"first line must be the launch command: {launch}"
    assert any(line.startswith("#") and "Table" in line for line in lines[1:10]), "a comment citing the table"
    raw = read_ablation(path)
    unknown = [key for key in raw if key not in (*RUN_SECTIONS, *ABLATION_KEYS)]
    assert not unknown, f"unknown top-level keys {unknown}"
    for key in ("name", "rows", "columns", "seeds", "metric", "baseline"):
        assert key in raw, f"missing '{key}'"
    assert raw["name"] == path.stem
    assert raw["metric"].startswith("test/")
    assert raw.get("format", "accuracy") in ("accuracy", "error")
    rows = rows_of(raw)
    assert raw["baseline"] in rows or raw["rows"] == "auto"
    assert set(raw["seeds"]) == {"train", "data"}
    for kind in ("train", "data"):
        values = raw["seeds"][kind]
        assert values and all(isinstance(v, int) and v >= 0 for v in values) and len(set(values)) == len(values)
    columns = raw["columns"] or {}
    for label, overrides in rows.items():
        assert not set(overrides) & set(columns), f"row {label} sets a key that is also a column"
    for key, values in columns.items():
        assert isinstance(values, list) and values and len(set(map(str, values))) == len(values), key


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_reference_names_rows_and_columns_and_a_source(path):
    raw = read_ablation(path)
    reference = raw.get("reference")
    assert isinstance(reference, dict) and isinstance(reference.get("source"), str) and reference["source"].strip()
    rows = rows_of(raw)
    labels = {label for label, _ in columns_of(raw)}
    cells_given = 0
    for row, values in reference.items():
        if row == "source":
            continue
        assert row in rows, f"reference row {row!r} is not a row"
        for column, number in values.items():
            assert value_text(column) in labels, f"reference column {column!r} of {row!r} is not a column ({sorted(labels)})"
            assert isinstance(number, (int, float)) and not isinstance(number, bool) and 0 <= number <= 100
            cells_given += 1
    assert cells_given > 0


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_cell_builds_as_shipped(path):
    raw = read_ablation(path)
    seen = 0
    for row, column, cell, config in cells(path):
        check_cell(row, column, cell, config)
        seen += 1
    assert seen == len(rows_of(raw)) * len(columns_of(raw))
    base = run_sections(raw)
    first_row = next(iter(rows_of(raw).values()))
    for train_seed, data_seed in seed_pairs(raw):  # the seeds are config keys too
        config = build_cell(base, {**first_row, "train.seed": train_seed, "data.seed": data_seed})
        assert (config.train.seed, config.data.seed) == (train_seed, data_seed)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_cell_builds_on_digits(path, tmp_path):
    from ltsearch.data import build_dataset
    from ltsearch.engine import Trainer

    datasets: dict[str, Any] = {}
    found = list(cells(path, DIGITS_OVERRIDES[path.stem]))
    assert [column for _, column, _, _ in found] == ["10"] * len(rows_of(read_ablation(path)))
    for row, column, cell, config in found:
        check_cell(row, column, cell, config)
        assert (config.data.name, config.train.epochs, config.train.device) == ("digits", 2, "cpu")
        key = repr(to_dict(config.data))
        data = datasets.setdefault(key, build_dataset(config.data))
        trainer = Trainer(config, data=data, cache_dir=tmp_path)  # builds model, augmenter, loss, loader; no step
        assert trainer.augmenter.start_epoch < config.train.epochs


# -------------------------------------------------------------------------------------- components
def default_tree(method: str) -> dict:
    return to_dict(build_run_config({"augmenter": {"name": method}}))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_declares_its_components(method):
    components = AUGMENTERS.get(method).meta.get("components")
    assert isinstance(components, dict) and components, f"{method} registers no components"
    for label, overrides in components.items():
        assert isinstance(label, str) and label.strip()
        assert isinstance(overrides, dict) and overrides
        for key in overrides:
            parts = key.split(".")
            assert parts[0] == "augmenter" and (len(parts) == 2 or parts[1] == method), \
                f"{method}.{label}: {key} is not augmenter.{method}.* or a shared augmenter key"


@pytest.mark.parametrize("method", METHODS)
def test_removing_a_component_builds_and_changes_the_config(method):
    default = default_tree(method)
    for label, overrides in AUGMENTERS.get(method).meta["components"].items():
        config = build_cell({"augmenter": {"name": method}}, overrides)
        tree = to_dict(config)
        assert config.augmenter.name == method
        for key, value in overrides.items():
            assert get_dotted(tree, key) == value
            assert get_dotted(default, key) != value, f"{method}: removing {label} leaves {key} at its default"


@pytest.mark.parametrize("method", METHODS)
def test_rows_auto_on_digits(method, tmp_path):
    """`rows: auto` over a digits base: every generated row builds a run config and a Trainer."""
    from ltsearch.engine import Trainer

    base = read_ablation(REPO / "configs" / "digits.yaml", ["train.epochs=2", "train.device=cpu", "model.width=16",
                                                             "data.max_train_per_class=40", f"augmenter.name={method}"])
    rows = auto_rows(base)
    components = AUGMENTERS.get(method).meta["components"]
    assert list(rows) == [method, *(f"w/o {label}" for label in components), f"without {method}"]
    for label, overrides in rows.items():
        config = build_cell(base, overrides)
        check_cell(label, "all", overrides, config)
        Trainer(config, cache_dir=tmp_path)


def _first_step_terms(config, tmp_path) -> set[str]:
    from ltsearch.engine import Trainer

    trainer = Trainer(config, cache_dir=tmp_path)
    sampler, class_weights = trainer.begin_epoch()
    x, y = next(iter(trainer.loader.epoch(sampler)))
    return {name.removeprefix("aux/") for name in trainer.train_step(x, y, class_weights) if name.startswith("aux/")}


@pytest.mark.parametrize("method", [m for m in METHODS if AUGMENTERS.get(m).config is not None])
def test_a_zero_weight_component_is_not_computed(method, tmp_path):
    """For components that zero loss weights (the λ's), one step on digits computes the term with the full
    method and does not compute it once the component is removed (the code skips it, not just weights it 0)."""
    overrides = ["train.epochs=2", "train.device=cpu", "model.width=16", "data.max_train_per_class=40",
                 "augmenter.start_epoch=0", f"augmenter.name={method}"]
    base = read_ablation(REPO / "configs" / "digits.yaml", overrides)
    full = build_cell(base, {})
    from ltsearch.engine import Trainer

    full_weights = Trainer(full, cache_dir=tmp_path).augmenter.loss_weights
    full_terms = _first_step_terms(full, tmp_path)
    for label, component in AUGMENTERS.get(method).meta["components"].items():
        ablated = build_cell(base, component)
        weights = Trainer(ablated, cache_dir=tmp_path).augmenter.loss_weights
        zeroed = {name for name, weight in weights.items() if weight == 0 and full_weights.get(name, 0) != 0}
        changed = {name for name in weights if weights[name] != full_weights.get(name)}
        assert changed <= zeroed, f"{method} w/o {label}: weights {sorted(changed - zeroed)} rescaled, not removed"
        if not zeroed:
            continue
        assert zeroed & full_terms, f"{method}: none of {sorted(zeroed)} is computed by the full method's first step"
        assert not zeroed & _first_step_terms(ablated, tmp_path), f"{method} w/o {label} still computes {sorted(zeroed)}"
