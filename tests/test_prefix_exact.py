"""Shared training prefixes are exact: a run forked from another run's trunk equals the run trained alone.

For every method, config B changes every key the method does NOT declare pre-T (`BeforeStart` in its
registration) and every undeclared shared key, including the start epoch T. Then B must share A's
prefix key, and B forked from A's trunk at B's own T must reproduce B trained from scratch bit for bit:
every per-epoch metric (aug/* diagnostics and train/aux/* terms included) and the final weights.
The sensitivity tests fork a config C that differs from A in a key that IS pre-T (bypassing the key)
and show that the fork then differs from C's own run: the exactness tests can fail. The last tests
check that a method's random numbers never move the backbone's (global) torch stream.

Everything runs on the embedded digits set (a 40-per-class slice, a 16-wide small CNN, 4 epochs on
one CPU thread): a run takes well under a second.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ltsearch.augmenters.base import before_start_of
from ltsearch.config import RunConfig, build_run_config, load_run_config, to_dict
from ltsearch.checkpoints import read_checkpoint
from ltsearch.engine import Trainer
from ltsearch.prefix import SHARED_PREFIX
from ltsearch.prefix.keys import prefix_of
from ltsearch.registry import AUGMENTERS

REPO = Path(__file__).resolve().parents[1]
METHODS = ["rsg", "safa", "smart", "lcreg", "m2m"]
SHARED_KEYS = ("insert_at", "head_ratio", "start_epoch")
EPOCHS = 4
T_A, T_B = 2, 3  # A's trunk is snapshotted at both; B forks at its own T, a later one than its owner's
TIMING = ("epoch_seconds", "images_per_s")
BASE = ["train.device=cpu", "train.threads=1", f"train.epochs={EPOCHS}", "data.max_train_per_class=40",
        "data.max_eval_per_class=10", "optim.batch_size=32", "model.width=16"]
REFERENCE_FILE = "<a checkpoint of g>"  # M2m's reference_path: resolved to a real file by the `reference_file` fixture

#: A per method (keys under `augmenter.`): small modules so a run takes well under a second; M2m with a
#: short g and thresholds that a weak g passes, so translations are kept and the active phase does something
A_VALUES: dict[str, dict[str, Any]] = {
    "rsg": {"start_epoch": T_A, "rsg.num_centers": 3, "rsg.contrastive_channels": 16, "rsg.vector_transform": False},
    "safa": {"start_epoch": T_A},
    "smart": {"start_epoch": T_A},
    "lcreg": {"start_epoch": T_A, "lcreg.latent_count": 6},
    "m2m": {"start_epoch": T_A, "m2m.reference_epochs": 2, "m2m.steps": 3, "m2m.gamma": 2.0, "m2m.beta": 0.9},
}

#: B = A with every key below changed: exactly the keys the method does not declare pre-T (checked)
ALTERNATIVES: dict[str, dict[str, Any]] = {
    "rsg": {
        "start_epoch": T_B,
        "rsg.transfer_strength": 0.5,
        "rsg.lambda_mv": 0.02,
        "rsg.mv_direction": 0.5,
        "rsg.mv_length": 2.0,
        "rsg.mv_contrastive": 0.5,
        "rsg.vector_transform": True,
        "rsg.add_to": "center",
        "rsg.mv_pair": "frequent_sample",
        "rsg.mv_vectors": "flat",
        "rsg.detach_inputs": True,
        "head_ratio": 0.5,  # A: RSG's 0.2; only the generation reads the head mask
    },
    "safa": {
        "start_epoch": T_B,
        "insert_at": 2,  # A: the paper's -3 = boundary 1
        "safa.lambda_recycle": 10.0,
        "safa.lambda_ms_tail": 0.1,
        "safa.lambda_ms_head": 10.0,
        "safa.lambda_contrastive": 0.5,
        "safa.hidden_channels": 8,
        "safa.kernel_size": 1,
        "safa.recycle_distance": "l2",
        "safa.ms_guard": 0.5,
        "safa.module_scale": "free",
        "head_ratio": 0.5,  # A: SAFA's 0.2
    },
    "smart": {
        "start_epoch": T_B,
        "smart.tau": 2.0,
        "smart.weights": False,
        "smart.source": "head",
        "smart.scale": "literal",
        "smart.tail_features": "append",
    },
    "lcreg": {
        "start_epoch": T_B,
        "insert_at": 2,  # A: the paper's -1 = boundary 3
        "lcreg.latent_count": 4,
        "lcreg.aug_weight": 0.2,
        "lcreg.recon_weight": 0.05,
        "lcreg.lambda0": 1.0,
        "lcreg.covariance": "diagonal",
        "lcreg.assignment": "sigmoid",
        "lcreg.aug_features": "image_parts",
        "lcreg.recon_reduction": "mean",
        "lcreg.recon_temperature": 0.5,
    },
    "m2m": {
        "start_epoch": T_B,
        "insert_at": 0,  # the only boundary M2m supports; A leaves it to the paper default (None)
        "m2m.beta": 0.5,
        "m2m.lam": 0.2,
        "m2m.gamma": 0.05,
        "m2m.acceptance": "confidence",
        "m2m.steps": 2,
        "m2m.step_size": 0.2,
        "m2m.noise_radius": 0.3,
        "m2m.reference_path": REFERENCE_FILE,
        "m2m.reference_epochs": 1,
        "head_ratio": 0.5,  # A: M2m's 1/3 (M2m itself never reads the head mask)
    },
}

#: a diagnostic that is > 0 in B's last epoch only if the method really acted after T
ACTED = {"rsg": "aug/generated", "safa": "aug/generated", "smart": "aug/transferred", "lcreg": "aug/recon_term",
         "m2m": "aug/attempts"}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """M2m's g is trained once per session into a temporary cache (never the user's)."""
    monkeypatch.setenv("LTSEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint of g for M2m's `reference_path`: one epoch of plain ERM on the same data and model."""
    trainer = Trainer(load_run_config(REPO / "configs" / "digits.yaml", [*BASE, "train.epochs=1"]))
    for _ in trainer.run():
        pass
    path = tmp_path_factory.mktemp("reference") / "g.pt"
    torch.save({"model": trainer.model.state_dict()}, path)
    return str(path)


