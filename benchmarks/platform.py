"""Platform overhead: wall time of `ltsearch tune` against a plain Python loop over the same trials and epochs.

1. `ltsearch tune FILE --set search.max_concurrent=1` runs the sweep (one trial at a time, so both sides
   use the same cores; ASHA stops whatever it stops).
2. A plain loop in a fresh Python process imports the engine, builds the dataset once and trains every
   trial's run config (from trials.parquet) for exactly the epochs that trial ran under Tune, with the
   same torch thread count, evaluating after each epoch as the engine does. No checkpoints, no Ray.

Both are timed as whole commands (interpreter start, imports, data, Ray start-up for Tune), in
alternating rounds so machine load hits both alike; the ratio of the medians is the figure of merit
(goal <= 1.10 on quickstart). Per-trial overhead = (tune - loop - Tune's fixed start-up) / trials,
where the fixed part is measured by a sweep of one 1-epoch trial minus its loop.

    python -m benchmarks.platform --rounds 2 --write
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file has the standard library's name. Running any script in benchmarks/ as a file puts this folder first
# on sys.path, so `import platform` anywhere (torch, Ray, this very file) finds this file: imported under that
# name it hands over the real module (the import system returns what sys.modules holds once a module has run).
if __name__ == "platform":
    import importlib.util
    import sysconfig

    _spec = importlib.util.spec_from_file_location("platform", Path(sysconfig.get_paths()["stdlib"]) / "platform.py")
    _stdlib_platform = importlib.util.module_from_spec(_spec)
    sys.modules["platform"] = _stdlib_platform
    _spec.loader.exec_module(_stdlib_platform)

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

from benchmarks._options import parse_with_overrides
from benchmarks._results import publish

REPO = Path(__file__).resolve().parents[1]
LTSEARCH = [str(Path(sys.executable).parent / "ltsearch")]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def tune_once(file: str, overrides: list[str], out: Path) -> float:
    sets = [arg for item in ["search.max_concurrent=1", *overrides] for arg in ("--set", item)]
    return timed([*LTSEARCH, "tune", file, *sets, "--out", str(out), "--progress-every", "3600"])


def loop_once(sweep_dir: Path) -> float:
    return timed([sys.executable, "-m", "benchmarks.platform", "--loop", str(sweep_dir)])


def plain_loop(sweep_dir: Path) -> None:
    """The baseline: what a user would write without the platform, over the trials the sweep ran."""
    import yaml

    from ltsearch.data import build_dataset
    from ltsearch.engine import Trainer
    from ltsearch.results import read_table
    from ltsearch.tune import parse_sweep, trial_run_config
    from ltsearch.tune.trainable import _plan

    sweep = parse_sweep(yaml.safe_load((sweep_dir / "sweep.yaml").read_text()), source="sweep.yaml")
    plan = _plan(sweep)
    data = None
    for trial in read_table(sweep_dir / "trials.parquet"):
        config = trial_run_config(plan, json.loads(trial["config"]))
        data = data or build_dataset(config.data)
        trainer = Trainer(config, data=data)
        for result in trainer.run():
            if result.epoch + 1 >= trial["epochs"]:
                break


def measure(file: str, overrides: list[str], rounds: int, work: Path) -> dict:
    tune_s, loop_s, fixed = [], [], []
    trials = epochs = 0
    for index in range(rounds):
        out = work / f"sweep-{index}"
        tune_s.append(tune_once(file, overrides, out))
        loop_s.append(loop_once(out))
        from ltsearch.results import read_table
        rows = read_table(out / "trials.parquet")
        trials, epochs = len(rows), sum(r["epochs"] for r in rows)
        one = work / f"one-{index}"
        fixed_tune = tune_once(file, [*overrides, "search.num_samples=1", "train.epochs=1", "scheduler={name: fifo}"], one)
        fixed.append(fixed_tune - loop_once(one))
    tune_med, loop_med, fixed_med = statistics.median(tune_s), statistics.median(loop_s), statistics.median(fixed)
    return {"trials": trials, "epochs": epochs, "tune_s": tune_s, "loop_s": loop_s, "fixed_s": fixed,
            "ratio": tune_med / loop_med, "per_trial_overhead_s": (tune_med - loop_med - fixed_med) / max(1, trials - 1)}


def report(file: str, overrides: list[str], rounds: int, result: dict) -> str:
    load = os.getloadavg()
    return "\n".join([
        f"### platform.py — {time.strftime('%Y-%m-%d')} — CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "`ltsearch tune` against a plain Python loop over the same trials and epochs.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (shared with other work)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `python -m benchmarks.platform --file {file} --rounds {rounds}"
        + "".join(f" --set {o}" for o in overrides) + " --write`",
        f"- sweep: {result['trials']} trials, {result['epochs']} epochs in all (one trial at a time, 1 torch thread)",
        f"- `ltsearch tune` wall: {', '.join(f'{t:.1f}' for t in result['tune_s'])} s; plain loop: "
        f"{', '.join(f'{t:.1f}' for t in result['loop_s'])} s",
        f"- **ratio tune / loop (medians): {result['ratio']:.3f}** (goal <= 1.10)",
        f"- fixed start-up of a sweep (1 trial of 1 epoch, tune minus loop): {', '.join(f'{t:.1f}' for t in result['fixed_s'])} s",
        f"- per-trial overhead beyond that: {result['per_trial_overhead_s']:.2f} s",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="search_spaces/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    parser.add_argument("--loop", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    args = parse_with_overrides(parser)
    if args.loop:
        plain_loop(args.loop)
        return
    work = Path(tempfile.mkdtemp(prefix="ltsearch-platform-"))
    try:
        result = measure(args.file, args.overrides, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(args.file, args.overrides, args.rounds, result)
    publish(text, args.write)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
