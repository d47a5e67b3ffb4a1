"""The data layer: sources -> long-tailed train/val/test splits -> samplers -> device-side loaders.

    data = build_dataset(cfg.data)                      # LongTailData; data.summary() is JSON-able
    loader = create_train_loader(data, cfg.data, batch_size=128, device=device, seed=0, head_mask=mask)
    for x, y in loader.epoch("instance"): ...          # x float32 in [0, 1] on device, y int64
    for x, y in eval_batches(data, "val", batch_size=512, device=device): ...
"""

from ltsearch.data.dataset import AugmentSpec, LongTailData, SourceData, build_dataset, verify_files
from ltsearch.data.loader import TrainLoader, create_train_loader, eval_batches
from ltsearch.data.splits import Split

__all__ = ["AugmentSpec", "LongTailData", "SourceData", "Split", "TrainLoader", "build_dataset",
           "create_train_loader", "eval_batches", "verify_files"]
