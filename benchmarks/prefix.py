"""Shared training prefixes: a SAFA sweep and a SAFA ablation on digits, each with and without sharing.

SAFA is idle before its start epoch T and its four loss weights (lambda_1..4 of Eq. 1) act only after it,
so trials and runs that differ in those weights train epochs [0, T) identically: with sharing (the
default) that prefix is trained once per key (a "trunk") and every run forks from its snapshot at T.

1. sweep: `ltsearch tune` of 8 trials over SAFA's four lambdas (log-uniform, a decade either side of the
   paper's values, as search_spaces/safa_lambdas.yaml), seeded random sampler (both modes draw the same 8
   points), tracking off, in two layouts of the 2 cores:
   - "1 x 2 CPUs, ASHA": one trial at a time with both cores (2 torch threads), ASHA as safa_lambdas.yaml
     runs it (rungs counted in epochs after T; grace 1, reduction factor 2). One trial at a time makes
     ASHA's stops independent of when results arrive, so both modes train the same trial-epochs.
   - "2 x 1 CPU, FIFO": two trials at once with one core each, every trial trained to the end. While the
     trunk trains, the second slot idles (its trial waits for the snapshot): with equal epoch costs this
     layout's ratio is at most n / (1.6 + 0.2 n) = 2.5 for n = 8, whatever sharing does.
2. ablation: `ltsearch ablate` leave-one-out, rows Full method / w/o L_r / w/o L_c x train seeds 0, 1
   (2 runs at once, 1 CPU each).

All on the embedded digits data with the repo's LDAM-DRW recipe for it (configs/digits_ldam_drw.yaml: SAFA's
paper recipe scaled to 20 epochs, DRW and the first lr step at 16 = 80 %), on ResNet-32 (the paper's CIFAR
backbone; `--model`), train.epochs E (default 200, the paper recipe's length, which the issue's arithmetic uses),
augmenter.start_epoch T = 80 % of E (the recipe's DRW/step point, scaled with E; SAFA's paper puts T just before
that point too). `--epochs 20` is a quick version (~2 min a sweep-asha round instead of ~12): there ~6 s of fixed
start-up per command, which sharing cannot remove, is a fifth of a shared command and pulls the wall ratio down. Each command runs as a user runs
it (a subprocess: interpreter, imports, data, Ray start-up, the trials and the outputs), with a fresh
$LTSEARCH_CACHE per command so nothing is reused between modes, in alternating order (sweep: shared first,
ablation: unshared first; `--unshared-first` swaps both). Measured per command: wall time; epochs actually
trained (trial epochs not marked `prefix/shared` plus the trunks' epochs from prefixes/summary.json); and
that every result is identical in both modes (exact equality): the sweep's configurations, every trial's
per-epoch metrics, its best trial (trials.parquet row and best.yaml), and every ablation run's result.json
and history. Timing fields (epoch_seconds, images_per_s) and the sharing markers are left out of the check.

    python -m benchmarks.prefix --only sweep-asha --rounds 2 --write      (the goal's workload, ~25 min here)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._results import publish

REPO = Path(__file__).resolve().parents[1]
LTSEARCH = str(Path(sys.executable).parent / "ltsearch")
SHARED = "prefix/shared"
# not results: how long an epoch took, where it ran, which trial id Ray drew, and the sharing markers themselves
VOLATILE = {"epoch_seconds", "images_per_s", "node_id", "trial_id", "prefix/key", SHARED, "seconds"}

SWEEP = """\
base: {base}
name: prefix_bench_safa
{recipe}
space:
  augmenter.safa.lambda_recycle: {{loguniform: [10.0, 1000.0]}}
  augmenter.safa.lambda_ms_tail: {{loguniform: [1.0e-3, 1.0e-1]}}
  augmenter.safa.lambda_ms_head: {{loguniform: [10.0, 1000.0]}}
  augmenter.safa.lambda_contrastive: {{loguniform: [1.0e-2, 1.0]}}
search: {{sampler: random, num_samples: {trials}, seed: 0, max_concurrent: {slots}}}
scheduler: {scheduler}
metric: val/top1
mode: max
resources: {{cpu: {cpu}, gpu: 0}}
tracking: {{enabled: false}}
"""

ABLATION = """\
name: prefix_bench_safa_loo
base: {base}
{recipe}
rows:
  Full method: {{augmenter.name: safa}}
  "w/o L_r": {{augmenter.name: safa, augmenter.safa.lambda_recycle: 0}}
  "w/o L_c": {{augmenter.name: safa, augmenter.safa.lambda_contrastive: 0}}
