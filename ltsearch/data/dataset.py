"""From a registered source to the long-tailed train / val / test splits a run uses.

The order of operations is the protocol, so it lives in one place (`assemble`):

1. the source hands over its balanced training pool and its test split (and an official val split,
   if it ships one);
2. validation is cut off first, so it never overlaps training or test images: `val_source: test` takes
   the first ceil(f · n_c) test images of each class (M2m's protocol, the rest is test);
   `val_source: train` takes the first ceil(f · min_c n_c) of each class from the training pool
   *before* the long tail is made, so val stays balanced;
3. the long-tail profile and construction shrink the remaining pool (skipped when ρ = 1 or when the
   source's list already is the long tail, as ImageNet-LT's);
4. `max_train_per_class` / `max_eval_per_class` cap the result for small, fast slices.

Everything that decides which images a run sees is written into `LongTailData.construction`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ltsearch.config import DataConfig
from ltsearch.data.longtail import CONSTRUCTIONS, construct
from ltsearch.data.splits import Split, cap_per_class, ceil_fraction, take_first_per_class
from ltsearch.errors import ConfigError, DataError
from ltsearch.registry import DATASETS


@dataclass(frozen=True)
class AugmentSpec:
    """How a source's training images may be perturbed: a property of the data, not of the run.

    In-memory sources use a random crop with `crop_padding` zero pixels per side and, where the
    classes are mirror-invariant, a horizontal flip (digits are not: a flipped 2 is no digit).
    File sources use ImageNet's RandomResizedCrop instead of the padded crop.
    """

    crop_padding: int = 0
    horizontal_flip: bool = True
    random_resized_crop: bool = False


@dataclass
class SourceData:
    """What a registered source returns: the pools before any validation rule or long tail.

    `long_tail_given` marks a training list that already is the long tail (ImageNet-LT, Places-LT,
    iNaturalist ship theirs); `val` is an official validation split when the source has one.
    """

    train: Split
    test: Split
    class_names: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec
    files: list[str]
    val: Split | None = None
    long_tail_given: bool = False


@dataclass
class LongTailData:
    """The splits of one run plus everything the model and the loader need to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec
    construction: dict[str, Any]
    config: DataConfig
    class_counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.class_counts = self.train.class_counts(self.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self.train.in_memory

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: expected 'train', 'val' or 'test'")
        return getattr(self, name)

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the data of a run (logged with every run and printed by `check`)."""
        counts = {name: self.split(name).class_counts(self.num_classes).tolist() for name in ("train", "val", "test")}
        train_counts = [n for n in counts["train"] if n > 0]
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "counts": counts,
            "totals": {name: sum(per_class) for name, per_class in counts.items()},
            "observed_imbalance": max(train_counts) / min(train_counts) if train_counts else None,
            "construction": self.construction,
        }


#: the leading bytes of the formats torchvision.io.decode_image reads (JPEG, PNG, GIF, WebP, AVIF/HEIC)
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def _looks_like_an_image(head: bytes) -> bool:
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[4:8] == b"ftyp"


def verify_files(data: LongTailData) -> int:
    """Check, before anything runs or is written, that every image file a run will read is there and is an image.

    In-memory sources were read whole by `build_dataset` already; file sources (image lists) are checked
    here: each file must exist, be non-empty and start like a JPEG, PNG, GIF, WebP or AVIF/HEIC file.
    Raises DataError naming the first bad file (and how many more); returns the number of files checked.
    """
    checked = 0
    for name in ("train", "val", "test"):
        split = data.split(name)
        if split.in_memory:
            continue
        bad: list[tuple[str, str]] = []
        for path in dict.fromkeys(split.images):
            checked += 1
            try:
                with open(path, "rb") as handle:
                    head = handle.read(16)
            except FileNotFoundError:
                bad.append((path, "does not exist"))
                continue
            except OSError as error:
                bad.append((path, f"cannot be read ({error.strerror or error})"))
                continue
            if not head:
                bad.append((path, "is empty"))
            elif not _looks_like_an_image(head):
                bad.append((path, "is not a JPEG, PNG, GIF, WebP or AVIF/HEIC image"))
        if bad:
            path, problem = bad[0]
            more = f" (and {len(bad) - 1} more {name} file(s))" if len(bad) > 1 else ""
            raise DataError(f"{name} image '{path}' {problem}{more}; fix the list or the files under data.root before running")
    return checked


def build_dataset(cfg: DataConfig) -> LongTailData:
    """Load the configured source and apply the validation rule, the long tail and the caps."""
    cfg.validate("data")
    source = DATASETS.get(cfg.name).obj(cfg)
    return assemble(source, cfg)


def assemble(source: SourceData, cfg: DataConfig) -> LongTailData:
    """Steps 2-4 of the module docstring on an already loaded source (tests reuse one load)."""
    num_classes = len(source.class_names)
    if num_classes < 2:
        raise DataError(f"data source '{cfg.name}' has {num_classes} class(es); long-tailed classification needs at least 2")
    pool, val, test, val_rule = _split_validation(source, cfg, num_classes)
    train, long_tail = _make_long_tail(pool, source, cfg, num_classes)
    train = cap_per_class(train, cfg.max_train_per_class, num_classes)
    val = cap_per_class(val, cfg.max_eval_per_class, num_classes)
    test = cap_per_class(test, cfg.max_eval_per_class, num_classes)
    construction = {
        **long_tail,
        "val_source": cfg.val_source,
        "val_fraction": cfg.val_fraction,
        "val_rule": val_rule,
        "max_train_per_class": cfg.max_train_per_class,
        "max_eval_per_class": cfg.max_eval_per_class,
        "train_fingerprint": train.fingerprint(),
        "val_fingerprint": val.fingerprint(),
        "test_fingerprint": test.fingerprint(),
        "source_files": list(source.files),
    }
    return LongTailData(name=cfg.name, train=train, val=val, test=test, class_names=list(source.class_names),
                        in_chans=source.in_chans, image_size=cfg.image_size or source.image_size,
                        mean=source.mean, std=source.std, augment=source.augment,
                        construction=construction, config=cfg)


def _split_validation(source: SourceData, cfg: DataConfig, num_classes: int) -> tuple[Split, Split, Split, str]:
    """(training pool, val, test, a sentence describing the rule) with val disjoint from both."""
    if source.val is not None:
        return source.train, source.val, source.test, "the source's own validation split"
    if cfg.val_source == "test":
        per_class = ceil_fraction(cfg.val_fraction, source.test.class_counts(num_classes))
        val, test = take_first_per_class(source.test, per_class)
        return source.train, val, test, "first ceil(val_fraction * n_c) test images of each class (index order); the rest is test"
    if source.long_tail_given:
        raise ConfigError("data.val_source", "train", "'test' for this source (its training list already is the long tail)",
                          hint="Give data.val_list for an official validation list, or use val_source: test.")
    pool_counts = source.train.class_counts(num_classes)
    per_class = ceil_fraction(cfg.val_fraction, pool_counts.min()).expand(num_classes)
    val, pool = take_first_per_class(source.train, per_class)
    return pool, val, source.test, "first ceil(val_fraction * min_c n_c) training images of each class (index order), before the long tail"


def _make_long_tail(pool: Split, source: SourceData, cfg: DataConfig, num_classes: int) -> tuple[Split, dict[str, Any]]:
    if source.long_tail_given:
        return pool, {"profile": "given by the source's training list", "imbalance": None, "construction": None, "seed": None}
    if cfg.imbalance == 1:
        return pool, {"profile": "none (imbalance 1: the whole pool)", "imbalance": 1.0, "construction": None, "seed": None}
    pool_counts = pool.class_counts(num_classes)
    img_max = int(pool_counts.min())
    if img_max == 0:
        missing = torch.nonzero(pool_counts == 0).squeeze(1).tolist()
        raise DataError(f"data source '{cfg.name}': classes {missing} have no training images left to build a long tail from")
    indices, counts = construct(pool.labels, img_max, num_classes, cfg.profile, cfg.imbalance, cfg.construction, cfg.seed)
    seeded = CONSTRUCTIONS[cfg.construction].seeded
    record = {"profile": cfg.profile, "imbalance": cfg.imbalance, "construction": cfg.construction,
              "seed": cfg.seed if seeded else None, "img_max": img_max, "target_counts": counts}
    return pool.subset(indices), record
