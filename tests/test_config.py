"""Config tree: YAML + --set overrides, type/range/unknown-key errors naming the key, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ltsearch.config import (RunConfig, apply_overrides, build_run_config, dump_yaml, load_run_config, parse_override,
                             read_yaml, to_dict)
from ltsearch.engine import check_compatible
from ltsearch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("data.imbalance=0.5", "data.imbalance", ">= 1.0"),
        ("augmenter.head_ratio=1.0", "augmenter.head_ratio", "(0.0, 1.0)"),
        ("augmenter.head_ratio=0", "augmenter.head_ratio", "(0.0, 1.0)"),
        ("optim.lr=-0.1", "optim.lr", "> 0.0"),
        ("optim.batch_size=0", "optim.batch_size", ">= 1"),
        ("optim.batch_size=12.5", "optim.batch_size", "an integer"),
        ("train.epochs=ten", "train.epochs", "an integer"),
        ("train.amp=maybe", "train.amp", "true or false"),
        ("train.device=tpu", "train.device", "['auto', 'cpu', 'cuda']"),
        ("data.profile=linear", "data.profile", "['exp', 'step']"),
        ("data.imbalanc=10", "data.imbalanc", "allowed keys"),
        ("model.name=resnet9000", "model.name", "resnet32"),
        ("loss.name=hinge", "loss.name", "ldam"),
        ("augmenter.name=mixup", "augmenter.name", "none"),
        ("loss.reweight.beta=1.0", "loss.reweight.beta", "[0.0, 1.0)"),
        ("loss.resample.sampler=magic", "loss.resample.sampler", "class_balanced"),
        ("optim.schedule.factors=[0.1]", "optim.schedule.factors", "one factor per milestone"),
        ("train.select_metric=test/top1", "train.select_metric", "validation metric"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run_config(None, [override])
    message = str(caught.value)
    assert caught.value.key == key
    assert f"config key '{key}'" in message
    assert expected in message


def test_overrides_parse_yaml_scalars_and_lists() -> None:
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 1e-3)
    assert parse_override("optim.schedule.milestones=[3, 5]") == ("optim.schedule.milestones", [3, 5])
    assert parse_override("train.amp=false") == ("train.amp", False)
    assert parse_override("model.weights=null") == ("model.weights", None)
    config = load_run_config(None, ["optim.lr=0.01", "optim.schedule.milestones=[2]", "optim.schedule.factors=[0.1]"])
    assert config.optim.lr == 0.01 and config.optim.schedule.milestones == [2]


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=3", "optim.lr=[1,"])
def test_malformed_overrides_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, [bad])
    assert "--set" in str(caught.value) or "YAML" in str(caught.value)


def test_sections_of_registered_methods_are_typed_and_validated() -> None:
    config = load_run_config(None, ["loss.name=ldam", "loss.ldam.s=16"])
    assert config.loss.ldam.s == 16.0 and config.loss.ldam.max_m == 0.5
    with pytest.raises(ConfigError) as caught:
        load_run_config(None, ["loss.ldam.s=0"])
    assert caught.value.key == "loss.ldam.s"
    with pytest.raises(ConfigError) as caught:
        load_run_config(None, ["loss.ldam.margin=1"])
    assert caught.value.key == "loss.ldam.margin"


def test_round_trip_through_yaml_is_identity() -> None:
    config = load_run_config(REPO / "configs" / "digits_ldam_drw.yaml")
    again = build_run_config(yaml.safe_load(dump_yaml(config)))
    assert to_dict(again) == to_dict(config)


def test_base_inheritance_merges_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("optim: {lr: 0.3, batch_size: 32}\ntrain: {epochs: 3}\n")
    (tmp_path / "b.yaml").write_text("optim: {lr: 0.2}\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml]\ntrain: {epochs: 7}\n")
    raw = read_yaml(tmp_path / "c.yaml")
    assert raw == {"optim": {"lr": 0.2, "batch_size": 32}, "train": {"epochs": 7}}


def test_missing_and_invalid_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_run_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_run_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("optim: {lr: 0.1\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: {imbalance: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_run_config(path)
    check_compatible(config)
    assert isinstance(config, RunConfig)


def test_ldam_drw_preset_is_the_published_recipe() -> None:
    config = load_run_config(REPO / "configs" / "ldam_drw_cifar10.yaml")
    assert (config.train.epochs, config.optim.batch_size, config.optim.lr, config.optim.weight_decay) == (200, 128, 0.1, 2e-4)
    assert config.optim.schedule.warmup_epochs == 5
    assert config.optim.schedule.milestones == [160, 180] and config.optim.schedule.factors == [0.01, 0.0001]
    assert config.loss.name == "ldam" and config.loss.ldam.max_m == 0.5 and config.loss.ldam.s == 30.0
    assert (config.loss.reweight.kind, config.loss.reweight.beta, config.loss.reweight.start_epoch) == ("effective_number", 0.9999, 160)
    assert config.data.name == "cifar10" and config.data.imbalance == 100
