"""Tracking overhead: the quickstart sweep tracked into a fresh sqlite MLflow store against the same sweep untracked.

Both run as users run them (`ltsearch tune FILE`, whole commands: interpreter, imports, Ray, data, the sweep
and, when tracked, the end-of-sweep reconciliation with its plots and artifacts), one trial at a time so both
train the same trials for the same epochs (checked, and printed), in alternating rounds so machine load hits
both alike. The figure of merit is the ratio of the medians (goal <= 1.05). The first tracked sweep creates the
sqlite store (MLflow's schema migrations run then); later rounds log into that store, as a user's sweeps do.

    python -m benchmarks.tracking --rounds 3 --write
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._options import parse_with_overrides
from benchmarks._results import publish

REPO = Path(__file__).resolve().parents[1]
LTSEARCH = str(Path(sys.executable).parent / "ltsearch")


def sweep_once(file: str, overrides: list[str], out: Path, tracking: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, epochs trained in all) of one `ltsearch tune` command."""
    from ltsearch.results import read_table

    sets = [arg for item in ["search.max_concurrent=1", *overrides, *tracking] for arg in ("--set", item)]
    start = time.perf_counter()
    subprocess.run([LTSEARCH, "tune", file, *sets, "--out", str(out), "--progress-every", "3600"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, sum(int(row["epochs"]) for row in read_table(out / "trials.parquet"))


def measure(file: str, overrides: list[str], rounds: int, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    tracked, untracked, epochs = [], [], set()
    store = f"sqlite:///{work / 'mlruns.db'}"  # created by the first tracked sweep, reused after (as a user's store is)
    for index in range(rounds):
        order = [("untracked", ["tracking.enabled=false"]), ("tracked", [f"tracking.uri={store}"])]
        for name, tracking in (order if index % 2 == 0 else order[::-1]):
            wall, trained = sweep_once(file, overrides, work / f"{name}-{index}", tracking, env)
            (tracked if name == "tracked" else untracked).append(wall)
            epochs.add(trained)
    return {"tracked_s": tracked, "untracked_s": untracked, "epochs": sorted(epochs),
            "ratio": statistics.median(tracked) / statistics.median(untracked)}


def report(file: str, overrides: list[str], rounds: int, result: dict) -> str:
    load = os.getloadavg()
    same = "the same" if len(result["epochs"]) == 1 else "DIFFERENT"
    return "\n".join([
        f"### tracking.py — {time.strftime('%Y-%m-%d %H:%M %Z')} — CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU lent to this task",
        "The quickstart sweep tracked into a fresh sqlite MLflow store against the same sweep with `tracking.enabled=false`.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- command: `python -m benchmarks.tracking --file {file} --rounds {rounds}" + "".join(f" --set {o}" for o in overrides) + " --write`",
        f"- epochs trained per sweep: {', '.join(map(str, result['epochs']))} ({same} in every run; one trial at a time)",
        f"- tracked wall: {', '.join(f'{t:.1f}' for t in result['tracked_s'])} s (the first into a new store, which MLflow "
        "creates and migrates; the others into that store); untracked: "
        f"{', '.join(f'{t:.1f}' for t in result['untracked_s'])} s",
        f"- **ratio tracked / untracked (medians): {result['ratio']:.3f}** (goal <= 1.05)",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="search_spaces/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parse_with_overrides(parser)
    work = Path(tempfile.mkdtemp(prefix="ltsearch-tracking-"))
    try:
        result = measure(args.file, args.overrides, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(report(args.file, args.overrides, args.rounds, result), args.write)


if __name__ == "__main__":
    main()
