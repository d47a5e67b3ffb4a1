"""Sources on small files written to tmp_path: CIFAR-10/100 pickles, image lists (PNG/JPEG) and npz arrays."""

from __future__ import annotations

import dataclasses
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_image, write_jpeg, write_png
from torchvision.transforms import v2

import ltsearch.data.sources.cifar as cifar_source
from ltsearch.config import DataConfig
from ltsearch.data import build_dataset, create_train_loader, eval_batches
from ltsearch.data.longtail import exp_counts
from ltsearch.errors import ConfigError, DataError

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; the data layer still uses it.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def collect(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


# -------------------------------------------------------------------------------------------- CIFAR
def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def fake_batch(labels: list[int], seed: int, label_key: str, with_filenames: bool) -> dict:
    rng = np.random.RandomState(seed)
    batch = {"data": rng.randint(0, 256, (len(labels), 3072)).astype(np.uint8), label_key: labels}
    if with_filenames:
        batch["filenames"] = [f"img_{seed}_{i}.png" for i in range(len(labels))]
    return batch


def write_fake_cifar10(root: Path, with_filenames: bool, per_class_per_batch: int = 4) -> None:
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", fake_batch(list(range(10)) * per_class_per_batch, i, "labels", with_filenames))
    write_pickle(folder / "test_batch", fake_batch(list(range(10)) * 10, 0, "labels", with_filenames))
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})


def write_fake_cifar100(root: Path, train_per_class: int = 6, test_per_class: int = 4) -> None:
    folder = root / "cifar-100-python"
    for name, per_class, seed in (("train", train_per_class, 1), ("test", test_per_class, 2)):
        batch = fake_batch(list(range(100)) * per_class, seed, "fine_labels", with_filenames=True)
        batch["coarse_labels"] = [label // 5 for label in batch["fine_labels"]]
        write_pickle(folder / name, batch)
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i}" for i in range(20)]})


@pytest.mark.parametrize("with_filenames", [True, False])
def test_cifar10_pickles_are_read_with_or_without_filenames(tmp_path, with_filenames):
    write_fake_cifar10(tmp_path, with_filenames)
    data = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), imbalance=1.0))
    assert len(data.train) == 200 and len(data.val) == 10 and len(data.test) == 90
    assert data.class_names == [f"c{i}" for i in range(10)] and data.train.images.shape[1:] == (3, 32, 32)
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="latin1")["data"]
    first = data.train.images[data.train.ids == 0][0]
    assert first[1, 2, 3] == raw[0, 1024 + 2 * 32 + 3]  # channel-major rows: 1024 R, 1024 G, 1024 B
    assert data.test.ids.min() >= 200 and data.augment.crop_padding == 4 and data.augment.horizontal_flip


def test_cifar100_layout_uses_fine_labels_and_names(tmp_path):
    write_fake_cifar100(tmp_path)
    data = build_dataset(DataConfig(name="cifar100", root=str(tmp_path), imbalance=5.0, val_fraction=0.25))
    assert data.num_classes == 100 and data.class_names[:2] == ["fine0", "fine1"]
    assert data.class_counts.tolist() == exp_counts(6, 100, 5.0)
    assert data.val.class_counts(100).tolist() == [1] * 100 and data.test.class_counts(100).tolist() == [3] * 100
    assert data.mean == pytest.approx((0.5071, 0.4865, 0.4409))


def test_missing_cifar_without_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as error:
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message and "data.download" in message


def test_offline_download_becomes_a_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_source, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as error:
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=True))
    assert "could not download CIFAR-100" in str(error.value) and str(tmp_path / "cifar-100-python") in str(error.value)


def test_download_is_used_only_when_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_fake_cifar10(Path(root), with_filenames=True)

    monkeypatch.setattr(cifar_source, "download_and_extract_archive", fake_download)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=True, imbalance=1.0)
    assert len(build_dataset(cfg).train) == 200
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")]
    build_dataset(cfg)
    assert len(calls) == 1


def test_a_pickle_without_labels_is_a_data_error(tmp_path):
    write_fake_cifar10(tmp_path, with_filenames=False)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match="test_batch.*'labels'"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------- imagelist
TRAIN_COUNTS = [4, 2, 1]


def write_image(path: Path, seed: int, size: tuple[int, int], gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1 if gray else 3, *size), dtype=torch.uint8, generator=generator)
    if path.suffix == ".png":
        write_png(image, str(path))
    else:
        write_jpeg(image, str(path), quality=95)


