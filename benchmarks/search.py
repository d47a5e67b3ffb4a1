"""Search efficiency: ASHA + TPE against the exhaustive grid over the same digits space.

The space is a grid of learning rate x width x loss (36 configurations) on digits, `epochs` each. The
grid runs every configuration to the end (FIFO); its best validation top-1 (over trials and epochs)
is the target. ASHA + TPE then searches the same values (as choices) with the same trial budget; a
driver-side callback (the same seam MLflow tracking will use) records every epoch report in arrival
order, so "epochs spent" counts everything trained so far, including trials ASHA later stops. The
figure of merit is the fraction of the grid's epochs spent when ASHA + TPE first reaches a validation
top-1 within 0.5 point of the grid's best (also 1 and 2 points), per seed of TPE and as the median.

Validation is 25 images per class (250 images, 0.4 point per image), so "within 0.5 point" means
at most one image worse than the grid's best.

    python -m benchmarks.search --seeds 0 1 2 3 4 --write
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from ltsearch.tune import EPOCHS, load_sweep, run_sweep

from benchmarks._results import publish

REPO = Path(__file__).resolve().parents[1]
LRS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
WIDTHS = [16, 32, 64]
LOSSES = ["ce", "balanced_softmax"]


class Recorder(tune.Callback):
    """Every (trial, epochs, metric) report in the order the driver received it."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.reports: list[tuple[str, int, float]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reports.append((trial.trial_id, result[EPOCHS], result[self.metric]))


def space(kind: str) -> str:
    values = {"optim.lr": LRS, "model.width": WIDTHS, "loss.name": LOSSES}
    return "{" + ", ".join(f"{k}: {{{kind}: [{', '.join(map(str, v))}]}}" for k, v in values.items()) + "}"


def run(overrides: list[str], work: Path, name: str) -> list[tuple[str, int, float]]:
    recorder = Recorder("val/top1")
    sweep = load_sweep(REPO / "search_spaces" / "quickstart.yaml", overrides)
    run_sweep(sweep, directory=str(work / name), callbacks=[recorder], stream=io.StringIO(), progress_interval_s=1e9)
    return recorder.reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="the first is the headline")
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parser.parse_args()
    common = [f"train.epochs={args.epochs}", "data.val_fraction=0.5", "search.max_concurrent=2", "train.device=cpu"]
    grid_size = len(LRS) * len(WIDTHS) * len(LOSSES)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="ltsearch-search-"))
    try:
        start = time.perf_counter()
        grid = run([*common, f"space={space('grid')}", "search.sampler=grid", "search.num_samples=1", "scheduler={name: fifo}"], work, "grid")
        grid_s = time.perf_counter() - start
        grid_epochs = len(grid)
        target = max(value for _, _, value in grid)
        rows = []
        for seed in args.seeds:
            start = time.perf_counter()
            reports = run([*common, f"space={space('choice')}", "search.sampler=tpe", f"search.seed={seed}",
                           f"search.num_samples={grid_size}", "scheduler={name: asha, grace_period: 1, reduction_factor: 3}"],
                          work, f"asha-{seed}")
            seconds = time.perf_counter() - start
            best, reached = float("-inf"), {}
            for spent, (_, _, value) in enumerate(reports, start=1):
                best = max(best, value)
                for tolerance in args.tolerances:
                    if tolerance not in reached and best >= target - tolerance:
                        reached[tolerance] = spent
            rows.append({"seed": seed, "epochs": len(reports), "best": best, "reached": reached, "seconds": seconds})
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    lines = [
        f"### search.py — {time.strftime('%Y-%m-%d')} — CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "ASHA + TPE against the exhaustive grid over the same digits space.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (shared with other work)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `python -m benchmarks.search --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}"
        f" --tolerances {' '.join(map(str, args.tolerances))} --write`",
        f"- space: digits (quickstart.yaml), lr {LRS} x width {WIDTHS} x loss {LOSSES} = {grid_size} configurations, "
        f"{args.epochs} epochs, validation 250 images (0.4 point per image); 2 trials at a time; ASHA grace 1, reduction 3; "
        f"TPE gets {grid_size} trials",
        f"- grid: {grid_epochs} epochs in {grid_s:.0f} s; best val/top1 {target:.2f} (the best of {grid_epochs} evaluations)",
        "",
        "| TPE seed | " + " | ".join(f"fraction of the grid's epochs to within {t:g}" for t in args.tolerances)
        + " | epochs in all (fraction) | best val/top1 | wall s |",
        "|---|" + "---|" * (len(args.tolerances) + 3),
    ]
    for r in rows:
        cells = [f"{r['reached'][t] / grid_epochs:.3f} ({r['reached'][t]})" if t in r["reached"] else "not reached" for t in args.tolerances]
        lines.append(f"| {r['seed']} | {' | '.join(cells)} | {r['epochs']} ({r['epochs'] / grid_epochs:.2f}) | {r['best']:.2f} | {r['seconds']:.0f} |")
    lines.append("")
    for tolerance in args.tolerances:  # a seed that never got there counts as worse than any that did
        spent = sorted(r["reached"].get(tolerance, math.inf) for r in rows)
        median = statistics.median(spent)
        shown = "not reached by most seeds" if math.isinf(median) else f"{median / grid_epochs:.3f} of the grid's epochs"
        lines.append(f"- within {tolerance:g} point of the grid's best: median {shown} "
                     f"({sum(1 for x in spent if not math.isinf(x))} of {len(rows)} seeds got there)")
    text = "\n".join(lines) + "\n"
    publish(text, args.write)


if __name__ == "__main__":
    main()
