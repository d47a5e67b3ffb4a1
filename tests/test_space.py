"""The search-space DSL: parsing, conditions, corners, grid cells, and bounds checked by the run config itself.

No Ray here; Optuna is the real library (a study asked for trials through the define-by-run function).
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from ltsearch.cli import main
from ltsearch.config import read_yaml
from ltsearch.errors import ConfigError
from ltsearch.space import (Choice, Condition, Grid, IntRange, LogUniform, Uniform, apply_point, flatten_space,
                            parse_distribution, parse_space, validate_space)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))
DIGITS = {"data": {"name": "digits", "val_fraction": 0.2}, "model": {"name": "small_cnn"}, "train": {"epochs": 4}}


def base(**sections) -> dict:
    raw = {k: dict(v) for k, v in DIGITS.items()}
    raw.update(sections)
    return raw


# ------------------------------------------------------------------------------------ distributions
@pytest.mark.parametrize("spec, expected", [
    ({"uniform": [0.1, 2]}, Uniform(0.1, 2.0)),
    ({"uniform": [0, 1], "step": 0.25}, Uniform(0.0, 1.0, 0.25)),
    ({"loguniform": [1e-3, 1]}, LogUniform(1e-3, 1.0)),
    ({"int": [1, 9], "step": 2}, IntRange(1, 9, 2)),
    ({"choice": ["ce", "ldam"]}, Choice(("ce", "ldam"))),
    ({"grid": [1, 2, 3]}, Grid((1, 2, 3))),
])
def test_distributions_parse_from_yaml_form(spec, expected):
    assert parse_distribution("k", spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ({"uniform": [2, 1]}, "`low <= high`"),
    ({"loguniform": [0, 1]}, "`low > 0`"),
    ({"loguniform": [0.1, 1], "step": 0.1}, "no step with loguniform"),
    ({"int": [1.5, 3]}, "integer bounds"),
    ({"int": [1, 3], "step": 0}, "step > 0"),
    ({"choice": []}, "non-empty list"),
    ({"choice": [[1, 2], 3]}, "scalar values"),
    ({"choice": [1, 1]}, "distinct values"),
    ({"normal": [0, 1]}, "exactly one of"),
    ({"uniform": [0, 1], "choice": [1]}, "exactly one of"),
    ({"uniform": [0, 1], "log": True}, "than 'step'"),
    (0.5, "exactly one of"),
])
def test_bad_distributions_name_the_key_and_the_rule(spec, fragment):
    with pytest.raises(ConfigError) as error:
        parse_distribution("optim.lr", spec)
    assert error.value.key.startswith("space.optim.lr")
    assert fragment in str(error.value)


def test_values_corners_and_clip():
    assert Uniform(0.0, 1.0, 0.25).values() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert Uniform(0.0, 1.0).values() is None
    assert IntRange(1, 10, 3).values() == [1, 4, 7, 10]
    assert IntRange(1, 9, 3).corners() == [1, 7]  # the last value Optuna can draw, not the written bound
    assert Uniform(0.1, 2.0).clip(2.4) == 2.0 and Uniform(0.1, 2.0).clip(-1) == 0.1
    assert IntRange(10, 80, 10).clip(43.2) == 40 and IntRange(10, 80, 10).clip(500) == 80
    assert LogUniform(1e-3, 1.0).clip(1.2) == 1.0


def test_nested_and_dotted_keys_are_the_same_later_wins_and_null_drops_a_key():
    nested = flatten_space({"optim": {"lr": {"loguniform": [0.01, 0.1]}, "weight_decay": None}, "loss.name": {"choice": ["ce"]}})
    assert nested == {"optim.lr": {"loguniform": [0.01, 0.1]}, "loss.name": {"choice": ["ce"]}}
    # what `--set space.optim.lr=...` and `--set space.loss.ldam.max_m=null` add to a file written with dotted keys
    raw = {"optim.lr": {"uniform": [0.1, 0.2]}, "loss.ldam.max_m": {"uniform": [0.1, 0.5]}, "loss.name": {"choice": ["ldam"]},
           "optim": {"lr": {"choice": [0.3]}}, "loss": {"ldam": {"max_m": None}}}
    assert flatten_space(raw) == {"loss.name": {"choice": ["ldam"]}, "optim.lr": {"choice": [0.3]}}
    assert flatten_space({**raw, "loss": None}) == {"optim.lr": {"choice": [0.3]}}


# ---------------------------------------------------------------------------------------- conditions
def test_method_section_keys_are_conditional_on_the_method_and_selectors_come_first():
    space = parse_space({"optim.lr": {"loguniform": [0.01, 0.1]}, "augmenter.smart.tau": {"loguniform": [0.1, 10]},
                         "augmenter.name": {"choice": ["smart", "lcreg"]}, "loss.ldam.max_m": {"uniform": [0.1, 0.8]},
                         "augmenter.head_ratio": {"uniform": [0.2, 0.8]}}, base(loss={"name": "ldam"}))
    assert space.keys[0] == "augmenter.name"
    conditions = {p.key: p.condition for p in space.params}
    assert conditions["augmenter.smart.tau"] == Condition("augmenter.name", "smart")
    assert conditions["loss.ldam.max_m"] == Condition("loss.name", "ldam")  # fixed by the base config: always active
    assert conditions["augmenter.head_ratio"] is None and conditions["optim.lr"] is None


def test_a_key_whose_method_is_never_chosen_is_rejected():
    with pytest.raises(ConfigError) as error:
        parse_space({"augmenter.rsg.num_centers": {"int": [5, 25]}}, base(augmenter={"name": "smart"}))
    assert error.value.key == "space.augmenter.rsg.num_centers"
    assert "only sampled when augmenter.name = rsg" in str(error.value)
    with pytest.raises(ConfigError, match="only sampled when augmenter.name = rsg"):
        parse_space({"augmenter.name": {"choice": ["smart", "lcreg"]}, "augmenter.rsg.num_centers": {"int": [5, 25]}}, base())


def test_a_misspelt_key_is_rejected_before_anything_runs():
    with pytest.raises(ConfigError) as error:
        parse_space({"augmenter.smart.tua": {"uniform": [0.1, 1]}}, base(augmenter={"name": "smart"}))
    assert error.value.key == "space.augmenter.smart.tua" and "a key of the run config" in str(error.value)


def test_define_by_run_samples_only_the_chosen_methods_keys_within_bounds():
    space = parse_space({"augmenter.name": {"choice": ["smart", "lcreg", "none"]},
                         "augmenter.smart.tau": {"loguniform": [0.1, 10]},
                         "augmenter.lcreg.latent_count": {"int": [10, 40], "step": 10},
                         "optim.lr": {"uniform": [0.01, 0.1]}}, base())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(60):
        trial = study.ask()
        point = space.sample(trial)
        study.tell(trial, 0.0)
        method = point["augmenter.name"]
        seen.add(method)
        assert set(point) == {"augmenter.name", "optim.lr"} | ({"augmenter.smart.tau"} if method == "smart" else set()) \
            | ({"augmenter.lcreg.latent_count"} if method == "lcreg" else set())
        assert set(trial.params) == set(point)  # Optuna recorded exactly the parameters that mattered
        assert 0.01 <= point["optim.lr"] <= 0.1
        if method == "smart":
            assert 0.1 <= point["augmenter.smart.tau"] <= 10
        if method == "lcreg":
            assert point["augmenter.lcreg.latent_count"] in (10, 20, 30, 40)
    assert seen == {"smart", "lcreg", "none"}


# ------------------------------------------------------------------------------------ corners, grids
def test_corners_respect_conditions():
    space = parse_space({"loss.name": {"choice": ["ce", "balanced_softmax", "ldam"]}, "optim.lr": {"loguniform": [0.01, 0.3]},
                         "loss.ldam.max_m": {"uniform": [0.1, 0.8]}}, base())
    corners = space.corners()
    assert len(corners) == 2 + 2 + 4  # ce: lr ends; balanced_softmax: lr ends; ldam: lr ends x max_m ends
    assert all(("loss.ldam.max_m" in c) == (c["loss.name"] == "ldam") for c in corners)


def test_grid_cells_are_the_product_of_grid_keys_with_conditions():
    space = parse_space({"augmenter.name": {"grid": ["smart", "lcreg"]}, "augmenter.smart.tau": {"grid": [0.5, 2.0]},
                         "augmenter.insert_at": {"grid": [1, 3]}, "optim.lr": {"loguniform": [0.01, 0.1]}}, base())
    cells = space.grid_cells(exhaustive=False)
    assert len(cells) == (2 + 1) * 2  # smart x tau(2) + lcreg, each x insert_at(2)
    assert all("optim.lr" not in c for c in cells)
    assert {(c["augmenter.name"], c.get("augmenter.smart.tau"), c["augmenter.insert_at"]) for c in cells} == {
        ("smart", 0.5, 1), ("smart", 0.5, 3), ("smart", 2.0, 1), ("smart", 2.0, 3), ("lcreg", None, 1), ("lcreg", None, 3)}
    assert parse_space({"optim.lr": {"choice": [0.1]}}, base()).grid_cells(exhaustive=False) == []


def test_exhaustive_grid_enumerates_finite_keys_and_refuses_continuous_ones():
    space = parse_space({"optim.lr": {"uniform": [0.05, 0.15], "step": 0.05}, "model.width": {"int": [16, 32], "step": 16}}, base())
    assert sorted((c["optim.lr"], c["model.width"]) for c in space.grid_cells(exhaustive=True)) == [
        (0.05, 16), (0.05, 32), (0.1, 16), (0.1, 32), (0.15, 16), (0.15, 32)]
    with pytest.raises(ConfigError, match="finitely many values"):
        parse_space({"optim.lr": {"loguniform": [0.01, 0.1]}}, base()).grid_cells(exhaustive=True)


def test_a_conditional_grid_key_needs_a_grid_selector():
    with pytest.raises(ConfigError, match="grid key whose condition is decided by a grid"):
        parse_space({"augmenter.name": {"choice": ["smart", "lcreg"]}, "augmenter.smart.tau": {"grid": [0.5, 2.0]}}, base())


# ----------------------------------------------------------------------- bounds, by the config's rules
@pytest.mark.parametrize("sections, key, spec, rejected", [
    ({"augmenter": {"name": "smart"}}, "augmenter.smart.tau", {"uniform": [0.0, 2.0]}, 0.0),
    ({"augmenter": {"name": "smart"}}, "augmenter.head_ratio", {"uniform": [0.5, 1.0]}, 1.0),
    ({"augmenter": {"name": "lcreg"}}, "augmenter.lcreg.latent_count", {"int": [0, 40], "step": 10}, 0),
    ({"augmenter": {"name": "smart"}}, "augmenter.insert_at", {"choice": [1, 3, 4]}, 4),  # small_cnn: boundaries 1..3
])
def test_ranges_outside_what_the_config_accepts_are_rejected_at_the_offending_end(sections, key, spec, rejected):
    raw = base(**sections)
    space = parse_space({key: spec}, raw)
    with pytest.raises(ConfigError) as error:
        validate_space(space, raw, source="x.yaml")
    assert error.value.key == f"space.{key}"
    assert f"'{key}' = {rejected!r}" in str(error.value)
    assert str(error.value).startswith("x.yaml: ")


def test_combinations_are_checked_too():
    """M2m works on the input only: insert_at 2 is fine for SMART but not for M2m."""
    raw = base()
    space = parse_space({"augmenter.name": {"choice": ["smart", "m2m"]}, "augmenter.insert_at": {"choice": [0, 2]}}, raw)
    with pytest.raises(ConfigError) as error:
        validate_space(space, raw)
    assert error.value.key == "space.augmenter.insert_at"
    ok = parse_space({"augmenter.name": {"grid": ["smart", "lcreg"]}, "augmenter.insert_at": {"choice": [1, 3]}}, raw)
    assert validate_space(ok, raw).corners == 4


def test_a_start_epoch_beyond_the_run_is_rejected_through_the_engine_check():
    raw = base(augmenter={"name": "smart"})
    space = parse_space({"augmenter.start_epoch": {"int": [0, 4]}}, raw)  # train.epochs = 4: index 4 never runs
    with pytest.raises(ConfigError, match="augmenter.start_epoch"):
        validate_space(space, raw)


def test_apply_point_writes_dotted_keys_without_touching_the_base():
    raw = base()
    out = apply_point(raw, {"optim.lr": 0.2, "augmenter.smart.tau": 3.0})
    assert out["optim"]["lr"] == 0.2 and out["augmenter"]["smart"]["tau"] == 3.0
    assert "optim" not in raw


# ------------------------------------------------------------------------------------- ltsearch check
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_search_file_passes_check(path, capsys):
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "trials:" in out and "space:" in out
    raw = read_yaml(path)
    for key in flatten_space(raw["space"]):
        assert key in out
    assert path.read_text().startswith("# ltsearch tune search_spaces/")  # every file begins with its launch command


def test_check_prints_trials_epochs_and_space(capsys):
    assert main(["check", str(REPO / "search_spaces" / "quickstart.yaml"), "--set", "search.num_samples=7",
                 "--set", "train.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "trials: 7 " in out
    assert "at most 5 per trial, at most 35 in all" in out
    assert "loss.ldam.max_m" in out and "if loss.name = ldam" in out


def test_check_counts_grid_cells(capsys):
    assert main(["check", str(REPO / "search_spaces" / "insertion_layer.yaml"), "--set", "search.num_samples=2"]) == 0
    assert "trials: 32 = 16 grid cells x 2" in capsys.readouterr().out


def test_check_fails_with_one_line_and_exit_2(capsys):
    code = main(["check", str(REPO / "search_spaces" / "smart_tau.yaml"), "--set", "space.augmenter.smart.tau={uniform: [0, 1]}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "space.augmenter.smart.tau" in err and "Narrow the range" in err


def test_check_validates_a_plain_run_config(capsys):
    assert main(["check", str(REPO / "configs" / "digits.yaml"), "--set", "train.epochs=3"]) == 0
    assert "a valid run config: 1 run of 3 epochs" in capsys.readouterr().out


def test_loguniform_corners_are_its_ends():
    dist = parse_distribution("k", {"loguniform": [1e-4, 1e-1]})
    assert dist.corners() == [1e-4, 1e-1] and math.isclose(dist.clip(1.0), 0.1)