seeds: {{train: {seeds}, data: [0]}}
metric: test/top1
resources: {{cpu: {cpu}, gpu: 0}}
tracking: {{enabled: false}}
"""


@dataclass(frozen=True)
class Workload:
    """One command measured in both modes: what it runs, and how the 2 cores are laid out."""

    name: str
    kind: str  # "tune" or "ablate"
    label: str
    slots: int  # runs at once
    cpu: int  # CPUs (= torch threads) per run
    scheduler: str = "{name: fifo}"


def workloads(args: argparse.Namespace) -> list[Workload]:
    every = [Workload("sweep-asha", "tune", f"sweep: {args.trials} trials, 1 x 2 CPUs, ASHA", slots=1, cpu=2,
                      scheduler="{name: asha, grace_period: 1, reduction_factor: 2}"),
             Workload("sweep-fifo", "tune", f"sweep: {args.trials} trials, 2 x 1 CPU, FIFO", slots=2, cpu=1),
             Workload("ablation", "ablate", f"ablation: 3 rows x {len(args.seeds)} seeds, 2 x 1 CPU", slots=2, cpu=1)]
    return [load for load in every if args.only is None or load.name in args.only]


def recipe(args: argparse.Namespace) -> str:
    """The run settings both files share: the LDAM-DRW recipe's DRW and lr steps moved with T when E is not 20."""
    second = args.start + max(1, (args.epochs - args.start) // 2)
    return "\n".join([
        f"model: {{name: {args.model}}}",
        f"train: {{epochs: {args.epochs}, device: cpu}}",
        f"optim: {{schedule: {{name: step, warmup_epochs: 1, milestones: [{args.start}, {second}], factors: [0.1, 0.01]}}}}",
        f"loss: {{reweight: {{start_epoch: {args.start}}}}}",
        f"augmenter: {{name: safa, start_epoch: {args.start}}}",
    ])


# ------------------------------------------------------------------------------------ running
def run_command(kind: str, file: Path, out: Path, share: bool, cache: Path) -> tuple[float, str]:
    """(wall seconds, output) of one `ltsearch tune|ablate` command with its own fresh prefix cache."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["LTSEARCH_CACHE"] = str(cache)
    command = [LTSEARCH, kind, str(file), "--out", str(out), "--progress-every", "3600"]
    if not share:
        command.append("--no-share-prefix")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    (out.parent / f"{out.name}.log").write_text(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}")
    return wall, done.stdout


def shared_line(output: str) -> str | None:
    return next((line.strip() for line in output.splitlines() if line.startswith("shared prefixes:")), None)


# ------------------------------------------------------------------------------------ reading results
def _is_shared(row: dict[str, Any]) -> bool:
    value = row.get(SHARED)
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and int(value) == 1


def stable(row: dict[str, Any]) -> dict[str, Any]:
    """The row without timing fields and sharing markers (also under best/ and final/)."""
    out = {}
    for key, value in row.items():
        base = key.split("/", 1)[1] if key.startswith(("best/", "final/")) else key
        if key not in VOLATILE and base not in VOLATILE:
            out[key] = value
    return out


def same(a: Any, b: Any) -> bool:
    """Exact equality; nan equals nan (a missing value is the same missing value)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if hasattr(a, "tolist"):
        a = a.tolist()
    if hasattr(b, "tolist"):
        b = b.tolist()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def differences(where: str, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    a, b = stable(a), stable(b)
    found = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            # a column that is all-missing in one mode is simply absent from its table
            present = a.get(key, b.get(key))
            if present is None or (isinstance(present, float) and math.isnan(present)):
                continue
            found.append(f"{where}: {key} only in {'shared' if key in a else 'unshared'} ({present!r})")
        elif not same(a[key], b[key]):
            found.append(f"{where}: {key}: shared {a[key]!r} != unshared {b[key]!r}")
    return found


def trunk_epoch_seconds(rows_by_key: dict[str, list[dict[str, Any]]]) -> float:
    """Train seconds of the trunks: the prefix rows of one run per key carry the trunk's own epoch_seconds."""
    return sum(sum(r["epoch_seconds"] for r in rows if _is_shared(r)) for rows in rows_by_key.values())


def epoch_figures(runs: dict[str, list[dict[str, Any]]], directory: Path, start: int, slots: int) -> dict[str, Any]:
    """Epochs and train seconds actually spent, from the runs' histories and prefixes/summary.json."""
    summary_file = directory / "prefixes" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    trained = [r for rows in runs.values() for r in rows if not _is_shared(r)]
    reported = sum(len(rows) for rows in runs.values())
    by_key: dict[str, list[dict[str, Any]]] = {}
    for rows in runs.values():
        key = next((r.get("prefix/key") for r in rows if _is_shared(r)), None)
        if key is not None:
            by_key.setdefault(key, rows)
    trunk_epochs = sum(entry["epochs_trained"] for entry in summary.values())
    pre = [r["epoch_seconds"] for r in trained if r["epoch"] < start]
    post = [r["epoch_seconds"] for r in trained if r["epoch"] >= start]
    trunk_s, fork_s = trunk_epoch_seconds(by_key), sum(r["epoch_seconds"] for r in trained)
    # the shortest wall these epochs allow on `slots` slots: trunks side by side (a waiting run idles its slot), then the rest packed
    critical = math.ceil(len(by_key) / slots) * trunk_s / len(by_key) + fork_s / slots if by_key else fork_s / slots
    return {"runs": len(runs), "reported": reported, "trial_epochs": len(trained), "trunk_epochs": trunk_epochs, "critical_s": critical,
            "epochs": len(trained) + trunk_epochs, "trunks": len(summary), "forks": sum(e["forks"] for e in summary.values()),
            "forked_runs": sum(1 for rows in runs.values() if any(_is_shared(r) for r in rows)),
            "train_s": fork_s + trunk_s, "pre_epochs": len(pre), "post_epochs": len(post),
            "pre_epoch_s": statistics.median(pre) if pre else None, "post_epoch_s": statistics.median(post) if post else None,
            "summary": summary}


def read_sweep(directory: Path, start: int, slots: int) -> dict[str, Any]:
    from ltsearch.results import read_table

    trials = read_table(directory / "trials.parquet")
    history = read_table(directory / "history.parquet")
    point = {row["trial_id"]: json.dumps(row["config"], sort_keys=True) for row in trials}
    runs: dict[str, list[dict[str, Any]]] = {point[t["trial_id"]]: [] for t in trials}
    for row in history:
        runs[point[row["trial_id"]]].append(row)
    for rows in runs.values():
        rows.sort(key=lambda r: r["epoch"])
    best_yaml = "\n".join(line for line in (directory / "best.yaml").read_text().splitlines() if not line.startswith("#"))
    best_header = next(line for line in (directory / "best.yaml").read_text().splitlines() if "=" in line and line.startswith("#"))
    best_id = (directory / "best.yaml").read_text().splitlines()[0].split()[3]
    best = next(row for row in trials if row["trial_id"] == best_id)
    return {**epoch_figures(runs, directory, start, slots), "histories": runs, "trials": {point[t["trial_id"]]: t for t in trials},
            "best_after_start": sum(1 for t in trials if t["best_epoch"] is not None and t["best_epoch"] >= start),
            "best": best, "best_point": point[best_id], "best_yaml": best_yaml, "best_header": best_header.lstrip("# ")}


def read_ablation(directory: Path, start: int, slots: int) -> dict[str, Any]:
    from ltsearch.results import read_table

    runs, results = {}, {}
    for run in sorted((directory / "runs").iterdir()):
        if run.is_dir():
            runs[run.name] = sorted(read_table(run / "history.parquet"), key=lambda r: r["epoch"])
            results[run.name] = json.loads((run / "result.json").read_text())
    return {**epoch_figures(runs, directory, start, slots), "histories": runs, "results": results,
            "best_after_start": sum(1 for r in results.values() if r.get("best_epoch") is not None and r["best_epoch"] >= start)}


def compare_histories(a: dict[str, list[dict]], b: dict[str, list[dict]], label: str) -> list[str]:
    found = []
    for run in sorted(set(a) | set(b)):
        if run not in a or run not in b:
            found.append(f"{label} {run[:60]}: only in {'shared' if run in a else 'unshared'}")
            continue
        if len(a[run]) != len(b[run]):
            found.append(f"{label} {run[:60]}: {len(a[run])} epochs shared, {len(b[run])} unshared")
        for row_a, row_b in zip(a[run], b[run]):
            found.extend(differences(f"{label} {run[:60]} epoch {row_a['epoch']}", row_a, row_b))
    return found


def compare_sweeps(on: dict[str, Any], off: dict[str, Any]) -> list[str]:
    found = []
    if set(on["trials"]) != set(off["trials"]):
        found.append(f"sweep: the configurations differ: {len(set(on['trials']) ^ set(off['trials']))} not in both modes")
    if on["best_point"] != off["best_point"]:
        found.append(f"sweep best trial: shared {on['best_point']} != unshared {off['best_point']}")
    found.extend(differences("sweep best trial (trials.parquet)", on["best"], off["best"]))
    if on["best_yaml"] != off["best_yaml"]:
        found.append("sweep best.yaml: the configs differ")
    for point in sorted(set(on["trials"]) & set(off["trials"])):
        found.extend(differences(f"sweep trial {point[:60]} (trials.parquet)", on["trials"][point], off["trials"][point]))
    found.extend(compare_histories(on["histories"], off["histories"], "sweep trial"))
    return found


def compare_ablations(on: dict[str, Any], off: dict[str, Any]) -> list[str]:
    found = []
    for run in sorted(set(on["results"]) | set(off["results"])):
        a, b = on["results"].get(run), off["results"].get(run)
        if a is None or b is None:
            found.append(f"ablation run {run}: result.json only in {'shared' if b is None else 'unshared'}")
            continue
        found.extend(differences(f"ablation run {run} result.json", {k: v for k, v in a.items() if k != "metrics"},
                                 {k: v for k, v in b.items() if k != "metrics"}))
        found.extend(differences(f"ablation run {run} result.json metrics", a["metrics"], b["metrics"]))
    found.extend(compare_histories(on["histories"], off["histories"], "ablation run"))
    return found


# ------------------------------------------------------------------------------------ the benchmark
def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = {"base": REPO / "configs" / "digits_ldam_drw.yaml", "recipe": recipe(args), "trials": args.trials,
            "seeds": json.dumps(args.seeds)}
    walls: dict[tuple[str, bool], list[float]] = {}
    reads: dict[tuple[str, bool], dict[str, Any]] = {}
    lines: dict[tuple[str, bool], str | None] = {}
    problems: list[str] = []
    for index in range(args.rounds):
        for number, load in enumerate(workloads(args)):
            file = work / f"{load.name}.yaml"
            template = SWEEP if load.kind == "tune" else ABLATION
            file.write_text(template.format(**base, slots=load.slots, cpu=load.cpu, scheduler=load.scheduler))
            shared_first = (index + number + args.unshared_first) % 2 == 0
            for share in ([True, False] if shared_first else [False, True]):
                name = f"{load.name}-{'shared' if share else 'unshared'}-{index}"
                print(f"[{time.strftime('%H:%M:%S')}] {load.label}: ltsearch {load.kind} {'(sharing)' if share else '--no-share-prefix'} ...",
                      file=sys.stderr, flush=True)
                wall, output = run_command(load.kind, file, work / name, share, work / f"cache-{name}")
                print(f"    {wall:.1f} s; {shared_line(output) or 'no sharing line'}", file=sys.stderr, flush=True)
                walls.setdefault((load.name, share), []).append(wall)
                read = (read_sweep if load.kind == "tune" else read_ablation)(work / name, args.start, load.slots)
                previous = reads.setdefault((load.name, share), read)
                if previous is not read and previous["epochs"] != read["epochs"]:
                    problems.append(f"{load.name} {'shared' if share else 'unshared'}: {previous['epochs']} epochs in round 1, "
                                    f"{read['epochs']} in round {index + 1}")
                lines[(load.name, share)] = shared_line(output)
    for load in workloads(args):
        on, off = reads[(load.name, True)], reads[(load.name, False)]
        compare = compare_sweeps if load.kind == "tune" else compare_ablations
        problems.extend(f"{load.name}: {problem}" for problem in compare(on, off))
        if off["summary"] or off["forked_runs"] or lines[(load.name, False)]:
            problems.append(f"{load.name} --no-share-prefix: shared anyway ({off['summary']}, {off['forked_runs']} forked runs)")
        if on["forked_runs"] != on["runs"] or not on["summary"]:
            problems.append(f"{load.name} with sharing: {on['forked_runs']} of {on['runs']} runs forked, summary {on['summary'] or 'missing'}")
    return {"walls": walls, "reads": reads, "lines": lines, "problems": problems}


def per_epoch(read: dict[str, Any]) -> str:
    """Median train seconds of the epochs a run trained itself before T and from T on (shared: the trunk's are in the prefix rows)."""
    pre = "-" if read["pre_epoch_s"] is None else f"{read['pre_epoch_s']:.2f}"
    return f"{pre}, {read['post_epoch_s']:.2f}"


def ideal_ratio(off: dict[str, Any], on: dict[str, Any], start: int, slots: int, pre: float, post: float) -> float:
    """Unshared over shared compute time of the epochs each mode trained, on `slots` slots, perfectly packed, no
    start-up: the trunks run side by side (at most `slots` at once) while any other slot idles (its run waits for
    the snapshot), then the forks share the slots."""
    alone = (off["pre_epochs"] * pre + off["post_epochs"] * post) / slots
    shared = math.ceil(on["trunks"] / slots) * start * pre + on["post_epochs"] * post / slots
    return alone / shared


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    load_average = os.getloadavg()
    walls, reads = result["walls"], result["reads"]
    rows, figures, limits = [], {}, []
    for load in workloads(args):
        on, off = reads[(load.name, True)], reads[(load.name, False)]
        wall_on, wall_off = statistics.median(walls[(load.name, True)]), statistics.median(walls[(load.name, False)])
        figures[load.name] = (off["epochs"] / on["epochs"], wall_off / wall_on)
        even = ideal_ratio(off, on, args.start, load.slots, 1.0, 1.0)
        measured = ideal_ratio(off, on, args.start, load.slots, off["pre_epoch_s"], off["post_epoch_s"])
        limits.append(f"{load.label}: {even:.2f}x with equal epoch costs, {measured:.2f}x with the measured ones "
                      f"(from T an epoch costs {off['post_epoch_s'] / off['pre_epoch_s']:.1f}x one before T)")

        def walls_text(share: bool) -> str:
            return ", ".join(f"{w:.1f}" for w in walls[(load.name, share)])

        def rest(read: dict[str, Any], share: bool) -> float:
            return statistics.median(walls[(load.name, share)]) - read["critical_s"]

        rows.append(f"| {load.label} | unshared | {walls_text(False)} | {off['epochs']} ({off['trial_epochs']} + 0) | - | "
                    f"{per_epoch(off)} | {off['train_s']:.1f} | {off['critical_s']:.1f} | {rest(off, False):.1f} |")
        rows.append(f"| {load.label} | shared | {walls_text(True)} | {on['epochs']} ({on['trial_epochs']} + {on['trunk_epochs']}) | "
                    f"{on['trunks']} trunk(s), {on['forked_runs']} of {on['runs']} runs forked | {per_epoch(on)} | {on['train_s']:.1f} | "
                    f"{on['critical_s']:.1f} | {rest(on, True):.1f} |")
        rows.append(f"| {load.label} | **unshared / shared** | **{figures[load.name][1]:.2f}x** | **{figures[load.name][0]:.2f}x** | | | "
                    f"{off['train_s'] / on['train_s']:.2f}x | {off['critical_s'] / on['critical_s']:.2f}x | |")
    problems = result["problems"]
    identical = "IDENTICAL in both modes" if not problems else f"**{len(problems)} DIFFERENCE(S)** (listed below)"
    goals = [f"{load.label}: >= 3x fewer epochs {'met' if figures[load.name][0] >= 3.0 else 'MISSED'} ({figures[load.name][0]:.2f}x), "
             f">= 2.5x less wall {'met' if figures[load.name][1] >= 2.5 else 'MISSED'} ({figures[load.name][1]:.2f}x)"
             for load in workloads(args) if load.kind == "tune"]
    best = "; ".join((f"{load.name}: best trial {reads[(load.name, True)]['best_header']}, " if load.kind == "tune" else f"{load.name}: ")
                     + f"best-val epoch at or after T in {reads[(load.name, True)]['best_after_start']} of {reads[(load.name, True)]['runs']} runs"
                     for load in workloads(args))
    lines = [
        f"### prefix.py — {time.strftime('%Y-%m-%d %H:%M %Z')} — CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU lent to this task",
        "Shared training prefixes: SAFA sweeps and a SAFA leave-one-out ablation on digits, each with sharing (the default) "
        "and with `--no-share-prefix`; whole commands, alternating order, a fresh `$LTSEARCH_CACHE` per command.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
        f"load average at the end {load_average[0]:.2f} / {load_average[1]:.2f} / {load_average[2]:.2f}",
        f"- command: `python -m benchmarks.prefix --epochs {args.epochs} --start {args.start} --trials {args.trials} --model {args.model} "
        f"--seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds}{' --unshared-first' if args.unshared_first else ''}"
        f"{' --only ' + ' '.join(args.only) if args.only else ''} --write`",
        f"- workload: configs/digits_ldam_drw.yaml (LDAM-DRW) on {args.model}, SAFA at its default insertion point, train.epochs "
        f"{args.epochs}, augmenter.start_epoch T = {args.start} ({100 * args.start / args.epochs:.0f} %) = DRW start = first lr step, "
        "torch threads = CPUs per run, tracking off, checkpoint every epoch (the default)",
        f"- sweeps: SAFA's four lambdas of Eq. 1 (log-uniform, as search_spaces/safa_lambdas.yaml, T fixed), {args.trials} trials from "
        "a seeded random sampler (the same points in both modes, checked). 1 x 2 CPUs, ASHA: one trial at a time on both cores, "
        "ASHA counting epochs after T (grace 1, reduction factor 2) as the shipped search spaces do; one at a time, its stops do "
        "not depend on when results arrive, so both modes train the same trial-epochs. 2 x 1 CPU, FIFO: two trials at once, "
        "every trial to the end",
        f"- ablation: rows Full method / w/o L_r / w/o L_c (lambda_recycle = 0, lambda_contrastive = 0) x train seeds "
        f"{', '.join(map(str, args.seeds))}; lambdas are post-T knobs, so runs with the same seed share one trunk",
        "- sharing lines: " + "; ".join(f"{load.name} `{result['lines'][(load.name, True)]}`" for load in workloads(args)),
        "",
        "| workload | mode | wall s | epochs trained (trial + trunk) | prefixes | train s / epoch before T, from T | train s, summed | "
        "critical path s | wall - critical path s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- epochs trained: unshared = every epoch of every run; shared = the runs' epochs not marked `prefix/shared` plus the "
        "trunks' `epochs_trained` in prefixes/summary.json",
        "- train s / epoch: medians of epoch_seconds (training only; evaluation not included) of the epochs trained by the runs "
        "themselves, before T and from T on (SAFA active)",
        "- train s, summed: the epoch_seconds of every epoch trained (the trunks' from the prefix rows they hand to their forks); "
        "critical path: the shortest wall those epochs allow on the layout's slots (unshared: the sum / slots; shared: the trunks, "
        "side by side at most slots at once, while a waiting run holds any other slot idle, then the forks' epochs / slots); "
        "wall - critical path: start-up (interpreter, imports, data, Ray), evaluation, checkpoints, snapshots, outputs, other work",
        f"- ideal wall ratio (critical paths alone, no start-up, perfect packing): {'; '.join(limits)}",
        f"- results: {identical} (exact equality of each sweep's configurations, every trial's per-epoch metrics, the best "
        "trial's trials.parquet row and best.yaml, every ablation run's result.json and history; timing fields and sharing "
        f"markers left out); {best}",
        f"- **goals (sweeps): {'; '.join(goals)}**",
    ]
    if problems:
        lines += ["", "Differences:", *[f"- {p}" for p in problems[:40]]]
        if len(problems) > 40:
            lines.append(f"- ... and {len(problems) - 40} more")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200, help="train.epochs of every run (20: a quick version)")
    parser.add_argument("--start", type=int, help="augmenter.start_epoch T (default: 80 %% of --epochs)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--model", default="resnet32", help="the backbone (model.name)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the ablation's train seeds")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=["sweep-asha", "sweep-fifo", "ablation"], help="measure these workloads only")
    parser.add_argument("--unshared-first", action="store_true", help="start the first command without sharing (default: with)")
    parser.add_argument("--keep", type=Path, help="keep the sweeps and ablations in this (new) folder")
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.start = args.start if args.start is not None else int(0.8 * args.epochs)
    work = args.keep or Path(tempfile.mkdtemp(prefix="ltsearch-prefix-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    publish(report(args, result), args.write)
    if result["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
