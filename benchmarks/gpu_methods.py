"""Each method trains a few epochs on CIFAR-10-LT on the GPU: finite losses, moving aux terms, diagnostics.

The CPU suite proves this on small slices of the real files (tests/test_methods_cifar.py); this is the same
check at full size on CUDA, where TF32 matrix products and cuDNN's algorithm choice change the arithmetic.
One row per method: the train loss per epoch, each auxiliary term's first and last value, the method's own
per-epoch diagnostics, and seconds per epoch.

    python -m benchmarks.gpu_methods --set data.name=npz data.path=.bench/cifar10_lt.npz data.imbalance=1
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from ltsearch.config import load_run_config
from ltsearch.data import build_dataset
from ltsearch.engine import Trainer

from benchmarks._options import parse_with_overrides

REPO = Path(__file__).resolve().parents[1]


def check(method: str, data, args) -> str:
    overrides = [f"data.root={args.data_root}", f"train.device={args.device}", *args.overrides, f"augmenter.name={method}",
                 f"train.epochs={args.epochs}", "augmenter.start_epoch=1", "augmenter.m2m.reference_epochs=2"]
    trainer = Trainer(load_run_config(REPO / "configs" / "cifar10_lt.yaml", overrides), data=data)
    rows, seconds = [], []
    for result in trainer.run():
        rows.append(result.metrics)
        seconds.append(result.metrics["epoch_seconds"])
    losses = [row["train/loss"] for row in rows]
    aux = {key.split("/")[-1]: (rows[1].get(key), rows[-1].get(key)) for key in rows[-1] if key.startswith("train/aux/")}
    diagnostics = {key.split("/", 1)[1]: value for key, value in rows[-1].items()
                   if key.startswith("aug/") and isinstance(value, (int, float))}
    finite = all(math.isfinite(value) for value in losses)
    return (f"| {method} | {'yes' if finite else 'NO'} | {', '.join(f'{v:.3f}' for v in losses)} | "
            f"{'; '.join(f'{k} {a:.4g} -> {b:.4g}' for k, (a, b) in aux.items()) or '-'} | "
            f"{'; '.join(f'{k} {v:.4g}' for k, v in list(diagnostics.items())[:5]) or '-'} | "
            f"{rows[-1]['val/top1']:.2f} | {', '.join(f'{s:.2f}' for s in seconds)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--methods", default="none,smart,safa,rsg,lcreg,m2m")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    args = parse_with_overrides(parser)
    os.environ.setdefault("LTSEARCH_CACHE", tempfile.mkdtemp(prefix="ltsearch-gpu-methods-"))
    data = build_dataset(load_run_config(REPO / "configs" / "cifar10_lt.yaml", [f"data.root={args.data_root}", *args.overrides]).data)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"### gpu_methods.py — {time.strftime('%Y-%m-%d')} — {device}, torch {torch.__version__}\n"
          f"CIFAR-10-LT rho=100 ({len(data.train)} images), ResNet-32, {args.epochs} epochs, methods active from epoch 1\n\n"
          "| method | finite | train loss per epoch | aux terms (epoch 1 -> last) | diagnostics (last epoch) | val top-1 | s/epoch |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for method in args.methods.split(","):
        try:
            print(check(method, data, args), flush=True)
        except Exception as error:  # one method's failure must not hide the others' rows
            print(f"| {method} | FAILED: {type(error).__name__}: {error} | | | | | |", flush=True)


if __name__ == "__main__":
    main()
