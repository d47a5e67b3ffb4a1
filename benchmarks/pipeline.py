"""Images/s of ResNet-32 training on CIFAR-10-LT (rho = 100): the device-resident data path vs a
torchvision DataLoader pipeline with the same model, transforms (crop pad 4 + flip) and batch size.

Both variants run in one process, interleaved round by round, so the ratio is measured under the same
machine load. On CPU a full epoch is ~70 s per variant, so `--steps` times a fixed number of steps.

    python -m benchmarks.pipeline --data-root ../shared/data --steps 40 --write   (from the repo root)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ltsearch.config import load_run_config
from ltsearch.engine import Trainer

from benchmarks._options import overrides_flag, parse_with_overrides
from benchmarks._results import publish
from benchmarks._timing import endless_batches, time_steps

REPO = Path(__file__).resolve().parents[1]


class TensorImages(Dataset):
    """The same uint8 CHW training images, decoded per item by torchvision transforms (the classic pipeline)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ConvertImageDtype(torch.float32)])

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def dataloader_batches(trainer: Trainer, workers: int):
    train = trainer.data.train
    loader = DataLoader(TensorImages(train.images.cpu(), train.labels.cpu()), batch_size=trainer.config.optim.batch_size,
                        shuffle=True, num_workers=workers, pin_memory=trainer.device.type == "cuda",
                        persistent_workers=workers > 0, drop_last=True)
    while True:
        for x, y in loader:
            yield x.to(trainer.device, non_blocking=True), y.to(trainer.device, non_blocking=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=40, help="steps per timed round (a CIFAR-10-LT epoch is 97 steps)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parse_with_overrides(parser)

    config = load_run_config(REPO / "configs" / "cifar10_lt.yaml", [f"data.root={args.data_root}", f"train.device={args.device}", *args.overrides])
    trainer = Trainer(config)
    batch = config.optim.batch_size
    _, class_weights = trainer.begin_epoch()
    streams = {"resident": endless_batches(trainer, "instance"), "dataloader": dataloader_batches(trainer, args.workers)}
    for stream in streams.values():  # warm-up: worker start, allocator, cudnn autotune
        time_steps(trainer, stream, class_weights, 3)
    seconds: dict[str, list[float]] = {name: [] for name in streams}
    for _ in range(args.rounds):
        for name, stream in streams.items():
            seconds[name].append(time_steps(trainer, stream, class_weights, args.steps))
    rate = {name: args.steps * batch / statistics.median(values) for name, values in seconds.items()}
    ratio = rate["resident"] / rate["dataloader"]
    device = torch.cuda.get_device_name() if trainer.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"### pipeline.py — {time.strftime('%Y-%m-%d')} — {device}",
        f"`python -m benchmarks.pipeline --steps {args.steps} --rounds {args.rounds} --workers {args.workers}"
        f"{overrides_flag(args.overrides)}` "
        f"(ResNet-32, CIFAR-10-LT rho=100, batch {batch}, median of {args.rounds} rounds)",
        "",
        "| pipeline | images/s |",
        "|---|---|",
        f"| device-resident (ltsearch) | {rate['resident']:.0f} |",
        f"| torchvision DataLoader ({args.workers} workers) | {rate['dataloader']:.0f} |",
        f"| **ratio** | **{ratio:.2f}x** |",
        "",
    ]
    publish("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
