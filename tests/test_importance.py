"""Parameter importance from a sweep's stored trials: a synthetic sweep whose objectives are known functions of its
keys (one key drives each objective, the others are noise), ranked by Optuna's real fANOVA and PED-ANOVA.

The trials are written as `ltsearch tune` writes them (sweep.yaml, trials.parquet), so `ltsearch report --importance`
reads exactly what it reads after a real sweep; the real-sweep path is covered in tests/test_pareto.py.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

from ltsearch.cli import main
from ltsearch.errors import ConfigError
from ltsearch.results import write_table_to
from ltsearch.tune import load_sweep
from ltsearch.tune.importance import ALL, EVALUATORS, compute

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
SPACE = ("space={optim.lr: {loguniform: [0.01, 0.3]}, optim.weight_decay: {loguniform: [1.0e-5, 1.0e-2]}, "
         "loss.name: {choice: [ce, ldam]}, loss.ldam.max_m: {uniform: [0.1, 0.8]}}")
TWO = ["metric=[val/top1, val/few]", "mode=[max, max]"]


def synthetic_trials(count: int, seed: int = 0) -> list[dict]:
    """val/top1 rises with log lr, val/few with log weight decay; loss.name and the margin change neither; small noise."""
    rng = random.Random(seed)
    trials = []
    for index in range(count):
        lr, wd = math.exp(rng.uniform(math.log(0.01), math.log(0.3))), math.exp(rng.uniform(math.log(1e-5), math.log(1e-2)))
        point = {"optim.lr": lr, "optim.weight_decay": wd, "loss.name": rng.choice(["ce", "ldam"])}
        if point["loss.name"] == "ldam":
            point["loss.ldam.max_m"] = rng.uniform(0.1, 0.8)
        stopped = index % 5 == 0
        trials.append({"trial_id": f"t{index:02d}", "status": "stopped" if stopped else "completed", "epochs": 3 if stopped else 10,
                       "planned_epochs": 10, "best_epoch": 2 if stopped else 9, "config": point, **point,
                       "best/val/top1": 60 + 30 * math.log(lr / 0.01) / math.log(30) + rng.gauss(0, 0.3),
                       "best/val/few": 20 + 40 * math.log(wd / 1e-5) / math.log(1000) + rng.gauss(0, 0.3)})
    return trials


def ranking(result, metric: str, evaluator: str) -> list[str]:
    rows = [row for row in result.rows if row.group == ALL]
    return [row.key for row in sorted(rows, key=lambda r: -r.values[(evaluator, metric)])]


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_the_key_that_drives_each_objective_ranks_first_and_noise_last(evaluator):
    sweep = load_sweep(QUICKSTART, [*TWO, SPACE, "scheduler={name: fifo}"])
    result = compute(sweep, synthetic_trials(40))
    assert result.trials == 40 and result.stopped == 8
    assert ranking(result, "val/top1", evaluator)[0] == "optim.lr"
    assert ranking(result, "val/few", evaluator)[0] == "optim.weight_decay"
    top1 = {row.key: row.values[(evaluator, "val/top1")] for row in result.rows if row.group == ALL}
    assert top1["optim.lr"] > 5 * max(top1["optim.weight_decay"], top1["loss.name"])
    (margin,) = [row for row in result.rows if row.key == "loss.ldam.max_m"]  # conditional: only over the trials that chose LDAM
    assert margin.group == "loss.name = ldam" and margin.trials == sum(t["config"]["loss.name"] == "ldam" for t in synthetic_trials(40))
    assert margin.values[(evaluator, "val/top1")] is not None


def test_one_objective_too():
    sweep = load_sweep(QUICKSTART, [SPACE, "scheduler={name: fifo}"])
    result = compute(sweep, synthetic_trials(30, seed=1))
    assert result.metrics == ("val/top1",)
    assert all(ranking(result, "val/top1", evaluator)[0] == "optim.lr" for evaluator in EVALUATORS)


def test_report_importance_prints_writes_and_says_where_it_logged(tmp_path, capsys, mlflow_store):
    sweep = load_sweep(QUICKSTART, [*TWO, SPACE, "scheduler={name: fifo}", "search.num_samples=40"])
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep.raw, sort_keys=False))
    write_table_to(synthetic_trials(40), str(tmp_path / "trials.parquet"))
    assert main(["report", str(tmp_path), "--importance"]) == 0
    out = capsys.readouterr().out
    assert "**Parameter importance, " in out and "| optim.lr | 40 |" in out and "loss.ldam.max_m (if loss.name = ldam)" in out
    assert "fANOVA val/few" in out and "PED-ANOVA val/top1" in out and "8 of them stopped early" in out
    assert (tmp_path / "importance.png").stat().st_size > 10_000 and (tmp_path / "importance.md").read_text() in out
    assert "no MLflow store at" in out and not Path(mlflow_store.removeprefix("sqlite:///")).exists()  # report never creates a store


def test_importance_refuses_pbt_too_few_trials_and_unfinished_sweeps(tmp_path, capsys):
    pbt = load_sweep(QUICKSTART, [SPACE.replace("loss.name: {choice: [ce, ldam]}, loss.ldam.max_m: {uniform: [0.1, 0.8]}", "model.width: {choice: [16]}"),
                                  "search.sampler=random", "scheduler={name: pbt}"])
    with pytest.raises(ConfigError, match="PBT"):
        compute(pbt, synthetic_trials(10))
    with pytest.raises(ConfigError, match="at least 5 trials"):
        compute(load_sweep(QUICKSTART, [SPACE]), synthetic_trials(4))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(load_sweep(QUICKSTART, [SPACE]).raw))
    assert main(["report", str(tmp_path), "--importance"]) == 2
    assert "a finished sweep (its trials.parquet)" in capsys.readouterr().err
