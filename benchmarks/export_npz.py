"""Write the exact training split of a run config (long tail already made) to one `.npz` file.

Why: the CIFAR-10 python batches are 178 MB, more than a lent GPU machine's transfer allows, while the
12,406 images of CIFAR-10-LT (rho = 100) are 38 MB. The `npz` source reads the file back with
`imbalance: 1`, so a benchmark there trains on the same images, in the same order, with the same
normalisation as here. Evaluation splits are capped (`--eval-per-class`): the timed benchmarks only
need them to exist.

    python -m benchmarks.export_npz configs/cifar10_lt.yaml --set data.root=../shared/data --out .bench/cifar10_lt.npz
    python -m benchmarks.pipeline --set data.name=npz data.path=.bench/cifar10_lt.npz data.imbalance=1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ltsearch.config import load_run_config
from ltsearch.data import build_dataset

from benchmarks._options import parse_with_overrides


def export(config_path: str, overrides: list[str], eval_per_class: int, out: Path) -> dict[str, int]:
    """Save train (whole), val and test (first `eval_per_class` of each class) of the run's data; return the sizes."""
    data_config = load_run_config(config_path, [*overrides, f"data.max_eval_per_class={eval_per_class}"]).data
    data = build_dataset(data_config)
    if not data.in_memory:
        raise SystemExit(f"export_npz: data '{data.name}' is read from image files; only in-memory sources can be exported")
    arrays = {"class_names": np.array(data.class_names), "mean": np.array(data.mean, dtype=np.float64),
              "std": np.array(data.std, dtype=np.float64), "crop_padding": np.array(data.augment.crop_padding),
              "horizontal_flip": np.array(data.augment.horizontal_flip)}
    for name in ("train", "val", "test"):
        split = data.split(name)
        arrays[f"x_{name}"] = split.images.numpy()
        arrays[f"y_{name}"] = split.labels.numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return {name: len(data.split(name)) for name in ("train", "val", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config whose data section to export, e.g. configs/cifar10_lt.yaml")
    parser.add_argument("--eval-per-class", type=int, default=100, help="val and test images kept per class")
    parser.add_argument("--out", type=Path, required=True)
    args = parse_with_overrides(parser)
    sizes = export(args.config, args.overrides, args.eval_per_class, args.out)
    print(f"{args.out}: {sizes['train']} train, {sizes['val']} val, {sizes['test']} test images, "
          f"{args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
