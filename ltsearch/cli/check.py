"""`ltsearch check FILE [--set k=v]`: validate a search file (or a run config) and say what it would launch.

Nothing is started: the space is parsed, every corner of it is built into a run config and checked
against the backbone, and the trial count, the epoch budget and the space are printed. Exit code 2
(one line naming the key) when anything is wrong, so it also serves as a CI check of shipped files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ltsearch.cli._common import add_overrides
from ltsearch.config import apply_overrides, build_run_config, read_yaml
from ltsearch.tracking.settings import TrackingConfig, split_tracking

if TYPE_CHECKING:
    from ltsearch.tune import Sweep


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("check", help="validate a search file or run config and print trials, epochs and the space; starts nothing")
    parser.add_argument("file", help="search file (with `space:`) or run config YAML")
    add_overrides(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raw = apply_overrides(read_yaml(args.file), args.overrides)
    if "rows" in raw:  # an ablation file: the same validation as `ltsearch ablate --dry-run`
        from ltsearch.ablate.settings import load_ablation

        from ltsearch.prefix.plan import ablation_configs, describe_sharing

        ablation = load_ablation(args.file, args.overrides)
        print(ablation.describe())
        print(describe_sharing(ablation_configs(ablation), ablation.execution.share_prefix))
        return 0
    if "space" not in raw:
        from ltsearch.engine import check_compatible

        raw, tracking = split_tracking(raw, source=args.file)
        config = build_run_config(raw, source=args.file)
        check_compatible(config)
        print(f"{args.file}: a valid run config: 1 run of {config.train.epochs} epochs "
              f"({config.data.name}, {config.model.name}, loss {config.loss.name}, augmenter {config.augmenter.name}); "
              f"run it with `ltsearch train {args.file}`")
        print(describe_tracking(tracking, Path(args.file).stem))
        return 0
    from ltsearch.tune import parse_sweep

    sweep = parse_sweep(raw, source=args.file)
    print(describe(sweep))
    return 0


def describe(sweep: "Sweep") -> str:
    """What `check` prints: validity, trials, epochs, the shared prefixes, the space, and how it would run."""
    from ltsearch.prefix.plan import describe_sharing, sampled_sweep_configs
    from ltsearch.tune.objectives import EPOCH_RULE_TEXT

    search, execution, objective = sweep.search, sweep.execution, sweep.objective
    grid = f" = {len(sweep.cells)} grid cells x {search.num_samples}" if sweep.cells else ""
    lines = [
        f"{sweep.source}: valid ({sweep.corners_checked} corners of the space built and checked)",
        f"trials: {sweep.num_trials}{grid} (sampler {search.sampler}{describe_population(sweep)}, seed {search.seed}, "
        f"{'at most ' + str(search.max_concurrent) if search.max_concurrent else 'as many as resources allow'} at once)",
        f"epochs: at most {sweep.max_epochs} per trial, at most {sweep.max_epochs * sweep.num_trials} in all "
        f"(scheduler {sweep.scheduler.describe(sweep.max_active_epochs)}, counting epochs after the method's start epoch)",
        describe_sharing(sampled_sweep_configs(sweep), execution.share_prefix, sampled=True),
        f"metric: {objective.describe()}" if not objective.multi else
        f"objectives: {objective.describe()}; each trial at {EPOCH_RULE_TEXT}; the Pareto front of the completed trials is written "
        "as pareto.parquet, pareto.png and pareto/NN.yaml",
        *describe_judged(sweep),
        f"resources per trial: {execution.resources.cpu:g} cpu, {execution.resources.gpu:g} gpu; "
        f"checkpoint every {execution.checkpoint.every} epoch(s); retries {execution.max_failures}",
        f"sweep directory: {(execution.storage or 'runs').rstrip('/')}/{execution.name or sweep.source.rsplit('/', 1)[-1].rsplit('.', 1)[0]}-<time>",
        describe_tracking(sweep.tracking, sweep.name),
        "space:",
    ]
    rows = sweep.space.describe()
    width = max(len(key) for key, _, _ in rows)
    dist_width = max(len(dist) for _, dist, _ in rows)
    lines += [f"  {key.ljust(width)}  {dist.ljust(dist_width)}  {condition}".rstrip() for key, dist, condition in rows]
    return "\n".join(lines)


def describe_judged(sweep: "Sweep") -> list[str]:
    """With several objectives: which one the scheduler stops trials by, and why that one (FIFO stops none)."""
    if not sweep.scheduler.judges or not sweep.objective.multi:
        return []
    metric, mode = sweep.judged
    why = "as scheduler.metric says" if sweep.scheduler.metric else "the first objective (scheduler.metric chooses another)"
    return [f"scheduler {sweep.scheduler.name} judges: {metric} ({mode}), {why}"]


def describe_population(sweep: "Sweep") -> str:
    """NSGA-II samples at random until its first generation is complete: say when a sweep is too short to evolve."""
    from ltsearch.tune.algorithms import NSGA_POPULATION, SAMPLERS

    if not SAMPLERS.get(sweep.search.sampler).meta.get("population"):
        return ""
    size = sweep.search.population_size or NSGA_POPULATION
    generations = sweep.num_trials / size
    note = "; fewer trials than two generations: mostly random, set search.population_size" if generations < 2 else ""
    return f", population {size}, {generations:.1f} generations{note}"


def describe_tracking(tracking: TrackingConfig, experiment: str) -> str:
    if not tracking.enabled:
        return "tracking: off (tracking.enabled: false)"
    return f"tracking: MLflow at {tracking.resolved_uri()}, experiment '{tracking.experiment or experiment}'"
