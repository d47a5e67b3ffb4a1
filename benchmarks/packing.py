"""GPU packing: aggregate training images/s of 1, 2, 4 and 8 concurrent ResNet-32 trials on one GPU.

Each point is a sweep of n trials (train.seed 0..n-1, so the trials are distinct but equal in cost)
with `resources.gpu = 1/n` and n running at once. A trial's rate is the median of its per-epoch
`images_per_s` after the first epoch (cuDNN autotuning, the first copy of the data to the device);
all n run side by side for the whole sweep, so their sum is the GPU's aggregate rate at that packing.
Nothing isolates the trials' memory: the batch must fit n times.

Data: CIFAR-10-LT (rho = 100, 12,406 images) when `--data-root` holds cifar-10-batches-py, else the
embedded digits resized to 32x32 (a smaller epoch, the same per-image cost). Needs a CUDA GPU; without
one it says so and measures nothing.

    python -m benchmarks.packing --data-root ../shared/data --epochs 4 --write
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from ltsearch.config import apply_overrides, read_yaml
from ltsearch.tune import parse_sweep, run_sweep

from benchmarks._options import overrides_flag, parse_with_overrides
from benchmarks._results import publish

REPO = Path(__file__).resolve().parents[1]


def base_config(data_root: Path | None) -> tuple[dict, str]:
    if data_root is not None and (data_root / "cifar-10-batches-py" / "data_batch_1").is_file():
        raw = read_yaml(REPO / "configs" / "cifar10_lt.yaml")
        raw["data"]["root"] = str(data_root)
        return raw, "CIFAR-10-LT rho=100"
    raw = read_yaml(REPO / "configs" / "digits.yaml")
    raw["data"].update({"image_size": 32, "imbalance": 1})
    return raw, "digits resized to 32x32 (balanced, 1,240 images)"


def measure(base: dict, trials: int, epochs: int, cpus: int, work: Path) -> tuple[float, list[float]]:
    raw = {**base, "model": {**base.get("model", {}), "name": "resnet32"},
           "train": {**base.get("train", {}), "epochs": epochs, "device": "cuda"},
           "space": {"train.seed": {"grid": list(range(trials))}},
           "search": {"sampler": "grid", "num_samples": 1, "max_concurrent": trials},
           "scheduler": {"name": "fifo"}, "resources": {"cpu": max(1, cpus // trials), "gpu": 1.0 / trials},
           "tracking": {"enabled": False}}  # the GPU's rate is measured, not MLflow's
    outcome = run_sweep(parse_sweep(raw, source=f"packing x{trials}"), directory=str(work / f"x{trials}"), stream=io.StringIO(),
                        progress_interval_s=1e9)
    rates = []
    for trial in outcome.trials:
        rows = [h for h in outcome.history if h["trial_id"] == trial["trial_id"] and h["epoch"] >= 1]
        rates.append(statistics.median(h["images_per_s"] for h in rows))
    return sum(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--config", type=Path, help="base run config (default: configs/cifar10_lt.yaml when --data-root holds "
                                                    "CIFAR-10, else digits at 32x32); --set applies on top")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = parse_with_overrides(parser)
    if not torch.cuda.is_available():
        print("benchmarks/packing.py: no CUDA GPU visible; nothing measured")
        return
    base, data = (read_yaml(args.config), str(args.config)) if args.config else base_config(args.data_root)
    if args.overrides:
        base = apply_overrides(base, args.overrides)
        data = f"{data}, with {' '.join(args.overrides)}"
    cpus = os.cpu_count() or 1
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="ltsearch-packing-"))
    rows = []
    try:
        for count in args.counts:
            total, rates = measure(base, count, args.epochs, cpus, work)
            rows.append((count, total, rates))
            print(f"{count} trials: {total:.0f} images/s in all ({', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    finally:
        ray.shutdown()
    single = rows[0][1]
    lines = [
        f"### packing.py — {time.strftime('%Y-%m-%d')} — {torch.cuda.get_device_name(0)}",
        "Concurrent ResNet-32 trials sharing one GPU through fractional `resources.gpu`.",
        "",
        f"- machine: {torch.cuda.get_device_name(0)}, {cpus} CPU cores, torch {torch.__version__}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `python -m benchmarks.packing{' --data-root ' + str(args.data_root) if args.data_root else ''}"
        f"{' --config ' + str(args.config) if args.config else ''} "
        f"--epochs {args.epochs} --counts {' '.join(map(str, args.counts))}{overrides_flag(args.overrides)} --write`",
        f"- data: {data}; median images/s per trial over epochs 2..{args.epochs}",
        "",
        "| trials on the GPU | resources.gpu | aggregate images/s | x one trial | per trial |",
        "|---|---|---|---|---|",
    ]
    for count, total, rates in rows:
        lines.append(f"| {count} | {1 / count:.3g} | {total:.0f} | {total / single:.2f} | {statistics.mean(rates):.0f} |")
    text = "\n".join(lines) + "\n"
    publish(text, args.write)


if __name__ == "__main__":
    main()