@pytest.fixture
def image_root(tmp_path) -> Path:
    """3 classes; train 4/2/1 images (PNG and JPEG, one grey), test 3 per class; lists as ImageNet-LT ships them."""
    lines = {"train.txt": [], "test.txt": []}
    seed = 0
    for list_name, counts in (("train.txt", TRAIN_COUNTS), ("test.txt", [3, 3, 3])):
        for label, count in enumerate(counts):
            for i in range(count):
                seed += 1
                rel = f"{list_name[:-4]}/class {label}/img{i}.{'png' if i % 2 else 'jpg'}"
                write_image(tmp_path / rel, seed, (20 + 3 * i, 26), gray=(seed == 2))
                lines[list_name].append(f"{rel} {label}")
    for name, content in lines.items():
        (tmp_path / name).write_text("\n".join(content) + "\n")
    return tmp_path


def list_config(root: Path, **changes) -> DataConfig:
    return dataclasses.replace(DataConfig(name="imagelist", root=str(root), train_list="train.txt", test_list="test.txt",
                                          image_size=16, workers=0, val_fraction=0.3), **changes)


def test_imagelist_keeps_the_given_long_tail_and_slices_val_from_test(image_root):
    data = build_dataset(list_config(image_root))
    assert data.class_counts.tolist() == TRAIN_COUNTS and data.construction["construction"] is None
    assert data.val.class_counts(3).tolist() == [1, 1, 1] and data.test.class_counts(3).tolist() == [2, 2, 2]
    assert not set(data.val.images) & set(data.test.images) and data.train.images[0].endswith("class 0/img0.jpg")
    assert (data.in_chans, data.image_size, data.mean) == (3, 16, (0.485, 0.456, 0.406))