# ------------------------------------------------------------------------------------------ helpers
def config_a(method: str, *overrides: str) -> RunConfig:
    values = [f"augmenter.{key}={value}" for key, value in A_VALUES[method].items()]
    return load_run_config(REPO / "configs" / "digits.yaml", [*BASE, f"augmenter.name={method}", *values, *overrides])


def with_values(config: RunConfig, values: dict[str, Any], reference: str | None = None) -> RunConfig:
    """`config` with dotted keys (relative to `augmenter.` unless they name another section) set to `values`."""
    raw = to_dict(config)
    for dotted, value in values.items():
        path = dotted.split(".")
        if path[0] not in raw:
            path = ["augmenter", *path]
        node = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = reference if value == REFERENCE_FILE else value
    return build_run_config(raw)


def config_b(method: str, reference: str) -> RunConfig:
    return with_values(config_a(method), ALTERNATIVES[method], reference)


def lookup(config: RunConfig, dotted: str) -> Any:
    node: Any = to_dict(config)["augmenter"]
    for part in dotted.split("."):
        node = node[part]
    return node


def undeclared_keys(method: str) -> set[str]:
    declared = before_start_of(method)
    assert declared is not None, f"{method} declares nothing: every key would count as pre-T"
    section = AUGMENTERS.get(method).config
    keys = {f"{method}.{field.name}" for field in dataclasses.fields(section)} | set(SHARED_KEYS)
    return keys - set(declared.keys)


def train(trainer: Trainer) -> Trainer:
    for _ in trainer.run():
        pass
    return trainer


def scratch(config: RunConfig) -> Trainer:
    return train(Trainer(config))


