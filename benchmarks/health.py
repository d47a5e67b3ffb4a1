"""Do the five methods train on the real benchmark? Finite losses, aux terms that move, diagnostics, accuracy.

On the real CIFAR-10 files (CIFAR-10-LT, rho = 100, LDAM construction, a per-class slice), ResNet-32, no
gradient clipping, for each core loss and each method at its paper defaults, in the two regimes the issue
names:

    scratch  active from a randomly initialised network (augmenter.start_epoch = 0), the recipe's
             warm-up lr (0.02, 0.04, ... over the first epochs);
    warm     activated on a trained network after the lr decay: weights from a baseline trained once
             (cached) with the same loss family, continued at a constant lr 0.001 (LDAM: with DRW on);

and the baseline (augmenter none) continued the same way, so val top-1 compares like with like. A run
that goes non-finite is reported with the epoch, step and terms (the engine stops it); it never
aborts the table. Each aux term is shown as first epoch -> last epoch (its per-epoch training mean).

    python -m benchmarks.health --write                       (full table, ~15 min on 2 idle cores)
    python -m benchmarks.health --losses ce --epochs 1 ...    (a quick look)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ltsearch.config import load_run_config
from ltsearch.data import build_dataset
from ltsearch.engine import Trainer
from ltsearch.errors import TrainingDiverged

from benchmarks._results import publish

REPO = Path(__file__).resolve().parents[1]
METHODS = ("smart", "safa", "rsg", "lcreg", "m2m")
#: the core losses: (run config, overrides). LDAM uses the LDAM-DRW recipe (cosine classifier, DRW).
LOSSES: dict[str, tuple[str, list[str]]] = {
    "ce": ("cifar10_lt.yaml", []),
    "ldam_drw": ("ldam_drw_cifar10.yaml", []),
    "balanced_softmax": ("cifar10_lt.yaml", ["loss.name=balanced_softmax"]),
}
#: how the warm regime continues: constant lr 0.001, DRW (where the recipe has it) on from the start
WARM = ["optim.lr=0.001", "optim.schedule.warmup_epochs=0", "optim.schedule.milestones=[]", "optim.schedule.factors=[]",
        "loss.reweight.start_epoch=0"]


@dataclass
class HealthOptions:
    data_root: str
    max_train_per_class: int = 500
    max_eval_per_class: int = 100
    epochs: int = 3
    baseline_epochs: int = 15
    losses: tuple[str, ...] = tuple(LOSSES)
    methods: tuple[str, ...] = METHODS
    regimes: tuple[str, ...] = ("scratch", "warm")
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("LTSEARCH_CACHE", Path.home() / ".cache" / "ltsearch")) / "health")
    device: str = "auto"
    rows_file: Path | None = None  # JSON lines, one per finished run; runs already there are not run again


@dataclass
class HealthRow:
    loss: str
    regime: str
    method: str
    finite: bool
    failure: str | None
    aux: dict[str, tuple[float, float]]
    diagnostics: dict[str, float]
    val_top1: float | None
    baseline_val_top1: float | None = None
    seconds: float = 0.0


def _config(loss: str, options: HealthOptions, extra: list[str]):
    file, overrides = LOSSES[loss]
    common = [f"data.root={options.data_root}", f"data.max_train_per_class={options.max_train_per_class}",
              f"data.max_eval_per_class={options.max_eval_per_class}", f"train.device={options.device}", "optim.grad_clip=null"]
    return load_run_config(REPO / "configs" / file, [*common, *overrides, *extra])


def baseline_checkpoint(loss: str, options: HealthOptions, data: Any) -> Path:
    """The trained network the warm regime starts from: the loss's recipe without DRW, trained once and cached."""
    key = f"{loss}-{options.max_train_per_class}-{options.max_eval_per_class}-{options.baseline_epochs}"
    directory = options.cache_dir / f"baseline-{key}"
    if not (directory / "checkpoint.pt").is_file():
        config = _config(loss, options, [f"train.epochs={options.baseline_epochs}", "loss.reweight.kind=none",
                                         "optim.schedule.milestones=[]", "optim.schedule.factors=[]"])
        trainer = Trainer(config, data=data)
        for _ in trainer.run():
            pass
        trainer.save_checkpoint(directory)
    return directory


def method_overrides(method: str, regime: str, reference: Path) -> list[str]:
    """The method at its paper defaults, switched on from the first epoch of the run.

    M2m's g is the plain-CE baseline (an ERM network on the same data, which is what g is), so the
    check does not spend its time retraining g.
    """
    extra = [f"augmenter.name={method}"]
    if method != "none":
        extra.append("augmenter.start_epoch=0")
    if method == "m2m":
        extra.append(f"augmenter.m2m.reference_path={reference / 'checkpoint.pt'}")
    return extra