def test_imagelist_train_batches_are_random_crops_in_unit_range_and_reproducible(image_root):
    cfg = list_config(image_root)
    data = build_dataset(cfg)
    loader = create_train_loader(data, cfg, batch_size=3, device="cpu", seed=0)
    assert len(loader) == 3
    x, y = collect(loader.epoch("instance"))
    assert x.shape == (7, 3, 16, 16) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert sorted(y.tolist()) == [0, 0, 0, 0, 1, 1, 2]
    state = loader.state_dict()
    twin = create_train_loader(data, cfg, batch_size=3, device="cpu", seed=0)
    assert torch.equal(collect(twin.epoch("instance"))[0], x)
    resumed = create_train_loader(data, cfg, batch_size=3, device="cpu", seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(collect(resumed.epoch("class_balanced"))[0], collect(loader.epoch("class_balanced"))[0])


def test_imagelist_crops_do_not_depend_on_the_number_of_workers(image_root):
    data = build_dataset(list_config(image_root))
    batches = [collect(create_train_loader(data, list_config(image_root, workers=workers), batch_size=4, device="cpu",
                                           seed=3).epoch("instance")) for workers in (0, 2)]
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


def test_imagelist_eval_is_resize_then_center_crop(image_root):
    data = build_dataset(list_config(image_root))
    x, y = collect(eval_batches(data, "test", batch_size=4, device="cpu"))
    expected = v2.Compose([v2.Resize(int(16 * 256 / 224), antialias=True), v2.CenterCrop(16), v2.ToDtype(torch.float32, scale=True)])
    reference = torch.stack([expected(decode_image(path, mode=ImageReadMode.RGB)) for path in data.test.images])
    assert torch.equal(x, reference) and torch.equal(y, data.test.labels)


def test_imagelist_malformed_line_names_file_and_line(image_root):
    (image_root / "bad.txt").write_text("train/class 0/img0.jpg 0\n\ntrain/class 0/img1.png zero\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: expected 'relative/path label'"):
        build_dataset(list_config(image_root, train_list="bad.txt"))


def test_imagelist_refuses_lists_that_share_images(image_root):
    (image_root / "val.txt").write_text("train/class 1/img0.jpg 1\n")
    with pytest.raises(DataError, match="train, val and test must not share images"):
        build_dataset(list_config(image_root, val_list="val.txt"))


def test_imagelist_uses_a_given_val_list(image_root):
    (image_root / "val.txt").write_text("test/class 2/img0.jpg 2\n")
    (image_root / "test2.txt").write_text("test/class 0/img0.jpg 0\ntest/class 1/img0.jpg 1\n")
    data = build_dataset(list_config(image_root, val_list="val.txt", test_list="test2.txt"))
    assert data.val.labels.tolist() == [2] and len(data.test) == 2


def test_imagelist_missing_image_is_a_data_error_naming_it(image_root):
    (image_root / "train" / "class 2" / "img0.jpg").unlink()
    cfg = list_config(image_root)
    loader = create_train_loader(build_dataset(cfg), cfg, batch_size=8, device="cpu", seed=0)
    with pytest.raises(DataError, match="class 2/img0.jpg"):
        list(loader.epoch("instance"))


@pytest.mark.parametrize("changes, key", [({"placement": "device"}, "data.placement"), ({"val_source": "train"}, "data.val_source"),
                                          ({"test_list": None}, "data.test_list")])
def test_imagelist_config_mistakes_name_their_key(image_root, changes, key):
    cfg = list_config(image_root, **changes)
    with pytest.raises(ConfigError) as error:
        create_train_loader(build_dataset(cfg), cfg, batch_size=2, device="cpu", seed=0)
    assert error.value.key == key


# ---------------------------------------------------------------------------------------------- npz
def write_npz(path: Path, layout: str = "nhwc", per_class=(40, 40, 40), **extra) -> dict:
    rng = np.random.RandomState(0)
    y_train = np.repeat(np.arange(3), per_class)
    arrays = {"x_train": rng.randint(0, 256, (len(y_train), 12, 12, 3)).astype(np.uint8), "y_train": y_train,
              "x_test": rng.randint(0, 256, (30, 12, 12, 3)).astype(np.uint8), "y_test": np.repeat(np.arange(3), 10)}
    if layout == "nchw":
        arrays = {k: v.transpose(0, 3, 1, 2) if k.startswith("x_") else v for k, v in arrays.items()}
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def test_npz_layouts_give_the_same_nchw_images(tmp_path):
    write_npz(tmp_path / "a.npz", "nhwc")
    arrays = write_npz(tmp_path / "b.npz", "nchw")
    nhwc = build_dataset(DataConfig(name="npz", path=str(tmp_path / "a.npz"), imbalance=1.0))
    nchw = build_dataset(DataConfig(name="npz", path=str(tmp_path / "b.npz"), imbalance=1.0))
    assert torch.equal(nhwc.train.images, nchw.train.images)
    assert torch.equal(nchw.train.images, torch.from_numpy(arrays["x_train"]))
    pixels = arrays["x_train"].astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    assert nhwc.mean == pytest.approx(tuple(pixels.mean(1))) and nhwc.std == pytest.approx(tuple(pixels.std(1, ddof=1)))
    assert nhwc.augment.crop_padding == 12 // 8 and nhwc.augment.horizontal_flip


def test_npz_applies_the_long_tail_unless_imbalance_is_one(tmp_path):
    write_npz(tmp_path / "d.npz", per_class=(40, 30, 50))
    data = build_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz"), imbalance=10.0))
    assert data.class_counts.tolist() == exp_counts(30, 3, 10.0) == [30, 9, 3]
    whole = build_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz"), imbalance=1.0))
    assert whole.class_counts.tolist() == [40, 30, 50]


def test_npz_optional_val_names_and_source_properties(tmp_path):
    rng = np.random.RandomState(1)
    write_npz(tmp_path / "v.npz", x_val=rng.randint(0, 256, (6, 12, 12, 3)).astype(np.uint8), y_val=np.array([0, 1, 2, 0, 1, 2]),
              class_names=np.array(["cat", "dog", "owl"]), mean=np.array([0.5, 0.5, 0.5]), std=np.array([0.25, 0.25, 0.25]),
              crop_padding=np.array(2), horizontal_flip=np.array(False))
    data = build_dataset(DataConfig(name="npz", path=str(tmp_path / "v.npz"), imbalance=1.0))
    assert data.class_names == ["cat", "dog", "owl"] and len(data.val) == 6 and len(data.test) == 30
    assert data.mean == (0.5, 0.5, 0.5) and data.augment.crop_padding == 2 and not data.augment.horizontal_flip
    assert data.construction["val_rule"] == "the source's own validation split"
    assert len({*data.train.ids.tolist(), *data.val.ids.tolist(), *data.test.ids.tolist()}) == 120 + 6 + 30


@pytest.mark.parametrize("change, message", [
    ({"x_train": np.zeros((3, 12, 12, 3), np.float32), "y_train": np.zeros(3, np.int64)}, "uint8"),
    ({"y_test": np.full(30, 7)}, "outside 0..2"),
    ({"x_val": np.zeros((1, 12, 12, 3), np.uint8)}, "x_val/y_val"),
])
def test_npz_mistakes_are_data_errors(tmp_path, change, message):
    write_npz(tmp_path / "bad.npz", class_names=np.array(["a", "b", "c"]), **change)
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(name="npz", path=str(tmp_path / "bad.npz")))