def trunk_snapshots(config: RunConfig, epochs: tuple[int, ...], directory: Path) -> dict[int, dict[str, Any]]:
    """Train `config`'s trunk and return its state at each fork epoch, as a sweep stores it (checkpoint file)."""
    prefix = prefix_of(config)
    assert prefix is not None
    trunk = Trainer(build_run_config(prefix.trunk))
    states = {}
    for result in trunk.run(until=max(epochs)):
        if trunk.epoch in epochs:
            states[trunk.epoch] = read_checkpoint(result.save_checkpoint(directory / f"trunk-{trunk.epoch}"))
    return states


def fork(config: RunConfig, state: dict[str, Any], trains: bool | None = None) -> Trainer:
    """`config` continued from a prefix state; `trains` overrides the method's declaration (sensitivity tests)."""
    prefix = prefix_of(config)
    assert prefix is not None
    trainer = Trainer(config)
    trainer.load_prefix(state, method_trains_before_start=prefix.trains_before_start if trains is None else trains)
    return train(trainer)


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in TIMING and key != SHARED_PREFIX}


def same(a: Any, b: Any) -> bool:
    """Exact equality; a NaN equals a NaN (a diagnostic over nothing), never a number."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def metric_differences(first: Trainer, second: Trainer) -> list[tuple[int, str]]:
    """(epoch, key) of every metric that is not bit-identical, or whose presence differs."""
    assert len(first.history) == len(second.history) == EPOCHS
    out = []
    for epoch, (a, b) in enumerate(zip(first.history, second.history)):
        a, b = comparable(a), comparable(b)
        out += [(epoch, key) for key in sorted(a.keys() | b.keys()) if key not in a or key not in b or not same(a[key], b[key])]
    return out


def state_differences(first: torch.nn.Module, second: torch.nn.Module) -> list[str]:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    return [key for key in a if not torch.equal(a[key], b[key])]


def assert_identical_runs(forked: Trainer, alone: Trainer, fork_epoch: int) -> None:
    assert metric_differences(forked, alone) == []
    assert state_differences(forked.model, alone.model) == []
    assert state_differences(forked.augmenter, alone.augmenter) == []
    assert [row.get(SHARED_PREFIX) for row in forked.history] == [1] * fork_epoch + [None] * (EPOCHS - fork_epoch)
    best, best_alone = dict(forked.best), dict(alone.best)
    assert same(comparable(best.pop("metrics")), comparable(best_alone.pop("metrics")))  # without its timing keys
    assert best == best_alone


def rng_states() -> tuple[torch.Tensor, Any, Any]:
    return torch.get_rng_state().clone(), np.random.get_state(legacy=False)["state"]["key"].tolist(), random.getstate()


# ------------------------------------------------------------------------------- (a) the prefix key
@pytest.mark.parametrize("method", METHODS)
def test_alternatives_change_every_undeclared_key_and_keep_the_prefix(method: str, reference_file: str) -> None:
    assert set(ALTERNATIVES[method]) == undeclared_keys(method), \
        "ALTERNATIVES must change exactly the keys the method does not declare pre-T (add one for a new field)"
    a, b = config_a(method), config_b(method, reference_file)
    changed = {key: (lookup(a, key), lookup(b, key)) for key in ALTERNATIVES[method]}
    assert all(old != new for old, new in changed.values()), changed
    prefix_a, prefix_b = prefix_of(a), prefix_of(b)
    assert prefix_a is not None and prefix_b is not None
    assert prefix_a.key == prefix_b.key
    assert (prefix_a.fork_epoch, prefix_b.fork_epoch) == (T_A, T_B)
    assert prefix_a.trunk["augmenter"]["start_epoch"] == EPOCHS - 1  # one trunk serves both fork epochs
    assert prefix_a.trains_before_start == before_start_of(method).trains


@pytest.mark.parametrize("method", METHODS)
def test_every_declared_key_changes_the_prefix(method: str) -> None:
    a = config_a(method)
    base = prefix_of(a).key
    alternatives = {"insert_at": 1, "head_ratio": 0.3, "rsg.num_centers": 4, "rsg.contrastive_channels": 8,
                    "rsg.contrastive_first_kernel": 1, "rsg.lambda_cesc": 0.5, "rsg.cesc_center": 0.5,
                    "rsg.cesc_contrastive": 0.0, "rsg.cesc_literal": True, "smart.ema": "fixed", "smart.momentum": 0.2,
                    "smart.covariance": "diagonal", "smart.selection": "fixed", "lcreg.cls_weight": 0.5,
                    "lcreg.second_stage_epochs": 1, "lcreg.second_stage_sampler": "reversed"}
    for key in before_start_of(method).keys:
        assert lookup(a, key) != alternatives[key], key
        assert prefix_of(with_values(a, {key: alternatives[key]})).key != base, key
    assert prefix_of(with_values(a, {"optim.lr": 0.05})).key != base  # a backbone key is pre-T for every method


# ------------------------------------------------------------------------------ (b) bit-exact forks
@pytest.mark.parametrize("method", METHODS)
def test_fork_from_another_runs_trunk_is_bit_exact(method: str, reference_file: str, tmp_path: Path) -> None:
    """B (every post-T key changed, T = 3) forked from A's trunk equals B alone; so does A at its own T = 2."""
    a, b = config_a(method), config_b(method, reference_file)
    states = trunk_snapshots(a, (T_A, T_B), tmp_path)
    alone_b = scratch(b)
    assert alone_b.history[-1].get(ACTED[method], 0) > 0, "B's method did nothing after T: the test would prove little"
    assert_identical_runs(fork(b, states[T_B]), alone_b, T_B)
    assert_identical_runs(fork(a, states[T_A]), scratch(a), T_A)