def run_one(loss: str, regime: str, method: str, options: HealthOptions, data: Any, baselines: dict[str, Path]) -> HealthRow:
    extra = [f"train.epochs={options.epochs}", *method_overrides(method, regime, baselines["ce"])]
    if regime == "warm":
        extra += [f"train.init_from={baselines[loss]}", *WARM]
    trainer = Trainer(_config(loss, options, extra), data=data, cache_dir=options.cache_dir)
    start, failure = time.perf_counter(), None
    try:
        for _ in trainer.run():
            pass
    except TrainingDiverged as error:
        failure = str(error)
    history = trainer.history
    aux_names = sorted({k for row in history for k in row if k.startswith("train/aux/")})
    aux = {name.removeprefix("train/aux/"): (history[0].get(name, float("nan")), history[-1].get(name, float("nan"))) for name in aux_names}
    diagnostics = {k.removeprefix("aug/"): v for k, v in (history[-1] if history else {}).items() if k.startswith("aug/")}
    return HealthRow(loss=loss, regime=regime, method=method, finite=failure is None, failure=failure, aux=aux, diagnostics=diagnostics,
                     val_top1=history[-1].get("val/top1") if history else None, seconds=time.perf_counter() - start)


def _recorded(options: HealthOptions) -> dict[tuple[str, str, str], HealthRow]:
    """Runs finished by an earlier invocation with the same rows file (a long table survives interruptions)."""
    if options.rows_file is None or not options.rows_file.is_file():
        return {}
    rows = [HealthRow(**{**raw, "aux": {k: tuple(v) for k, v in raw["aux"].items()}})
            for raw in map(json.loads, options.rows_file.read_text().splitlines())]
    return {(r.loss, r.regime, r.method): r for r in rows}


def _record(options: HealthOptions, row: HealthRow) -> None:
    if options.rows_file is not None:
        with open(options.rows_file, "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(row)) + "\n")


def run_health(options: HealthOptions, progress: bool = False) -> list[HealthRow]:
    base = _config("ce", options, [])
    data = build_dataset(base.data)
    baselines = {loss: baseline_checkpoint(loss, options, data) for loss in sorted(set(options.losses) | {"ce"})}
    done = _recorded(options)
    rows: list[HealthRow] = []
    for loss in options.losses:
        for regime in options.regimes:
            reference = None
            for method in ("none", *options.methods):
                row = done.get((loss, regime, method))
                if row is None:
                    row = run_one(loss, regime, method, options, data, baselines)
                    row.baseline_val_top1 = reference.val_top1 if reference else None
                    _record(options, row)
                    if progress:
                        print(f"{loss:>16} {regime:>7} {method:>6}: finite={row.finite} val={_fmt(row.val_top1)} "
                              f"({row.seconds:.0f} s) {row.failure or ''}", flush=True)
                reference = reference or row
                rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-2) else f"{value:.{digits}f}"


def render(rows: list[HealthRow], options: HealthOptions, command: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and options.device != "cpu" else f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    lines = [f"### health.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {device}",
             f"`{command}`", "",
             f"Real CIFAR-10-LT (rho = 100, LDAM construction) capped at {options.max_train_per_class} train / "
             f"{options.max_eval_per_class} val+test images per class; ResNet-32, no gradient clipping, {options.epochs} epochs per run. "
             f"scratch = active from random init at the recipe's warm-up lr; warm = from a baseline trained {options.baseline_epochs} epochs, "
             "continued at lr 0.001 (LDAM: DRW on). Aux terms: per-epoch training mean, first -> last epoch. "
             "Diagnostics: last epoch. val Δ = val top-1 minus the baseline continued the same way.", "",
             "| loss | regime | method | finite | aux terms (first -> last) | diagnostics (last epoch) | val top-1 | val Δ | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        aux = "; ".join(f"{name} {_fmt(a, 3)} -> {_fmt(b, 3)}" for name, (a, b) in row.aux.items()) or "-"
        diag = "; ".join(f"{name} {_fmt(value, 3)}" for name, value in row.diagnostics.items() if not name.endswith(("_min", "_max")) or name.startswith("omega")) or "-"
        finite = "yes" if row.finite else f"**no**: {row.failure}"
        delta = "-" if row.val_top1 is None or row.baseline_val_top1 is None or row.method == "none" else f"{row.val_top1 - row.baseline_val_top1:+.2f}"
        lines.append(f"| {row.loss} | {row.regime} | {row.method} | {finite} | {aux} | {diag} | {_fmt(row.val_top1)} | {delta} | {row.seconds:.0f} |")
    finite = sum(r.finite for r in rows)
    lines += ["", f"{finite} of {len(rows)} runs finite.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--max-train-per-class", type=int, default=500)
    parser.add_argument("--max-eval-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--regimes", default="scratch,warm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", help="JSON-lines file of finished runs: appended to, and runs already in it are skipped")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    options = HealthOptions(data_root=args.data_root, max_train_per_class=args.max_train_per_class, max_eval_per_class=args.max_eval_per_class,
                            epochs=args.epochs, baseline_epochs=args.baseline_epochs, losses=tuple(args.losses.split(",")),
                            methods=tuple(args.methods.split(",")), regimes=tuple(args.regimes.split(",")), device=args.device,
                            rows_file=Path(args.rows) if args.rows else None)
    rows = run_health(options, progress=True)
    command = "python -m benchmarks.health " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("write", "data_root", "rows") and v != parser.get_default(k))
    publish(render(rows, options, command.strip() + (" --write" if args.write else "")), args.write)


if __name__ == "__main__":
    main()
