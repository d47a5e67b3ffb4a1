"""Which knob mattered: each searched key's importance for each objective, from Optuna's evaluators, computed from
a finished sweep's own record (`ltsearch report DIR --importance`, and a section of the sweep's summary).

The study is rebuilt in memory from trials.parquet, because the one the search used lived inside Ray's searcher.
Each finished trial's sampled point is replayed through the space's own define-by-run function with an Optuna
`FixedTrial`, which records exactly the distributions the search drew from, so a conditional key appears only in
the trials whose method sampled it. Its value per objective is the one at its selected epoch (objectives.py).

Two evaluators, since they answer different questions:
- fANOVA (Hutter et al., ICML 2014; Optuna's random forest, 64 trees, seed 0): the share of the objective's
  variance that the key explains on its own (its main effect). Not normalised: the shares of all keys sum to at
  most 1, and what is missing is interactions and noise.
- PED-ANOVA (Watanabe et al., IJCAI 2023): how differently the key is distributed among the best trials (the top
  `quantile`, at least 5 of them) than among all; normalised to sum to 1 over the keys of its study.

Conditional keys: fANOVA needs every key in every trial it fits, so the keys every trial samples are evaluated over
all trials, and a method's own keys (`loss.ldam.max_m` when `loss.name = ldam`) over the trials that chose that
method, beside the unconditional keys (which share the variance with them, so a lone key is not credited with all
of it). Rows say which trials they come from; a group with fewer than MIN_TRIALS trials is listed without values.

Which trials: those that ended without error, completed or stopped early by the scheduler (said, since a stopped
trial's values are at fewer epochs). PBT is refused: its trials change their keys while they train.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna

from ltsearch.errors import ConfigError
from ltsearch.plots import importance_plot
from ltsearch.results import write_bytes_to, write_table_to, write_text_to
from ltsearch.space import Param
from ltsearch.tune._names import _join
from ltsearch.tune.pareto import trial_point
from ltsearch.tune.settings import Sweep

IMPORTANCE_TABLE = "importance.md"
IMPORTANCE_FILE = "importance.parquet"
IMPORTANCE_PLOT = "importance.png"
#: the fewest trials a group's importances are computed from
MIN_TRIALS = 5
#: the sweep's summary shows importances when at least this many trials finished
SUMMARY_MIN_TRIALS = 10
EVALUATORS = ("fANOVA", "PED-ANOVA")
FANOVA_TREES = 64
#: PED-ANOVA's top quantile is at least this share of the trials, and holds at least PED_TOP trials
PED_QUANTILE, PED_TOP = 0.1, 5
ALL = "all trials"


@dataclass
class Row:
    """One key in one group of trials: its importance per (evaluator, objective); None when not computed."""

    key: str
    group: str
    trials: int
    values: dict[tuple[str, str], float | None] = field(default_factory=dict)


@dataclass
class Importance:
    """The table: rows in order (all trials first, then one group per method), what was used, and what was left out."""

    metrics: tuple[str, ...]
    rows: list[Row]
    trials: int
    stopped: int
    notes: list[str]


def compute(sweep: Sweep, trials: list[dict[str, Any]]) -> Importance:
    """Importances of every searched key for every objective, from the rows of trials.parquet (see the module docstring)."""
    if sweep.scheduler.name == "pbt":
        raise ConfigError("--importance", sweep.name, "a sweep whose trials keep the keys they were sampled with; under PBT a trial's "
                          "keys change while it trains, so its final values did not produce its result")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per rebuilt study says nothing here
    objective = sweep.objective
    used = [row for row in trials if row.get("status") in ("completed", "stopped") and objective.values(row, "best/") is not None]
    if len(used) < MIN_TRIALS:
        raise ConfigError("--importance", f"{len(used)} trials", f"at least {MIN_TRIALS} trials that ended with a value for every objective",
                          hint="Run more trials, or resume the sweep until they finish.")
    replayed = [(_replay(sweep, row), objective.values(row, "best/")) for row in used]
    rows, notes = [], []
    for group, params, keys in _groups(sweep):
        members = [(point, values) for point, values in replayed if all(k in point[0] for k in keys)]
        if not members:
            notes.extend(f"{key} ({group}): no finished trial sampled it" for key in keys)
            continue
        varying = [p for p in params if len({repr(point[0].get(p.key)) for point, _ in members}) > 1]
        shown = [p.key for p in varying if p.key in keys]
        for key in keys:
            if key not in shown:
                notes.append(f"{key} ({group}): constant in these trials, no importance")
        if not shown:
            continue
        if len(members) < MIN_TRIALS:
            notes.extend(f"{key} ({group}): only {len(members)} trials sampled it, fewer than {MIN_TRIALS}" for key in shown)
            rows.extend(Row(key, group, len(members)) for key in shown)
            continue
        group_rows = {key: Row(key, group, len(members)) for key in shown}
        for index, (metric, mode) in enumerate(zip(objective.metrics, objective.modes)):
            study = _study([(point, values[index]) for point, values in members], [p.key for p in varying], mode)
            for evaluator, result in _evaluate(study).items():
                for key in shown:
                    group_rows[key].values[(evaluator, metric)] = result.get(key)
        rows.extend(sorted(group_rows.values(), key=lambda r: -(r.values.get((EVALUATORS[0], objective.metric)) or 0.0)))
    stopped = sum(row["status"] == "stopped" for row in used)
    return Importance(objective.metrics, rows, len(used), stopped, notes)


def _groups(sweep: Sweep) -> list[tuple[str, list[Param], list[str]]]:
    """(label, the keys of its study, the keys it reports): all trials with the keys every trial samples, then each
    condition (`loss.name = ldam`) with the unconditional keys and its own."""
    fixed = dict(sweep.space.fixed)
    always = [p for p in sweep.space.params if p.condition is None or p.condition.key in fixed]
    groups = [(ALL, always, [p.key for p in always])]
    conditions = list(dict.fromkeys(p.condition for p in sweep.space.params if p not in always))
    for condition in conditions:
        own = [p for p in sweep.space.params if p.condition == condition]
        others = [p for p in always if p.key != condition.key]
        groups.append((f"{condition.key} = {condition.value}", others + own, [p.key for p in own]))
    return groups


def _replay(sweep: Sweep, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, distributions) of a trial, as the search sampled them: its point replayed through the space."""
    trial = optuna.trial.FixedTrial(trial_point(row))
    try:
        sweep.space.sample(trial)
    except ValueError as error:
        raise ConfigError("trials.parquet", row["trial_id"], f"trials sampled from this sweep's space ({error})") from None
    return trial.params, trial.distributions