# --------------------------------------------------------------------------------- (c) sensitivity
SENSITIVITY = {
    # case: (why it is pre-T, what A also sets, what C changes, `trains` forced on the fork or None = the declaration)
    "rsg-lambda_cesc": ("λ1 sets how fast the centres learn before T", {}, {"rsg.lambda_cesc": 0.5}, None),
    "rsg-trains": ("RSG's centres train before T: a fork must take them from the prefix", {}, {}, False),
    "rsg-head_ratio": ("the head mask reaches a head_tail DRS sampler before T", {"loss.resample.sampler": "head_tail"},
                       {"head_ratio": 0.5}, None),
    "safa-head_ratio": ("the head mask reaches a head_tail DRS sampler before T", {"loss.resample.sampler": "head_tail"},
                        {"head_ratio": 0.5}, None),
    "safa-lr": ("a backbone key", {}, {"optim.lr": 0.05}, None),
    "smart-ema": ("the moments kept before T", {}, {"smart.ema": "fixed"}, None),
    "smart-trains": ("SMART's moments are updated before T: a fork must take them from the prefix", {}, {}, False),
    "lcreg-cls_weight": ("γ scales L_cls on every step", {}, {"lcreg.cls_weight": 0.5}, None),
    "lcreg-second_stage": ("a classifier-only stage that starts before T",
                           {"start_epoch": T_B}, {"lcreg.second_stage_epochs": 2}, None),
    "m2m-lr": ("a backbone key", {}, {"optim.lr": 0.05}, None),
    "m2m-head_ratio": ("the head mask reaches a head_tail DRS sampler before T", {"loss.resample.sampler": "head_tail"},
                       {"head_ratio": 0.5}, None),
}


@pytest.mark.parametrize("case", sorted(SENSITIVITY))
def test_fork_across_a_pre_start_difference_is_caught(case: str, tmp_path: Path) -> None:
    """C differs from A in a key that acts before T (or the fork ignores `trains`): the fork must differ from C alone."""
    method = case.split("-")[0]
    _, a_extra, c_change, trains = SENSITIVITY[case]
    a = with_values(config_a(method), a_extra)
    c = with_values(a, c_change)
    fork_epoch = prefix_of(a).fork_epoch
    if c_change:
        assert prefix_of(c).key != prefix_of(a).key
    state = trunk_snapshots(a, (fork_epoch,), tmp_path)[fork_epoch]
    forked, alone = fork(c, state, trains), scratch(c)
    assert metric_differences(forked, alone) != []


def test_sensitivity_control_identical_configs_fork_exactly(tmp_path: Path) -> None:
    """The control of the cases above: with nothing changed and the declared `trains`, the fork is exact."""
    for method in ("rsg", "smart"):
        a = config_a(method)
        state = trunk_snapshots(a, (T_A,), tmp_path / method)[T_A]
        assert metric_differences(fork(a, state), scratch(a)) == []


