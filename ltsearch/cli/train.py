"""`ltsearch train CONFIG [--set k=v] [--out DIR]`: one plain run, no Ray (debugging, CI, a final retrain).

Writes into DIR: `config.yaml` (the resolved config, rerunnable as is), `checkpoint.pt` (after every
epoch, atomically), `history.parquet` (one row per epoch, rewritten each epoch) and `metrics.json`
(final and best-val metrics). An interrupted run continues with `ltsearch train --resume DIR`.
A run whose method starts at epoch T shares its first T epochs through the cache (`ltsearch.prefix.local`):
it continues from a cached snapshot of its prefix when one exists (a sweep's trunk: rerunning a sweep's
best.yaml skips them), else publishes its own at T into DIR/prefixes/ and the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ltsearch.cli._common import add_overrides
from ltsearch.config import apply_overrides, build_run_config, dump_yaml, read_yaml, to_dict
from ltsearch.errors import ConfigError, TrainingDiverged
from ltsearch.tracking.settings import SECTION, TrackingConfig, split_tracking

# torch, the engine, the data layer and the tracking records are imported by the functions that use them, so that
# building the CLI's parser (every command imports this module, `--help` too) does not pay ~2 s for them
if TYPE_CHECKING:
    from ltsearch.engine import EpochResult, Trainer
    from ltsearch.prefix.local import LocalSharing
    from ltsearch.tracking.record import RunRecorder

TRACKING_FILE = "tracking.yaml"  # the run's `tracking:` section, so --resume logs to the same place

PROGRESS_KEYS = (("train/loss", "loss", "{:.4f}"), ("train/cls_loss", "cls", "{:.4f}"), ("train/top1", "train", "{:.1f}"), ("val/top1", "val", "{:.2f}"),
                 ("val/bacc", "val-bacc", "{:.2f}"), ("test/top1", "test", "{:.2f}"), ("test/few", "few", "{:.1f}"),
                 ("lr", "lr", "{:.4g}"), ("epoch_seconds", "s", "{:.1f}"), ("images_per_s", "img/s", "{:.0f}"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train one configuration (no Ray)")
    parser.add_argument("config", nargs="?", help="run config YAML (default: the embedded digits default)")
    add_overrides(parser)
    parser.add_argument("--out", help="output directory (default: runs/<config>-<time>); must not already hold a run")
    parser.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its config; --set may change e.g. train.epochs)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="train every epoch and leave the cache alone (by default a run whose method starts at epoch T continues "
                             "from a snapshot of its shared prefix in the cache, e.g. a sweep's, or else publishes its own at T)")
    parser.set_defaults(handler=run)


def epoch_label(epoch: int, epochs: int) -> str:
    """Epochs are 0-indexed in data and numbered from 1 in everything printed (progress, summary, errors)."""
    return f"{epoch + 1:>3}/{epochs}"


def progress_line(result: EpochResult, epochs: int, augmenter_keys: tuple[str, ...] = ()) -> str:
    parts = [f"epoch {epoch_label(result.epoch, epochs)}"]
    for key, label, fmt in PROGRESS_KEYS:
        if key in result.metrics:
            parts.append(f"{label} {fmt.format(result.metrics[key])}")
    shown = [f"{key} {_short(result.metrics[f'aug/{key}'])}" for key in augmenter_keys if f"aug/{key}" in result.metrics]
    if shown:
        parts.append("[" + ", ".join(shown) + "]")
    return "  ".join(parts) + ("  *" if result.is_best else "")


def _short(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.3g}"


def _output_dir(args: argparse.Namespace) -> Path:
    from ltsearch.checkpoints import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE

    if args.out:
        out = Path(args.out)
    else:
        stem = Path(args.config).stem if args.config else "digits"
        out = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "a directory (or a path to create one), but it is a file")
    if any((out / name).exists() for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, "metrics.json")):
        raise ConfigError("--out", str(out), "a directory that does not already hold a run (nothing is ever overwritten)",
                          hint=f"Continue it with `ltsearch train --resume {out}`, or choose another --out.")
    return out


def _start(args: argparse.Namespace) -> tuple[Trainer, Path, TrackingConfig, LocalSharing | None]:
    """Validate everything (config, tracking, output directory) before the run directory is written."""
    from ltsearch.checkpoints import CHECKPOINT_FILE, checkpoint_candidates
    from ltsearch.data import verify_files
    from ltsearch.engine import Trainer

    if args.resume:
        out = Path(args.resume)
        if args.config or args.out:
            raise ConfigError("--resume", args.resume, "a run directory alone: the run continues with its own config.yaml",
                              hint="Drop CONFIG and --out; --set may still change e.g. train.epochs.")
        if not out.is_dir() or not checkpoint_candidates(out) or not (out / "config.yaml").is_file():
            raise ConfigError("--resume", str(out), f"a run directory written by `ltsearch train` (holding config.yaml and {CHECKPOINT_FILE})")
        saved = read_yaml(out / TRACKING_FILE) if (out / TRACKING_FILE).is_file() else {}
        raw, tracking = split_tracking(apply_overrides({**read_yaml(out / "config.yaml"), SECTION: saved}, args.overrides),
                                       source=str(out / "config.yaml"))
        config = build_run_config(raw, source=str(out / "config.yaml"))
        trainer = Trainer.restore(out, config=config)  # refuses a shorter run, an unsafe or unreadable checkpoint
        verify_files(trainer.data)
        if trainer.restore_note:
            print(trainer.restore_note, file=sys.stderr, flush=True)
        if args.overrides:
            (out / "config.yaml").write_text(dump_yaml(config))
        return trainer, out, tracking, None  # a resumed run neither forks nor publishes: how it started is not recorded
    source = args.config or "--set"
    raw, tracking = split_tracking(apply_overrides(read_yaml(args.config) if args.config else {}, args.overrides), source=source)
    config = build_run_config(raw, source=source)
    out = _output_dir(args)
    trainer = Trainer(config)  # checks the config against the backbone and reads the data before anything is written
    verify_files(trainer.data)  # an image list's files: all there, none empty, before the run directory exists
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("--out", str(out), f"a directory that can be created ({error.strerror or error})") from None
    (out / "config.yaml").write_text(dump_yaml(config))
    (out / TRACKING_FILE).write_text(yaml.safe_dump(dataclasses.asdict(tracking), sort_keys=False))
    return trainer, out, tracking, None if args.no_share_prefix else _share(trainer, out)


def _share(trainer: Trainer, out: Path) -> LocalSharing | None:
    from ltsearch.engine import default_cache_dir
    from ltsearch.prefix.local import share_locally

    sharing = share_locally(trainer, out, default_cache_dir())
    if sharing is not None:
        print(f"ltsearch train: {sharing.describe()}", flush=True)
    return sharing


def _open_tracking(trainer: Trainer, out: Path, tracking: TrackingConfig, experiment: str) -> RunRecorder | None:
    """One MLflow run (kind `train`) for this run directory; a resumed run continues the same MLflow run."""
    from ltsearch.tracking import record
    from ltsearch.tracking.record import RunRecorder

    tracker = record.start(tracking, experiment)
    if tracker is None:
        return None
    recorder = RunRecorder(tracker, str(out.resolve()), trainer.config.train.select_metric, "max")
    recorder.open_parent("train", out.name, to_dict(trainer.config, active_only=True), record.data_tags(trainer.data.construction))
    recorder.epochs(record.PARENT, trainer.history)
    return recorder


def _close_tracking(recorder: RunRecorder | None, trainer: Trainer, out: Path, status: str, error: str | None = None) -> bool:
    """Summarise and close the MLflow run; True when everything reached the store."""
    if recorder is None:
        return False
    from ltsearch.tracking import record

    counts = trainer.class_counts.tolist()
    rows = [{**row, record.CLASS_COUNTS: counts} for row in trainer.history]
    files = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.json") if (out / name).is_file()}
    recorder.summarize(record.PARENT, status, rows, planned_epochs=trainer.config.train.epochs, error=error, title=out.name, files=files)
    return not record.finish(recorder.tracker)


def run(args: argparse.Namespace) -> int:
    trainer, out, tracking, sharing = _start(args)
    experiment = Path(args.config).stem if args.config else "digits"
    recorder = _open_tracking(trainer, out, tracking, experiment)
    try:
        return _train(args, trainer, out, recorder, sharing)
    except KeyboardInterrupt:
        _close_tracking(recorder, trainer, out, "unfinished")
        raise
    except TrainingDiverged as error:
        _close_tracking(recorder, trainer, out, "error", str(error))
        raise
    except Exception as error:
        _close_tracking(recorder, trainer, out, "error", f"{type(error).__name__}: {error}")
        raise


def _train(args: argparse.Namespace, trainer: Trainer, out: Path, recorder: RunRecorder | None, sharing: LocalSharing | None) -> int:
    from ltsearch.engine import summarize
    from ltsearch.results import write_json, write_table
    from ltsearch.tracking import record

    epochs = trainer.config.train.epochs
    print(f"ltsearch train: {trainer.config.data.name} ({trainer.data.num_classes} classes, {int(trainer.class_counts.sum())} train images), "
          f"{trainer.config.model.name}, loss {trainer.config.loss.name}, augmenter {trainer.config.augmenter.name}, "
          f"device {trainer.device}; writing {out}", flush=True)
    keys = type(trainer.augmenter).progress_keys
    try:
        for result in trainer.run():
            result.save_checkpoint(out)
            if sharing is not None:
                sharing.publish_if_due(trainer)
            write_table(trainer.history, out / "history.parquet")
            if recorder is not None:
                recorder.epoch(record.PARENT, result.metrics)
            if not args.quiet:
                print(progress_line(result, epochs, keys), flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {trainer.epoch} epochs; continue with: ltsearch train --resume {out}", file=sys.stderr)
        _close_tracking(recorder, trainer, out, "unfinished")
        return 130
    except TrainingDiverged as error:
        kept = f"the last good checkpoint (after epoch {epoch_label(trainer.epoch - 1, epochs).strip()}) is in {out}" if trainer.epoch else "no epoch finished, so no checkpoint was written"
        error = error.with_note(kept)
        (out / "error.txt").write_text(f"{error}\n")
        raise error from None
    summary = summarize(trainer)
    write_json(summary, out / "metrics.json")
    best = summary["best"]
    shown = "  ".join(f"{key} {_format(best.get(key))}" for key in ("val/top1", "test/top1", "test/bacc", "test/many", "test/medium", "test/few"))
    best_epoch = "none" if summary["best_epoch"] is None else epoch_label(summary["best_epoch"], epochs).strip()
    print(f"done: best epoch {best_epoch} by {summary['select_metric']}: {shown}; {out / 'metrics.json'}")
    if _close_tracking(recorder, trainer, out, "completed"):
        print(f"tracked in MLflow ({recorder.tracker.uri}, experiment '{recorder.tracker.experiment_name}'); browse with: ltsearch ui")
    return 0


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