def _study(members: list[tuple[tuple[dict, dict], float]], keys: list[str], mode: str) -> optuna.Study:
    """A single-objective study of `keys` in memory: one complete trial per member, its value in the direction searched."""
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for (params, distributions), value in members:
        study.add_trial(optuna.trial.create_trial(params={k: params[k] for k in keys}, distributions={k: distributions[k] for k in keys},
                                                  value=value))
    return study


def _evaluate(study: optuna.Study) -> dict[str, dict[str, float]]:
    """fANOVA (unnormalised: shares of variance) and PED-ANOVA (normalised) on one study.

    Optuna warns about small samples on every call; the table says how many trials each row comes from instead."""
    count = len(study.trials)
    quantile = min(0.5, max(PED_QUANTILE, PED_TOP / count))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fanova = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=FANOVA_TREES, seed=0), normalize=False)
        ped = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile), normalize=True)
    return {EVALUATORS[0]: fanova, EVALUATORS[1]: ped}


def table(result: Importance, title: str) -> str:
    """Markdown: a heading saying what was used, the table, then what each evaluator measures and what was left out."""
    stopped = f"; {result.stopped} of them stopped early by the scheduler, their values at fewer epochs" if result.stopped else ""
    head = f"**Parameter importance, {title}: {result.trials} finished trials{stopped}**\n\n"
    columns = ["key", "trials", *[f"{e} {m}" for m in result.metrics for e in EVALUATORS]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result.rows:
        label = row.key if row.group == ALL else f"{row.key} (if {row.group})"
        cells = [_cell(row.values.get((e, m))) for m in result.metrics for e in EVALUATORS]
        lines.append("| " + " | ".join([label, str(row.trials), *cells]) + " |")
    quantile = f"the top {PED_QUANTILE:.0%} of trials (at least {PED_TOP}, at most half)"
    foot = (f"\nfANOVA: share of the objective's variance the key explains alone (main effect; {FANOVA_TREES} trees). "
            f"PED-ANOVA: how differently the key is distributed in {quantile} than in all, normalised to 1 over its study's keys. "
            "A key sampled only for one method is evaluated over the trials that chose it (its row says which).\n")
    notes = "".join(f"- {note}\n" for note in result.notes)
    return head + "\n".join(lines) + "\n" + foot + (f"\nleft out:\n{notes}" if notes else "")


def long_rows(result: Importance) -> list[dict[str, Any]]:
    """importance.parquet: one row per key, group, evaluator and objective."""
    return [{"key": row.key, "group": row.group, "trials": row.trials, "evaluator": evaluator, "metric": metric,
             "importance": row.values.get((evaluator, metric))}
            for row in result.rows for metric in result.metrics for evaluator in EVALUATORS]


def wide_rows(result: Importance) -> list[dict[str, Any]]:
    """The table's rows as mappings (for the plot and for MLflow's table view)."""
    return [{"label": row.key if row.group == ALL else f"{row.key} (if {row.group})", "trials": row.trials,
             **{f"{e} {m}": row.values.get((e, m)) for m in result.metrics for e in EVALUATORS}} for row in result.rows]


def write(result: Importance, directory: str, title: str) -> str:
    """importance.md, importance.parquet and importance.png in `directory`; returns the Markdown table."""
    text = table(result, title)
    write_text_to(text, _join(directory, IMPORTANCE_TABLE))
    write_table_to(long_rows(result), _join(directory, IMPORTANCE_FILE))
    write_bytes_to(importance_plot(wide_rows(result), list(result.metrics), list(EVALUATORS), f"parameter importance, {title}"),
                   _join(directory, IMPORTANCE_PLOT))
    return text


def _cell(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


__all__ = ["ALL", "EVALUATORS", "IMPORTANCE_FILE", "IMPORTANCE_PLOT", "IMPORTANCE_TABLE", "Importance", "MIN_TRIALS", "Row",
           "SUMMARY_MIN_TRIALS", "compute", "long_rows", "table", "wide_rows", "write"]