# ------------------------------------------------------------------------------- (d) RNG separation
#: post-T knobs that change how many random numbers a method draws, or the size of its modules
DRAWS = {
    "rsg": {"rsg.transfer_strength": 0.3, "rsg.add_to": "center"},     # how many sources randperm draws per step
    "safa": {"safa.hidden_channels": 4, "safa.kernel_size": 5},         # E, D, G, Q's sizes (init draws)
    "smart": {"smart.selection": "fixed"},                              # a construction draw (declared for its buffer)
    "lcreg": {"lcreg.latent_count": 12, "lcreg.aug_features": "image_parts"},  # latents, FC, decoder, classifier sizes
    "m2m": {"m2m.steps": 1, "m2m.beta": 0.0},                           # how many seeds are drawn and kept
}
BACKBONE_METRICS = ("train/cls_loss", "train/top1", "val/top1", "val/per_class", "test/top1", "test/per_class", "lr")


@pytest.mark.parametrize("method", METHODS)
def test_method_randomness_never_shifts_the_backbone_stream(method: str, reference_file: str) -> None:
    """Construction leaves the global RNGs where the backbone left them, whatever the method and its knobs."""
    states = []
    for config in (config_a("rsg", "augmenter.name=none"), config_a(method), config_b(method, reference_file),
                   with_values(config_a(method), DRAWS[method])):
        Trainer(config)
        states.append(rng_states())
    torch_state, numpy_key, python_state = states[0]
    for other in states[1:]:
        assert torch.equal(other[0], torch_state) and other[1] == numpy_key and other[2] == python_state


@pytest.mark.parametrize("method", METHODS)
def test_training_draws_nothing_from_the_global_stream(method: str) -> None:
    """With the method active from epoch 0, a whole run leaves torch's, numpy's and python's global RNGs untouched:
    every draw of the method is in its own stream (the backbone and loader draw none here)."""
    trainer = Trainer(config_a(method, "augmenter.start_epoch=0", "train.epochs=2"))
    before = rng_states()
    train(trainer)
    assert trainer.history[-1].get(ACTED[method], 0) > 0
    after = rng_states()
    assert torch.equal(after[0], before[0]) and after[1] == before[1] and after[2] == before[2]


@pytest.mark.parametrize("method", METHODS)
def test_post_start_knobs_leave_epochs_before_start_identical(method: str) -> None:
    """Runs differing in knobs that change the method's draws or module sizes train [0, T) identically from scratch."""
    first = scratch(config_a(method))
    second = scratch(with_values(config_a(method), DRAWS[method]))
    for epoch in range(T_A):
        a, b = comparable(first.history[epoch]), comparable(second.history[epoch])
        assert a.keys() == b.keys() and all(same(a[key], b[key]) for key in a), epoch
    assert any(not same(first.history[-1].get(key), second.history[-1].get(key)) for key in first.history[-1]
               if key.startswith(("aug/", "train/"))), "the knobs changed nothing after T: the test would prove little"


def test_rsg_draws_before_start_do_not_move_the_backbone() -> None:
    """RSG draws random pairs before T (L_CESC's pair term); switching the term off changes its draws and its
    own modules, not the backbone: the backbone's metrics and weights over [0, T) are bit-identical."""
    with_pairs = Trainer(config_a("rsg"))
    without = Trainer(with_values(config_a("rsg"), {"rsg.cesc_contrastive": 0.0}))
    for trainer in (with_pairs, without):
        for _ in trainer.run(until=T_A):
            pass
    assert with_pairs.augmenter.rng.state_dict()["cpu"].tolist() != without.augmenter.rng.state_dict()["cpu"].tolist()
    for a, b in zip(with_pairs.history, without.history):
        assert all(same(a[key], b[key]) for key in BACKBONE_METRICS)
        assert "train/aux/cesc_contrastive" in a and "train/aux/cesc_contrastive" not in b
    assert state_differences(with_pairs.model, without.model) == []
