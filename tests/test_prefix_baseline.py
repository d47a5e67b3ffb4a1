"""The method-off row on the shared trunk, exactly; and selection that cannot hide the method.

SAFA and M2m are idle before T, so a run without a method trains [0, T) as they do: their prefix keys
agree, and a baseline forked from a trunk that SAFA (or M2m) trained equals the baseline trained from
scratch, `==` on every metric of every epoch and on the final weights, and the other way round. A method
whose pre-T behaviour differs (RSG trains its centres, LCReg declares pre-T keys) never shares with it.
A run whose method starts at T selects its best epoch among epochs >= T by default (`train.select_epochs`).

Everything runs on the embedded digits set (a 40-per-class slice, a 16-wide small CNN, 4 epochs on one
CPU thread), as tests/test_prefix_exact.py does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ltsearch.config import RunConfig, build_run_config, load_run_config
from ltsearch.engine import Trainer
from ltsearch.epochs import SELECTABLE
from ltsearch.prefix.keys import IDLE, method_prefix_keys, prefix_of, shared_prefix_of
from ltsearch.prefix.plan import SharingPlan
from tests.test_prefix_exact import BASE, EPOCHS, assert_identical_runs, scratch, train, trunk_snapshots

REPO = Path(__file__).resolve().parents[1]
T = 2
#: idle before T: the methods a baseline shares with; the others train (or read a key) before T
IDLE_METHODS = {"safa": [f"augmenter.start_epoch={T}"],
                "m2m": [f"augmenter.start_epoch={T}", "augmenter.m2m.reference_epochs=1", "augmenter.m2m.steps=2"]}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LTSEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def config(method: str, *overrides: str) -> RunConfig:
    extra = IDLE_METHODS.get(method, [f"augmenter.start_epoch={T}"] if method != "none" else [f"augmenter.start_epoch={T}"])
    return load_run_config(REPO / "configs" / "digits.yaml", [*BASE, f"augmenter.name={method}", *extra, *overrides])


def fork(run: RunConfig, state: dict) -> Trainer:
    prefix = prefix_of(run, baseline=True)
    trainer = Trainer(run)
    trainer.load_prefix(state, method_trains_before_start=prefix.trains_before_start)
    return train(trainer)


@pytest.mark.parametrize("method", sorted(IDLE_METHODS))
def test_baseline_and_idle_method_share_one_key(method: str) -> None:
    baseline, other = prefix_of(config("none"), baseline=True), prefix_of(config(method))
    assert baseline is not None and other is not None
    assert baseline.key == other.key and baseline.method == other.method == IDLE


@pytest.mark.parametrize("method", ["rsg", "lcreg"])
def test_methods_that_act_before_t_keep_their_own_trunk(method: str) -> None:
    assert prefix_of(config(method)).key != prefix_of(config("none"), baseline=True).key


def test_a_baseline_alone_has_no_prefix_and_a_pre_t_key_separates_it() -> None:
    assert prefix_of(config("none")) is None  # nobody to share with: no trunk, no snapshots
    assert prefix_of(config("none", "optim.lr=0.05"), baseline=True).key != prefix_of(config("safa")).key


@pytest.mark.parametrize("method", sorted(IDLE_METHODS))
def test_baseline_forked_from_a_method_trunk_equals_the_baseline_alone(method: str, tmp_path: Path) -> None:
    states = trunk_snapshots(config(method), (T,), tmp_path)  # the trunk as the method's run trains it
    baseline = config("none")
    assert_identical_runs(fork(baseline, states[T]), scratch(baseline), T)


@pytest.mark.parametrize("method", sorted(IDLE_METHODS))
def test_method_forked_from_the_baseline_trunk_equals_the_method_alone(method: str, tmp_path: Path) -> None:
    baseline = config("none")
    trunk = Trainer(build_run_config(prefix_of(baseline, baseline=True).trunk))
    states = {}
    for result in trunk.run(until=T):
        states[trunk.epoch] = result.trainer.state_dict()
    run = config(method)
    assert_identical_runs(fork(run, states[T]), scratch(run), T)


def test_ablation_plan_puts_the_baseline_on_the_method_trunk_only_where_keys_agree() -> None:
    runs = [config("none"), config("safa"), config("m2m"), config("rsg"), config("none", "optim.lr=0.05")]
    keys = method_prefix_keys(runs)
    assert shared_prefix_of(runs[0], keys).key == prefix_of(runs[1]).key
    assert shared_prefix_of(runs[4], keys) is None  # its key is no method run's: it trains alone
    plan = SharingPlan.of(runs)
    assert plan.epochs_alone == 5 * EPOCHS
    assert plan.epochs_shared == 5 * EPOCHS - 3 * T + T  # baseline, SAFA, M2m fork one trunk of T epochs
    assert "baseline:" in plan.describe() and "3 runs fork at epoch 2" in plan.describe()


def test_the_dry_run_names_the_keys_the_runs_use() -> None:
    """`--dry-run` plans with the threads a cell runs with (its CPUs): the key it prints is the directory the
    trunk is saved under, not a key of the same config without threads."""
    from ltsearch.ablate.cells import CellPlan
    from ltsearch.ablate.settings import load_ablation
    from ltsearch.prefix.plan import ablation_configs

    ablation = load_ablation(REPO / "ablations" / "examples" / "digits_losses.yaml",
                             ["augmenter={name: safa, start_epoch: 2}", "rows={none: {augmenter.name: none}, safa: {}}",
                              "baseline=none", "columns={}", "resources.cpu=2", "train.epochs=4"])
    cells = CellPlan.of(ablation, directory="unused")
    trained = {prefix_of(cells.run_config(run), baseline=True).key for run in ablation.runs}
    configs = ablation_configs(ablation)
    planned = {prefix_of(config, baseline=True).key for config in configs}
    assert planned == trained and len(trained) == len(ablation.runs) // 2  # each seed pair: one trunk for both rows
    assert all(config.train.threads == 2 for config in configs)


# ------------------------------------------------------------------------------------- selection
def test_a_method_run_selects_its_best_epoch_from_t_on_and_the_old_rule_stays_an_option() -> None:
    active = scratch(config("safa"))
    assert [row[SELECTABLE] for row in active.history] == [0] * T + [1] * (EPOCHS - T)
    scores = [row["val/top1"] for row in active.history]
    assert active.best["epoch"] == T + scores[T:].index(max(scores[T:]))
    every = scratch(config("safa", "train.select_epochs=all"))
    assert [row[SELECTABLE] for row in every.history] == [1] * EPOCHS
    scores = [row["val/top1"] for row in every.history]
    assert every.best["epoch"] == scores.index(max(scores))
    baseline = scratch(config("none"))
    assert [row[SELECTABLE] for row in baseline.history] == [1] * EPOCHS  # no method to wait for


@pytest.mark.parametrize(("rule", "chosen"), [("active", 3), ("all", 1)])
def test_the_best_pre_t_epoch_is_passed_over_unless_every_epoch_counts(rule: str, chosen: int) -> None:
    trainer = Trainer(config("safa", f"train.select_epochs={rule}"))
    for epoch, score in enumerate([10.0, 90.0, 50.0, 60.0]):  # epoch 1 (before T = 2) has the best val score
        trainer._judge({"epoch": epoch, "val/top1": score, "test/top1": score})
    assert trainer.best["epoch"] == chosen
    assert trainer.best["legacy/best_test_top1"] == 90.0  # the legacy best-test number looks at every epoch


def test_a_forked_run_judges_the_trunk_epochs_by_its_own_rule(tmp_path: Path) -> None:
    states = trunk_snapshots(config("safa"), (T,), tmp_path)
    baseline = fork(config("none"), states[T])
    assert [row[SELECTABLE] for row in baseline.history] == [1] * EPOCHS
    method = fork(config("safa"), states[T])
    assert [row[SELECTABLE] for row in method.history] == [0] * T + [1] * (EPOCHS - T)


# ------------------------------------------------------- a DRW or DRS switch at T does not act before it
DRW_AT_T = ["loss.reweight.kind=effective_number", f"loss.reweight.start_epoch={T}"]


def test_a_drw_switch_at_t_is_outside_the_key_and_the_trunk_and_one_before_t_is_inside() -> None:
    baseline = prefix_of(config("none", *DRW_AT_T), baseline=True)
    m2m = prefix_of(config("m2m"))  # M2m replaces DRW: LDAM + M2m (M2m Table 1) has no DRW
    assert baseline.key == m2m.key
    assert prefix_of(config("m2m", "loss.reweight.start_epoch=1")).key == m2m.key  # kind none: its other fields are inert
    assert baseline.trunk["loss"]["reweight"]["kind"] == "none"  # the trunk trains as every sharer does before T
    early = prefix_of(config("none", "loss.reweight.kind=effective_number", f"loss.reweight.start_epoch={T - 1}"), baseline=True)
    assert early.key != m2m.key and early.trunk["loss"]["reweight"]["kind"] == "effective_number"
    drs = prefix_of(config("safa", "loss.resample.sampler=class_balanced", f"loss.resample.start_epoch={T}"))
    assert drs.key == prefix_of(config("safa")).key


def test_drw_baseline_forked_from_the_m2m_trunk_and_back_equals_each_run_alone(tmp_path: Path) -> None:
    baseline, m2m = config("none", *DRW_AT_T), config("m2m")
    from_m2m = trunk_snapshots(m2m, (T,), tmp_path / "m2m")
    assert_identical_runs(fork(baseline, from_m2m[T]), scratch(baseline), T)
    from_baseline = Trainer(build_run_config(prefix_of(baseline, baseline=True).trunk))
    states = {}
    for result in from_baseline.run(until=T):
        states[from_baseline.epoch] = result.trainer.state_dict()
    assert_identical_runs(fork(m2m, states[T]), scratch(m2m), T)
