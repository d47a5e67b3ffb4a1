"""Training-step time of each augmenter relative to the same step without one (ratio, one run).

ResNet-32 on CIFAR-10-LT (rho = 100) batches of 128 drawn by the sampler each method asks for, at the
method's default insertion point, in its active phase (after T_th). All variants are timed round-robin
in one process so the ratios share the machine's load. Targets: <= 1.10 for SMART, RSG, LCReg,
<= 1.25 for SAFA; M2m is reported with its T (it runs T extra forward/backward passes by design).

    python -m benchmarks.augmenters --data-root ../shared/data --steps 10 --write   (from the repo root)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ltsearch.config import load_run_config
from ltsearch.data import build_dataset
from ltsearch.engine import Trainer

from benchmarks._options import overrides_flag, parse_with_overrides
from benchmarks._results import publish
from benchmarks._timing import endless_batches, time_steps

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"smart": 1.10, "rsg": 1.10, "lcreg": 1.10, "safa": 1.25}


def make_trainer(method: str, data, args) -> Trainer:
    overrides = [f"data.root={args.data_root}", f"train.device={args.device}", *args.overrides, f"augmenter.name={method}", "augmenter.start_epoch=0"]
    if method == "m2m":
        overrides += [f"augmenter.m2m.reference_epochs={args.m2m_reference_epochs}"]
    return Trainer(load_run_config(REPO / "configs" / "cifar10_lt.yaml", overrides), data=data)


def device_work(trainer: Trainer, stream, class_weights, steps: int) -> tuple[float, float]:
    """(kernels (and copies), ms of their device time) per step, from the profiler: when the kernels fill only a small part
    of the step, the step is bound by launching them from Python, and every extra op costs a launch, not FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(trainer, stream, class_weights, steps)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels)
    return len(kernels) / steps, busy_us / 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--methods", default="none,smart,safa,rsg,lcreg,m2m")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--m2m-reference-epochs", type=int, default=1, help="epochs of M2m's reference g (timing only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also count kernel launches and kernel time per step (CUDA)")
    args = parse_with_overrides(parser)
    os.environ.setdefault("LTSEARCH_CACHE", tempfile.mkdtemp(prefix="ltsearch-bench-"))

    methods = args.methods.split(",")
    base = load_run_config(REPO / "configs" / "cifar10_lt.yaml", [f"data.root={args.data_root}", *args.overrides])
    data = build_dataset(base.data)
    runs = {}
    for method in methods:
        trainer = make_trainer(method, data, args)
        sampler, class_weights = trainer.begin_epoch()  # M2m builds g here, outside the timing
        stream = endless_batches(trainer, sampler)
        time_steps(trainer, stream, class_weights, 2)  # warm-up
        runs[method] = (trainer, stream, class_weights, sampler)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method, (trainer, stream, class_weights, _) in runs.items():
            seconds[method].append(time_steps(trainer, stream, class_weights, args.steps) / args.steps)
    step = {m: statistics.median(v) for m, v in seconds.items()}
    trainer = runs[methods[0]][0]
    device = torch.cuda.get_device_name() if trainer.device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"### augmenters.py — {time.strftime('%Y-%m-%d')} — {device}",
             f"`python -m benchmarks.augmenters --steps {args.steps} --rounds {args.rounds}"
             f"{overrides_flag(args.overrides)}` (ResNet-32, CIFAR-10-LT rho=100, batch 128, "
             f"active phase, default insertion point, median of {args.rounds} rounds)", "",
             "| method | insert_at | sampler | ms/step | ratio vs none | target |", "|---|---|---|---|---|---|"]
    for method in methods:
        trainer, _, _, sampler = runs[method]
        ratio = step[method] / step["none"] if "none" in step else float("nan")
        if method == "m2m":
            target = f"reported (T = {trainer.config.augmenter.m2m.steps})"
        else:
            target = f"<= {TARGETS[method]:.2f} {'ok' if ratio <= TARGETS[method] else 'MISSED'}" if method in TARGETS else "-"
        lines.append(f"| {method} | {trainer.augmenter.insert_at} | {sampler} | {1000 * step[method]:.1f} | {ratio:.2f} | {target} |")
    lines.append("")
    if args.profile and trainer.device.type == "cuda":
        lines += ["| method | kernels/step | kernel ms/step | kernel time / step time |", "|---|---|---|---|"]
        for method, (trainer, stream, class_weights, _) in runs.items():
            kernels, busy_ms = device_work(trainer, stream, class_weights, 3)  # the profiler is slow: 3 steps
            lines.append(f"| {method} | {kernels:.0f} | {busy_ms:.2f} | {busy_ms / (1000 * step[method]):.0%} |")
        lines.append("")
    publish("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
