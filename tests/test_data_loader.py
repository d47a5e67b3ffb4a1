"""The resident loader: batched crop/flip against slicing, exact wiring, reproducibility and resume."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltsearch.augmenters.base import head_class_mask
from ltsearch.config import DataConfig
from ltsearch.data import build_dataset, create_train_loader, eval_batches
from ltsearch.data.augment import horizontal_flip, random_crop, to_unit_range
from ltsearch.data.loader import FileLoader, ResidentLoader, _storage_device
from ltsearch.data.samplers import instance
from ltsearch.errors import ConfigError
from ltsearch.registry import SAMPLERS

CFG = DataConfig()


@pytest.fixture(scope="module")
def digits():
    return build_dataset(CFG)


def collect(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------ batched ops
def test_random_crop_equals_slicing_the_padded_image():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    offsets = torch.tensor([[0, 4], [2, 1]])
    crops = random_crop(images, offsets, padding=2)
    padded = F.pad(images, (2, 2, 2, 2))
    assert crops.shape == images.shape
    assert torch.equal(crops[0], padded[0, :, 0:5, 4:9])
    assert torch.equal(crops[1], padded[1, :, 2:7, 1:6])
    assert torch.equal(crops[0, :, :2, :], torch.zeros(3, 2, 5))  # zero padding enters from the top
    assert torch.equal(random_crop(images, torch.tensor([[2, 2], [2, 2]]), padding=2), images)


def test_horizontal_flip_mirrors_only_the_marked_images():
    images = torch.arange(2 * 1 * 2 * 3).view(2, 1, 2, 3)
    flipped = horizontal_flip(images, torch.tensor([True, False]))
    assert flipped[0, 0].tolist() == [[2, 1, 0], [5, 4, 3]] and torch.equal(flipped[1], images[1])


def test_to_unit_range_scales_and_resizes():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    out = to_unit_range(images, 3)
    assert out.dtype == torch.float32 and out[0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert to_unit_range(images, 6).shape == (1, 1, 6, 6)


def test_to_unit_range_is_the_correctly_rounded_division_and_keeps_a_cropped_batchs_layout():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    exact = torch.tensor([k / 255 for k in range(256)], dtype=torch.float64).float().view(1, 1, 16, 16)
    assert torch.equal(to_unit_range(pixels, 16), exact)  # the float32 nearest to k/255, on every device
    cropped = random_crop(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 5, (4, 2)), 2)
    assert cropped.is_contiguous(memory_format=torch.channels_last)
    assert to_unit_range(cropped, 8).is_contiguous(memory_format=torch.channels_last)  # convs run channels-last on CPU


# ------------------------------------------------------------------------------------ the loader
def test_unaugmented_epoch_is_the_sampler_order_of_the_training_images(digits):
    cfg = dataclasses.replace(CFG, augment="none")
    loader = create_train_loader(digits, cfg, batch_size=64, device="cpu", seed=7)
    batches = list(loader.epoch("instance"))
    assert len(loader) == len(batches) == math.ceil(len(digits.train) / 64)
    assert [len(y) for _, y in batches[:-1]] == [64] * (len(batches) - 1)
    x, y = collect(batches)
    order = instance(digits.train.labels, digits.class_counts, num_samples=len(digits.train), batch_size=64,
                     generator=torch.Generator().manual_seed(7), head_mask=None)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, digits.train.labels[order])
    assert torch.allclose(x, digits.train.images[order].float() / 255)


def test_digits_are_cropped_but_never_flipped(digits):
    loader = create_train_loader(digits, CFG, batch_size=128, device="cpu", seed=3)
    x, _ = collect(loader.epoch("instance"))
    order = instance(digits.train.labels, digits.class_counts, num_samples=len(digits.train), batch_size=128,
                     generator=torch.Generator().manual_seed(3), head_mask=None)
    padded = F.pad(digits.train.images[order].float() / 255, (1, 1, 1, 1))
    crops = torch.stack([padded[:, :, r:r + 8, c:c + 8] for r in range(3) for c in range(3)], 1)  # (N, 9, 1, 8, 8)
    matches = (crops == x[:, None]).flatten(2).all(2)
    assert bool(matches.any(1).all())  # every sample is one of the 9 unflipped crops of its image
    moved = ~matches[:, 4]  # index 4 = offset (1, 1) = the image itself
    assert 0.7 < moved.float().mean() < 0.95  # 8 of 9 offsets move the image (up to blank borders)


def test_flips_happen_about_half_the_time_when_the_source_allows(digits):
    mirror_ok = dataclasses.replace(digits, augment=dataclasses.replace(digits.augment, crop_padding=0, horizontal_flip=True))
    loader = create_train_loader(mirror_ok, CFG, batch_size=128, device="cpu", seed=0)
    x, _ = collect(loader.epoch("instance"))
    order = instance(digits.train.labels, digits.class_counts, num_samples=len(digits.train), batch_size=128,
                     generator=torch.Generator().manual_seed(0), head_mask=None)
    originals = digits.train.images[order].float() / 255
    same = (x == originals).flatten(1).all(1)
    mirrored = (x == originals.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0.4 < (mirrored & ~same).float().mean() < 0.6


def test_same_seed_same_batches_and_resume_repeats_the_next_epoch(digits):
    first = create_train_loader(digits, CFG, batch_size=50, device="cpu", seed=11)
    twin = create_train_loader(digits, CFG, batch_size=50, device="cpu", seed=11)
    other = create_train_loader(digits, CFG, batch_size=50, device="cpu", seed=12)
    epoch1 = collect(first.epoch("class_balanced"))
    assert all(torch.equal(a, b) for a, b in zip(epoch1, collect(twin.epoch("class_balanced"))))
    assert not torch.equal(epoch1[0], collect(other.epoch("class_balanced"))[0])
    state = first.state_dict()
    resumed = create_train_loader(digits, CFG, batch_size=50, device="cpu", seed=999)
    resumed.load_state_dict(state)
    epoch2 = collect(first.epoch("instance"))
    assert all(torch.equal(a, b) for a, b in zip(epoch2, collect(resumed.epoch("instance"))))
    assert not torch.equal(epoch1[1], epoch2[1])


def test_epoch_state_is_fixed_when_the_epoch_starts_even_if_it_is_cut_short(digits):
    full = create_train_loader(digits, CFG, batch_size=50, device="cpu", seed=4)
    cut = create_train_loader(digits, CFG, batch_size=50, device="cpu", seed=4)
    list(full.epoch("instance"))
    next(iter(cut.epoch("instance")))
    assert torch.equal(full.state_dict()["generator"], cut.state_dict()["generator"])


def test_head_tail_batches_through_the_loader(digits):
    head_mask = head_class_mask(digits.class_counts, 0.5)
    loader = create_train_loader(digits, CFG, batch_size=16, device="cpu", seed=0, head_mask=head_mask)
    for _, y in list(loader.epoch("head_tail"))[:-1]:
        assert bool((~head_mask[y[:8]]).all()) and bool(head_mask[y[8:]].all())


def test_unknown_sampler_names_the_config_key(digits):
    loader = create_train_loader(digits, CFG, batch_size=16, device="cpu", seed=0)
    with pytest.raises(ConfigError) as error:
        loader.epoch("balanced")
    assert error.value.key == "loss.resample.sampler"


def test_eval_batches_are_in_order_and_unaugmented(digits):
    x, y = collect(eval_batches(digits, "test", batch_size=100, device="cpu"))
    assert torch.equal(y, digits.test.labels) and torch.equal(x, digits.test.images.float() / 255)
    x_val, _ = collect(eval_batches(digits, digits.val, batch_size=7, device="cpu"))
    assert torch.equal(x_val, digits.val.images.float() / 255)


def test_image_size_resizes_train_and_eval_batches():
    data = build_dataset(dataclasses.replace(CFG, image_size=16))
    x, _ = next(iter(create_train_loader(data, data.config, batch_size=8, device="cpu", seed=0).epoch("instance")))
    assert x.shape == (8, 1, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert next(iter(eval_batches(data, "val", batch_size=8, device="cpu")))[0].shape == (8, 1, 16, 16)


# ------------------------------------------------------------------------------ placements and paths
COUNTS = [6, 3, 2]


@pytest.fixture(scope="module")
def same_images_twice(tmp_path_factory):
    """One small RGB set (6x6, 6/3/2 train images) as an .npz (in memory: the resident loader) and as PNG files
    with image lists (on disk: DataLoader workers). 6 px, because the files' un-augmented transform,
    Resize(int(6·256/224) = 6) + CenterCrop(6), then leaves the pixels as they are."""
    from torchvision.io import write_png

    root = tmp_path_factory.mktemp("same-images")
    generator = torch.Generator().manual_seed(0)
    train_y = torch.arange(3).repeat_interleave(torch.tensor(COUNTS))
    train_x = torch.randint(0, 256, (len(train_y), 3, 6, 6), dtype=torch.uint8, generator=generator)
    test_y = torch.arange(3).repeat_interleave(3)
    test_x = torch.randint(0, 256, (len(test_y), 3, 6, 6), dtype=torch.uint8, generator=generator)
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        lines = []
        for i, (image, label) in enumerate(zip(images, labels)):
            write_png(image, str(root / f"{split}{i}.png"))
            lines.append(f"{split}{i}.png {int(label)}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    np.savez(root / "images.npz", x_train=train_x.numpy(), y_train=train_y.numpy(), x_test=test_x.numpy(), y_test=test_y.numpy())
    resident = DataConfig(name="npz", path=str(root / "images.npz"), imbalance=1.0, augment="none")
    files = DataConfig(name="imagelist", root=str(root), train_list="train.txt", test_list="test.txt", image_size=6,
                       workers=0, augment="none")
    return (build_dataset(resident), resident), (build_dataset(files), files), train_x


def test_resident_tensors_and_the_dataloader_path_yield_the_same_batches(same_images_twice):
    """On the CPU every placement keeps in-memory images resident on the host (one code path: see the next test);
    the path that differs there is the files' DataLoader. Both draw an epoch's indices from one seeded generator
    first, so, un-augmented, they batch the same images in the same order."""
    (resident_data, resident_cfg), (file_data, file_cfg), images = same_images_twice
    assert resident_data.in_memory and not file_data.in_memory
    assert torch.equal(resident_data.train.labels, file_data.train.labels) and resident_data.class_counts.tolist() == COUNTS
    resident = create_train_loader(resident_data, resident_cfg, batch_size=4, device="cpu", seed=2)
    files = create_train_loader(file_data, file_cfg, batch_size=4, device="cpu", seed=2)
    assert isinstance(resident, ResidentLoader) and resident.images.device.type == "cpu" and isinstance(files, FileLoader)
    reference = torch.Generator().manual_seed(2)  # un-augmented, an epoch draws only its sampler's indices
    for sampler in ("instance", "class_balanced"):
        order = SAMPLERS.get(sampler).obj(resident_data.train.labels, resident_data.class_counts, num_samples=11,
                                          batch_size=4, generator=reference, head_mask=None)
        got = [list(loader.epoch(sampler)) for loader in (resident, files)]
        assert [len(y) for _, y in got[0]] == [len(y) for _, y in got[1]] == [4, 4, 3]
        (x_resident, y_resident), (x_files, y_files) = collect(got[0]), collect(got[1])
        assert torch.equal(y_resident, resident_data.train.labels[order]) and torch.equal(y_files, y_resident)
        assert torch.equal(x_resident, to_unit_range(images[order], 6)) and x_files.dtype == torch.float32
        assert torch.equal((x_files * 255).round().to(torch.uint8), images[order])
        # k·(1/255) (torchvision's ToDtype) against k/255 correctly rounded (the resident table): one float32 rounding apart
        assert torch.allclose(x_files, x_resident, rtol=0, atol=2**-24)


def test_placement_picks_where_the_images_are_stored(digits, monkeypatch):
    """The decision the CUDA paths rest on, checked without a GPU: `loader` keeps the host, `device` the device, and
    `auto` the device unless the uint8 training set takes more than half of its free memory; on the CPU, the CPU."""
    nbytes = digits.train.images.numel()
    free = {"bytes": 2 * nbytes}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10 * nbytes))
    cuda = torch.device("cuda")
    assert [_storage_device(digits.train, p, cuda).type for p in ("device", "loader", "auto")] == ["cuda", "cpu", "cuda"]
    free["bytes"] = 2 * nbytes - 2  # half of it is one byte short of the images
    assert [_storage_device(digits.train, p, cuda).type for p in ("device", "loader", "auto")] == ["cuda", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: pytest.fail("asked a CPU run for GPU memory"))
    assert {_storage_device(digits.train, p, torch.device("cpu")).type for p in ("device", "loader", "auto")} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("placement", "storage"), [("device", "cuda"), ("loader", "cpu"), ("auto", "cuda"), ("auto-full", "cpu")])
def test_cuda_storage_paths_yield_the_cpu_batches(digits, placement, storage, monkeypatch):
    """Images on the GPU (index, crop, flip there) or pinned on the host (index there, copy each batch): the CPU's batches.
    `auto-full`: `auto` on a GPU whose free memory the images would more than half fill."""
    if placement == "auto-full":
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (digits.train.images.numel(), 2**40))
    cfg = dataclasses.replace(CFG, placement=placement.removesuffix("-full"))
    cpu = collect(create_train_loader(digits, CFG, batch_size=64, device="cpu", seed=5).epoch("class_balanced"))
    loader = create_train_loader(digits, cfg, batch_size=64, device="cuda", seed=5)
    assert isinstance(loader, ResidentLoader) and loader.images.device.type == storage
    assert storage == "cuda" or loader.images.is_pinned()
    cuda = collect(loader.epoch("class_balanced"))
    assert cuda[0].device.type == cuda[1].device.type == "cuda"
    assert torch.equal(cpu[0], cuda[0].cpu()) and torch.equal(cpu[1], cuda[1].cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eval_batches_equal_cpu_batches(digits):
    assert np.array_equal(collect(eval_batches(digits, "test", batch_size=64, device="cuda"))[0].cpu().numpy(),
                          (digits.test.images.float() / 255).numpy())
