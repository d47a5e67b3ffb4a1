"""What sharing prefixes saves for a set of runs, before anything starts (`ltsearch check`, `ablate --dry-run`).

An ablation's runs are known exactly. A sweep's trials are proposed while it runs, so its plan is
drawn from the space with a seeded random sampler (the split of the searched keys into pre- and
post-start ones is what decides how much is shared, and that split is exact); early stopping is not
counted, so both totals are upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ltsearch.config import RunConfig
from ltsearch.prefix.keys import method_prefix_keys, shared_prefix_of


@dataclass
class SharedPrefix:
    label: str
    runs: int = 0
    fork_epochs: set[int] = field(default_factory=set)

    @property
    def trunk_epochs(self) -> int:
        return max(self.fork_epochs)


@dataclass
class SharingPlan:
    """Per prefix key: how many runs fork it and at which epochs; epochs trained with and without sharing."""

    prefixes: dict[str, SharedPrefix] = field(default_factory=dict)
    epochs_alone: int = 0
    epochs_shared: int = 0
    runs: int = 0

    @classmethod
    def of(cls, configs: Iterable[RunConfig]) -> "SharingPlan":
        plan = cls()
        configs = list(configs)
        baseline_keys = method_prefix_keys(configs)
        for config in configs:
            plan.runs += 1
            plan.epochs_alone += config.train.epochs
            prefix = shared_prefix_of(config, baseline_keys)
            if prefix is None:
                plan.epochs_shared += config.train.epochs
                continue
            entry = plan.prefixes.setdefault(prefix.key, SharedPrefix(prefix.label.split("@")[0] + ":" + prefix.key[:8]))
            entry.runs += 1
            entry.fork_epochs.add(prefix.fork_epoch)
            plan.epochs_shared += config.train.epochs - prefix.fork_epoch
        plan.epochs_shared += sum(entry.trunk_epochs for entry in plan.prefixes.values())
        return plan

    def describe(self, *, sampled: bool = False) -> str:
        """Lines for `check` / `--dry-run`: the prefixes found and the epochs saved."""
        saved = self.epochs_alone - self.epochs_shared
        ratio = self.epochs_alone / max(1, self.epochs_shared)
        how = f" (from {self.runs} trials drawn at random; before early stopping)" if sampled else ""
        if not self.prefixes:
            return f"shared prefixes: none{how}: no run's method starts after epoch 0, so every run trains from scratch"
        shared_runs = sum(entry.runs for entry in self.prefixes.values())
        lines = [f"shared prefixes{how}: {len(self.prefixes)} for {shared_runs} of {self.runs} runs; epochs {self.epochs_alone} -> "
                 f"{self.epochs_shared} ({saved} saved, {ratio:.2f}x fewer; off with --no-share-prefix)"]
        shown = sorted(self.prefixes.values(), key=lambda entry: -entry.runs)
        for entry in shown[:8]:
            forks = ", ".join(str(e) for e in sorted(entry.fork_epochs))
            lines.append(f"  {entry.label}: {entry.runs} runs fork at epoch {forks}; trunk trains {entry.trunk_epochs} epochs once")
        if len(shown) > 8:
            lines.append(f"  ... and {len(shown) - 8} more")
        return "\n".join(lines)


def sampled_sweep_configs(sweep: Any) -> list[RunConfig]:
    """The sweep's grid cells and `num_trials` points drawn by a seeded random sampler, as run configs."""
    import optuna

    from ltsearch.config import build_run_config, with_threads
    from ltsearch.space import apply_point

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sweep.search.seed))
    for cell in sweep.cells:
        for _ in range(sweep.search.num_samples):
            study.enqueue_trial(dict(cell))
    points = [sweep.space.sample(study.ask()) for _ in range(sweep.num_trials)]
    cpus = sweep.execution.resources.cpu
    return [build_run_config(with_threads(apply_point(sweep.base, point), cpus)) for point in points]


def sweep_methods(sweep: Any) -> list[str]:
    """The methods a sweep's trials can use: the searched `augmenter.name` choices, else the base config's method."""
    from ltsearch.config import build_run_config

    for param in sweep.space.params:
        if param.key == "augmenter.name":
            return [str(value) for value in param.dist.values()]
    return [build_run_config(sweep.base).augmenter.name]


def ablation_configs(ablation: Any) -> list[RunConfig]:
    from ltsearch.config import build_run_config, with_threads
    from ltsearch.space import apply_point

    cpus = ablation.execution.resources.cpu
    return [build_run_config(with_threads(apply_point(ablation.base, run.point), cpus)) for run in ablation.runs]


def describe_sharing(configs: list[RunConfig], enabled: bool, *, sampled: bool = False) -> str:
    if not enabled:
        return "shared prefixes: off (share_prefix: false / --no-share-prefix): every run trains from epoch 0"
    return SharingPlan.of(configs).describe(sampled=sampled)
